"""The learner as a Ray actor: one actor per DeepSpeed rank (OpenRLHF style).

    from agro_dist.learner.actor import LearnerActor
    ranks = [LearnerActor.options(num_cpus=1).remote(cfg, rank=r, world_size=N, master_port=port,
                                                        buffer_url=url) for r in range(N)]
    ray.get([a.step_from_buffer.remote() for a in ranks])       # every rank, the same step
    version, weights_ref = ray.get(ranks[0].publish.remote())   # rank 0 publishes

Each actor sets the usual torch.distributed environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) before DeepSpeed starts, so N actors form one data-parallel
group. ``publish`` puts a copy of the weights in Ray's object store and returns its reference:
generators on any node fetch it from there.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

import ray

from agro_dist.core.records import Group


def _interface_of(ip: str) -> Optional[str]:
    """The network interface that holds ``ip`` (None for loopback or when none does)."""
    import socket

    import psutil

    if ip.startswith("127."):
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


class LearnerWorker:
    def __init__(
        self,
        cfg: Dict[str, Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: Optional[int] = None,
        buffer_url: Optional[str] = None,
        buffer_options: Optional[Dict[str, Any]] = None,
    ):
        if world_size > 1 and not master_port:
            raise ValueError("master_port is required for more than one rank")
        if world_size > 1 or master_port:
            os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if world_size > 1 and "GLOO_SOCKET_IFNAME" not in os.environ:
            # Gloo advertises the address its host name resolves to, often 127.0.0.1 / 127.0.1.1:
            # ranks on other nodes then connect to themselves ("connectFullMesh failed ... Connection
            # refused, remote=[127.0.0.1]"). Use the interface of this node's Ray address instead.
            ifname = _interface_of(ray.util.get_node_ip_address())
            if ifname:
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
        from .learner import Learner, LearnerConfig  # imported here: DeepSpeed reads the env above

        self.learner = Learner(LearnerConfig(**cfg))
        self.buffer = None
        if buffer_url:
            from agro_dist.buffer import ReplayBuffer

            # A stable consumer name per rank: a restarted rank gets its un-acked groups back at once.
            self.buffer = ReplayBuffer(buffer_url, consumer=f"learner-{rank}", **(buffer_options or {}))

    def version(self) -> int:
        return self.learner.version

    def train_step(self, groups: List[Group], **kw) -> Dict[str, float]:
        return self.learner.train_step(groups, **kw)

    def step_from_buffer(self, p: Optional[float] = None, timeout_s: Optional[float] = None, *,
                         replay_groups: Optional[int] = None, batch_index: Optional[int] = None) -> Dict[str, float]:
        from .loop import step_from_buffer

        if self.buffer is None:
            raise RuntimeError("this learner was created without buffer_url")
        return step_from_buffer(self.learner, self.buffer, p=p, timeout_s=timeout_s, replay_groups=replay_groups, batch_index=batch_index)

    def publish(self) -> Tuple[int, "ray.ObjectRef", float]:
        """(version, object ref of the weights, seconds it took). In the store they are
        ``agro_dist.io.weights.pack``ed: ``ray.put`` copies the parameters' memory into it once,
        with no copy in this process, and generators read them from shared memory."""
        from agro_dist.io.weights import pack

        t = time.perf_counter()
        version, sd = self.learner.publish(copy=False, adapters=True)  # LoRA: the adapters alone
        ref = ray.put(pack(sd))
        del sd  # the parameters themselves (ZeRO 0): the store holds its own copy now
        return version, ref, time.perf_counter() - t

    def save_checkpoint(self, root: str, extra: Optional[Dict[str, Any]] = None) -> str:
        return self.learner.save_checkpoint(root, extra=extra)

    def update_model_card(self, root: str, card: Dict[str, Any]) -> Optional[str]:
        return self.learner.update_model_card(root, card)

    def load_checkpoint(self, path: str) -> Dict[str, Any]:
        return self.learner.load_checkpoint(path)


LearnerActor = ray.remote(LearnerWorker)
