"""A Ray cluster of separate hosts on one Linux machine: one network namespace per node.

    sudo python deploy/netns_cluster.py up [--workers 2] [--prefix agro] [--subnet 10.77.0]
    sudo python deploy/netns_cluster.py down [--prefix agro]

Each node (``head``, ``w1``, ``w2``, ...) is a network namespace with its own address on a bridge
(``10.77.0.2`` the head, ``10.77.0.3``... the workers; the bridge, in the machine's own namespace,
is ``10.77.0.1``, so ``ray job submit`` from the machine reaches the head's dashboard as a user's
laptop reaches a cluster). Nodes share the filesystem but not the network: a server bound to one
node's address or to its 127.0.0.1 is out of the others' reach, as on real hosts. Every Ray
process binds to its node's address; token authentication stays on (the token is written to
``<root>/token`` and passed to every process).

``up`` prints the addresses and the environment to use; ``down`` kills every process of every
node, deletes the namespaces, links and the bridge. Needs root (``ip netns``). Nothing leaves the
machine: the subnet is private and has no route out.

The tests use :class:`Cluster` (``tests/test_cluster.py``): ``kill_node`` (SIGKILL every process in
a node's namespace: a lost host), ``set_link`` (down/up: a network partition).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Union

RAY_PORT, DASHBOARD_PORT, METRICS_PORT = 6379, 8265, 8080


def _ip(*args: str, ns: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


class Cluster:
    """Namespaces ``<prefix>-head``, ``<prefix>-w1``, ... on bridge ``<prefix>br``; Ray on each."""

    def __init__(self, prefix: str = "agro", workers: int = 2, subnet: str = "10.77.0", root: Optional[str] = None,
                 cpus: Union[int, Dict[str, int]] = 2, resources: Optional[Dict[str, Dict[str, float]]] = None,
                 python_bin: Optional[str] = None, node_env: Optional[Dict[str, str]] = None):
        self.prefix, self.subnet = prefix, subnet
        self.nodes = ["head"] + [f"w{i}" for i in range(1, workers + 1)]
        # Per node: CPUs declared to Ray, and custom resources (every node also has host_<name>: 1,
        # so a user or a test can pin an actor to it).
        self.cpus = cpus if isinstance(cpus, dict) else {n: cpus for n in self.nodes}
        self.resources = {n: {f"host_{n}": 1, **(resources or {}).get(n, {})} for n in self.nodes}
        self.root = root or f"/tmp/{prefix}-netns-cluster"
        self.bin = python_bin or os.path.dirname(sys.executable)
        self.procs: Dict[str, subprocess.Popen] = {}
        self.token = None
        # Extra environment of the Ray processes: Ray reads its system settings from RAY_<name>
        # (the tests shorten the head's node health checks: RAY_health_check_period_ms, ...).
        self.node_env = dict(node_env or {})

    # ------------------------------------------------------------------ addresses

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def addr(self, node: str) -> str:
        return f"{self.subnet}.{2 + self.nodes.index(node)}"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @property
    def bridge_addr(self) -> str:
        return f"{self.subnet}.1"

    @property
    def address(self) -> str:
        return f"{self.addr('head')}:{RAY_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.addr('head')}:{DASHBOARD_PORT}"

    @property
    def metrics(self) -> str:
        return f"http://{self.addr('head')}:{METRICS_PORT}/metrics"

    def env(self, **extra: str) -> Dict[str, str]:
        """What a client needs: the token; RAY_ADDRESS left to the caller."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token or "", **extra)
        return env

    def _veth(self, node: str) -> str:
        return f"{self.prefix}v{self.nodes.index(node)}"

    # ------------------------------------------------------------------ network

    def net_up(self) -> None:
        self.net_down()  # leftovers of a run that was killed before its teardown
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_addr}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node in self.nodes:
            ns, host_end, node_end = self.ns(node), self._veth(node), f"{self._veth(node)}n"
            _ip("netns", "add", ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _ip("link", "set", node_end, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("addr", "add", f"{self.addr(node)}/24", "dev", node_end, ns=ns)
            _ip("link", "set", node_end, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)

    def net_down(self) -> None:
        for node in self.nodes:
            self.kill_node(node)
            _ip("link", "del", self._veth(node), check=False)
            _ip("netns", "del", self.ns(node), check=False)
        _ip("link", "del", self.bridge, check=False)

    def set_link(self, node: str, up: bool) -> None:
        """Cut (or restore) a node's only link: a network partition of that host."""
        _ip("link", "set", self._veth(node), "up" if up else "down")

    # ------------------------------------------------------------------ processes

    def run_in(self, node: str, cmd: List[str], **kw) -> subprocess.Popen:
        """Start a process inside a node's namespace (its own session, so it can be killed as a group)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns(node), *cmd], start_new_session=True, **kw)

    def pids(self, node: str) -> List[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns(node)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []

    def kill_node(self, node: str) -> int:
        """SIGKILL every process in the node's namespace (a host lost); returns how many."""
        n = 0
        for _ in range(5):  # processes forked while killing
            pids = self.pids(node)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    n += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        return n

    def start_node(self, node: str) -> None:
        tmp = os.path.join(self.root, node)
        os.makedirs(tmp, exist_ok=True)
        args = [f"{self.bin}/ray", "start", "--block", f"--node-ip-address={self.addr(node)}", f"--num-cpus={self.cpus[node]}",
                "--disable-usage-stats", f"--temp-dir={tmp}", f"--resources={json.dumps(self.resources[node])}"]
        if node == "head":
            args += ["--head", f"--port={RAY_PORT}", f"--dashboard-host={self.addr(node)}", f"--dashboard-port={DASHBOARD_PORT}",
                     f"--metrics-export-port={METRICS_PORT}"]
        else:
            args += [f"--address={self.address}"]
        log = open(os.path.join(self.root, f"{node}.log"), "a")
        self.procs[node] = self.run_in(node, args, env=self.env(**self.node_env), stdout=log, stderr=subprocess.STDOUT)

    def up(self, timeout_s: float = 180) -> "Cluster":
        os.makedirs(self.root, exist_ok=True)
        self.token = secrets.token_hex(32)
        with open(os.path.join(self.root, "token"), "w") as f:
            f.write(self.token)
        os.chmod(os.path.join(self.root, "token"), 0o600)
        self.net_up()
        self.start_node("head")
        self._wait_dashboard(timeout_s)
        for node in self.nodes[1:]:
            self.start_node(node)
        self.wait_nodes(len(self.nodes), timeout_s)
        return self

    def _wait_dashboard(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while True:
            if self.procs["head"].poll() is not None:
                raise RuntimeError(f"the Ray head exited: {self.log('head')[-3000:]}")
            try:
                urllib.request.urlopen(self.dashboard + "/api/version", timeout=5)
                return
            except urllib.error.HTTPError:  # it answered (401 without the token): it is up
                return
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the Ray head's dashboard did not answer: {self.log('head')[-3000:]}") from None
                time.sleep(1)

    def restart_node(self, node: str, timeout_s: float = 180) -> None:
        """Bring a lost worker back (its processes killed, its link up, Ray started again): a new
        node at the same address, as a replaced host."""
        self.kill_node(node)
        self.set_link(node, True)
        p = self.procs.pop(node, None)
        if p is not None:
            p.wait(timeout=20)
        self.start_node(node)
        self.wait_nodes(len(self.nodes), timeout_s)

    def alive_nodes(self) -> List[str]:
        """Node names Ray counts as alive (asked from the machine, through the bridge)."""
        code = ("import ray, json; ray.init(address='%s', logging_level='ERROR'); "
                "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env(), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            return []
        addrs = json.loads(out.stdout.strip().splitlines()[-1])
        return [n for n in self.nodes if self.addr(n) in addrs]

    def wait_nodes(self, n: int, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while len(self.alive_nodes()) < n:
            if time.time() > deadline:
                raise RuntimeError(f"{len(self.alive_nodes())} of {n} Ray nodes up; logs in {self.root}")
            time.sleep(2)

    def log(self, node: str) -> str:
        try:
            with open(os.path.join(self.root, f"{node}.log")) as f:
                return f.read()
        except OSError:
            return ""

    def down(self) -> None:
        for node, p in self.procs.items():
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5  # `ray start --block` takes ~30 s to stop after SIGTERM; SIGKILL leaves nothing
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self.net_down()  # SIGKILLs whatever is left in each namespace
        self.procs.clear()

    def clean(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefix", default="agro")
    ap.add_argument("--subnet", default="10.77.0", help="the first three octets of a private /24 (default 10.77.0)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs each Ray node declares")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("netns_cluster: needs root (ip netns)", file=sys.stderr)
        return 2
    c = Cluster(a.prefix, a.workers, a.subnet, cpus=a.cpus)
    if a.action == "down":
        c.net_down()
        print(f"removed the {a.prefix} namespaces, links and bridge")
        return 0
    # `up` keeps the Ray processes running after this script exits (each in its own session).
    c.up()
    print(f"Ray cluster up: head {c.addr('head')}, workers {', '.join(c.addr(n) for n in c.nodes[1:])}\n"
          f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(cat {c.root}/token)\n"
          f"  ray job submit --address {c.dashboard} --working-dir . -- python -m agro_dist ...\n"
          f"  metrics: {c.metrics}\n"
          f"  a node's shell: ip netns exec {c.ns('w1')} bash\n"
          f"  tear down: python {os.path.relpath(__file__)} down --prefix {a.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
