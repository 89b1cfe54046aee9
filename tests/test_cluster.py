"""The system on a real multi-node Ray cluster: a head and two workers, each in its own network
namespace with its own address (deploy/netns_cluster.py), jobs submitted from the machine's own
namespace as from a laptop. Needs root (CI runs as root); skipped otherwise."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(ROOT, "deploy"))

from test_system import _args as system_args, _rows, _without_output_dir  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root and iproute2")


@pytest.fixture(scope="module")
def cluster():
    from netns_cluster import Cluster

    # Learner ranks may go on either worker (learner_slot); the head keeps the driver (generator 0 evaluates).
    # Ray's temp folders under a short root: its AF_UNIX socket paths must stay under 108 bytes.
    c = Cluster(prefix="agt", workers=2, subnet="10.77.0", root=f"/tmp/agt-{os.getpid()}", python_bin=BIN,
                cpus={"head": 1, "w1": 2, "w2": 2}, resources={"w1": {"learner_slot": 1}, "w2": {"learner_slot": 1}})
    try:
        c.up()
        yield c
    finally:
        c.down()  # processes, namespaces, links, bridge: also when the test failed
        c.clean()


def _args(model, store, name, *extra):
    # test_system's tiny run, kept in run.storage_path, no evaluation between steps, one thread per actor.
    return _without_output_dir(system_args(model, store, name, "--run.storage_path", str(store), "--run.eval_every", "0",
                                           "--resources.threads", "1", *extra))


def _job(cluster, args, timeout=900):
    """``ray job submit`` from outside the cluster's namespaces, waiting for the end: (rc, log)."""
    env_vars = {"PYTHONPATH": TESTS}
    cmd = [f"{BIN}/ray", "job", "submit", "--address", cluster.dashboard, "--working-dir", ROOT,
           "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", sys.executable, "-m", "agro_dist", *args]
    for _ in range(30):  # the head's job agent may still be starting
        p = subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if "No available agent" not in p.stdout + p.stderr:
            return p.returncode, p.stdout + p.stderr
        time.sleep(2)
    return p.returncode, p.stdout + p.stderr


def test_actors_on_other_nodes_share_a_guarded_buffer_and_stay_on_policy(cluster, tiny_vllm_model, tmp_path):
    store = tmp_path / "store"
    args = _args(tiny_vllm_model, store, "multi", "--run.steps", "3", "--resources.learner_ranks", "2",
                 "--resources.learner_resources", "{learner_slot: 1}", "--resources.learner_placement", "STRICT_SPREAD",
                 "--resources.generator_resources", "{host_w1: 1}")
    rc, out = _job(cluster, args)
    assert rc == 0, out[-6000:]
    head, w1, w2 = cluster.addr("head"), cluster.addr("w1"), cluster.addr("w2")
    # Where everything ran: the generator on w1, one learner rank on each worker, the driver on the head.
    placement = re.search(r"placement: (.*) \(driver on ([\d.]+)\)", out)
    assert placement, out[-4000:]
    where = dict(re.findall(r"(\S+) on ([\d.]+)", placement.group(1)))
    assert where["generator-0"] == w1 and {where["learner-0"], where["learner-1"]} == {w1, w2} and placement.group(2) == head
    # On-policy across nodes: the learner ranks' log-probs equal vLLM's on another node.
    rows = _rows(store / "multi" / "train.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(abs(float(r["behaviour_drift"])) < 1e-4 for r in rows), [r["behaviour_drift"] for r in rows]
    # The buffer: bound to the head's cluster address, with this run's password, which no log shows.
    m = re.search(r"buffer redis://:\*\*\*@([\d.]+):(\d+)/0", out)
    assert m and m.group(1) == head, out[-4000:]
    conf = (store / "multi" / "redis" / "redis.conf").read_text()
    password = re.search(r'requirepass "([^"]+)"', conf).group(1)
    assert f"bind {head}" in conf and "protected-mode yes" in conf and oct(os.stat(store / "multi" / "redis" / "redis.conf").st_mode)[-3:] == "600"
    for f in (store / "multi" / "config.yaml", store / "multi" / "driver.log"):
        assert password not in f.read_text(), f
    assert password not in out
    summary = json.loads((store / "multi" / "summary.json").read_text())
    assert summary["buffer"]["put_groups"] == summary["buffer"]["acked"] == 3 * 4
    # The Redis of a finished run is gone; one with the same settings on the head (as the driver
    # starts it) answers a client on another node only with the password.
    port = 16380  # the head's namespace has its own ports
    probe = cluster.run_in("head", [sys.executable, "-c", (
        "import time; from agro_dist.buffer.server import RedisServer; "
        "s = RedisServer(%r, host=%r, port=%d, password=%r).start(); print('up', flush=True); time.sleep(120)") %
        (str(tmp_path / "probe"), head, port, password)], stdout=subprocess.PIPE, text=True)
    try:
        assert probe.stdout.readline().strip() == "up"
        code = ("import redis\n"
                "try:\n    redis.Redis(host=%r, port=%d, socket_timeout=5).ping(); print('open')\n"
                "except redis.exceptions.AuthenticationError as e: print('refused', e)\n"
                "print('auth', redis.Redis(host=%r, port=%d, password=%r, socket_timeout=5).ping())\n") % (head, port, head, port, password)
        got = subprocess.run(["ip", "netns", "exec", cluster.ns("w2"), sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert "refused" in got.stdout and "auth True" in got.stdout, got.stdout + got.stderr
    finally:
        probe.kill()
        probe.wait()
