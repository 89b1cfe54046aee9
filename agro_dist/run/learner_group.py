"""The learner ranks as one: their calls (a step, a publish, a checkpoint), gathering their
answers, and rebuilding the group from the latest checkpoint when a rank is lost.

The ranks (``learner/actor.py``, ``resources.learner_ranks`` Ray actors in one placement group)
form one DeepSpeed group: a rank that dies (its process or its node) takes the collective down,
so the whole group is rebuilt (``rebuild``, ``run.learner_restarts`` times in a run) and the
caller restores it from the latest checkpoint; the groups of the failed step, never acked, are
delivered again by the buffer. Rank 0 publishes the weights into Ray's object store: ``latest``
holds the reference the generators and the eval actor load from.

Handed what it needs: the config, the buffer's address and options (each rank reads its batches
itself), the checkpoint folder, the cluster's ``Placement`` and ``check_faults`` (raises when the
private Redis is gone).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import ray

from agro_dist.io.storage import CheckpointWriteError, latest_checkpoint
from agro_dist.run import startup
from agro_dist.run.errors import TrainingError, ray_actor_errors
from agro_dist.run.startup import first_line

log = logging.getLogger("agro_dist")

# After a learner rank raised, how long to wait to learn whether a peer's actor died (then the
# raise was the collective losing it: the learner is rebuilt) before failing the run.
PEER_FATE_S = 120.0
# A checkpoint or a publish of the weights taking longer than this fails the run.
CHECKPOINT_LIMIT_S = 3600.0
# The learner metrics that add up over ranks (the others are averaged: ranks see different groups).
SUMMED = ("tokens_per_s", "response_tokens", "fresh_groups", "replayed_groups", "fresh_completions", "replayed_completions")


class LearnerGroup:
    def __init__(self, cfg, buffer_url: Optional[str], buffer_options: Dict[str, Any], ckpt_dir: str, placement,
                 check_faults: Callable[[], None]):
        self.cfg = cfg
        self.buffer_url, self.buffer_options = buffer_url, buffer_options
        self.ckpt_dir = ckpt_dir
        self.placement = placement
        self.check_faults = check_faults
        self.actors: List[Any] = []
        self._pg = None  # the ranks' placement group
        self.latest: Optional[Tuple[int, Any]] = None  # (version, ObjectRef) last published; None once released (sync mode)
        self.published_version = 0
        self.restarts = 0

    def start(self) -> None:
        self.actors, self._pg = startup.start_learner(self.cfg, self.buffer_url, self.buffer_options)

    # ------------------------------------------------------------------ a step

    def step(self, plan: List[int], batch_index: int) -> List[Any]:
        """Each rank trains on its share of the next batch from the buffer, ``plan[r]`` of it replayed."""
        return [a.step_from_buffer.remote(replay_groups=k, batch_index=batch_index) for a, k in zip(self.actors, plan)]

    def train(self, batch: List[Any]) -> List[Any]:
        """Offline: each rank trains on its share of these logged groups."""
        k = len(batch) // len(self.actors)
        return [a.train_step.remote(batch[r * k:(r + 1) * k], replay_fraction=0.0) for r, a in enumerate(self.actors)]

    def step_over(self, refs: List[Any], timeout: float = 0.0) -> bool:
        """Every rank's step has returned, or one has failed (its peers may wait in a collective
        for ever: ``collect`` sorts out which failure it is). Waits up to ``timeout``."""
        if timeout:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        self.check_faults()
        done = ray.wait(refs, num_returns=len(refs), timeout=0)[0]
        if len(done) == len(refs):
            return True
        for ref in done:
            try:
                ray.get(ref, timeout=0)
            except Exception:
                return True
        return False

    def collect(self, refs: List[Any]) -> Dict[str, float]:
        """The step's metrics, the ranks' merged: batch statistics averaged, throughput and
        counts added. Ray's actor error for a lost rank passes (the caller rebuilds); anything
        else the learner raised stops the run."""
        try:
            ms = self.gather(refs, self.cfg.run.step_timeout_s + 60, "a learner step (run.step_timeout_s)")
        except ray.exceptions.RayTaskError as e:
            self.check_faults()
            if "BufferTimeout" in str(e):
                raise TrainingError(f"no data reached the learner within run.step_timeout_s={self.cfg.run.step_timeout_s:g} s: "
                                    f"are the generators alive? ({first_line(e)})") from None
            raise TrainingError(f"the learner raised: {first_line(e)}{self.placement.dead_nodes()}") from e
        out = {k: sum(m[k] for m in ms) / len(ms) for k in ms[0] if all(k in m for m in ms)}
        for k in SUMMED:
            if all(k in m for m in ms):
                out[k] = sum(m[k] for m in ms)
        return out

    def gather(self, refs: List[Any], limit: float, what: str) -> List[Any]:
        """Every rank's answer to one call (a step, a checkpoint). A rank whose actor is gone (its
        process or its node) raises Ray's actor error at once, for the caller to rebuild the
        learner: its peers may wait in a collective with it for ever and are killed then. A rank
        that raised while a peer's actor died (its collective lost the peer) counts as that death;
        one that raised on its own re-raises its error."""
        deadline = time.monotonic() + limit
        out: Dict[Any, Any] = {}
        raised: Optional[Exception] = None
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                if raised is not None:
                    break
                raise TrainingError(f"{what} took over {limit:.0f} s; learner ranks still running: "
                                    f"{[refs.index(x) for x in pending]}{self.placement.dead_nodes()}")
            try:
                out[ready[0]] = ray.get(ready[0])
            except ray_actor_errors() as e:
                e.agro_rank = refs.index(ready[0])  # noqa: B010 (the rank lost, for the message)
                raise
            except ray.exceptions.RayTaskError as e:
                raised = raised or e
                # A lost peer's fate is known within Ray's node health checks (seconds to a minute).
                deadline = min(deadline, time.monotonic() + PEER_FATE_S)
        if raised is not None:
            raise raised
        return [out[x] for x in refs]

    # ------------------------------------------------------------------ weights

    def current_version(self) -> int:
        return int(ray.get(self.actors[0].version.remote()))

    def publish(self) -> None:
        """Rank 0 puts its weights (version v) in the object store; ``latest`` holds the reference.

        Our reference to the previous weights is dropped first, so that the store can free them
        (when nothing else holds them) before the new copy arrives. Should publishing fail, the
        learner is rebuilt and the restore publishes and sends again."""
        self.latest = None
        version, ref, _ = self.gather([self.actors[0].publish.remote()], CHECKPOINT_LIMIT_S, "publishing the weights")[0]
        self.latest, self.published_version = (version, ref), int(version)

    def weights(self) -> Tuple[int, Any]:
        """(version, ref) of the learner's latest weights: the published copy, or, where sync mode
        released it, a new one (the learner is idle whenever the sync loop asks)."""
        if self.latest is None:
            self.publish()
        return self.latest

    def weights_to_send(self) -> Optional[Tuple[int, Any]]:
        """What a generator should load: the latest weights, None before anything was published
        (a restarted generator has the model's, version 0)."""
        if self.latest is None and self.published_version == 0:
            return None
        return self.weights()

    def release(self) -> None:
        """Sync mode, once every generator holds the weights: drop the object store's copy a whole
        learner step before the next one is put. Dropped just before that put instead, the store
        had not always freed it in time (the release reaches the owner, the learner,
        asynchronously): it then held two copies, and the pages of a store's high-water mark stay
        resident (measured: 1.08 GB of shared memory instead of 0.54 for SmolLM2 from step 8 of
        the default run on). A generator restarted before the next broadcast gets a fresh copy."""
        self.latest = None

    # ------------------------------------------------------------------ checkpoints and faults

    def load_checkpoint(self) -> Optional[Dict[str, Any]]:
        """Every rank from the latest checkpoint: its meta (None where there is none yet)."""
        if latest_checkpoint(self.ckpt_dir) is None:
            return None
        # The checkpoint root: the learner reads ``latest`` (the newest complete checkpoint's name).
        return ray.get([a.load_checkpoint.remote(self.ckpt_dir) for a in self.actors])[0]

    def save_checkpoint(self, extra: Dict[str, Any], step: int) -> None:
        """A checkpoint of every rank with the run's counters (``extra``); a storage that cannot
        take it stops the run with what to do (nothing is lost: the previous checkpoint is
        complete, the groups since are in the buffer)."""
        try:
            self.gather([a.save_checkpoint.remote(self.ckpt_dir, extra) for a in self.actors], CHECKPOINT_LIMIT_S, "a checkpoint")
        except ray.exceptions.RayTaskError as e:
            if not isinstance(e.cause, CheckpointWriteError):
                raise
            raise TrainingError(f"at step {step}: {e.cause}; make room (or fix the storage) and continue with "
                                f"--run.resume true") from None

    def update_model_card(self, card: Dict[str, Any]) -> None:
        try:  # the final model's card gets the final held-out accuracy, measured after it was written
            ray.get(self.actors[0].update_model_card.remote(self.ckpt_dir, card), timeout=120)
        except Exception as e:
            log.warning("could not write the final accuracy into the model card: %s", first_line(e))

    def rebuild(self, err: Exception) -> None:
        """Every rank killed and started again (a lost rank breaks the collective); the caller
        restores them from the latest checkpoint. Past ``run.learner_restarts`` the run stops."""
        self.restarts += 1
        if self.restarts > self.cfg.run.learner_restarts:
            raise TrainingError(f"the learner failed {self.restarts} times (run.learner_restarts="
                                f"{self.cfg.run.learner_restarts}); last: {first_line(err)}") from None
        rank = getattr(err, "agro_rank", None)
        who = "" if rank is None else f" rank {rank} (on {self.placement.where.get(f'learner-{rank}', 'an unknown node')})"
        log.warning("learner%s failed (%s)%s; rebuilding it from the latest checkpoint (%d/%d)", who, first_line(err),
                    self.placement.dead_nodes(), self.restarts, self.cfg.run.learner_restarts)
        startup.remove_learner(self.actors, self._pg)
        self.start()
