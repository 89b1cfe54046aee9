"""The system on a real multi-node Ray cluster: a head and two workers, each in its own network
namespace with its own address (deploy/netns_cluster.py), jobs submitted from the machine's own
namespace as from a laptop. Needs root and iproute2 (CI has both and fails without them); skipped otherwise."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(ROOT, "deploy"))

from test_system import _args as system_args, _nothing_lost, _rows, _without_output_dir  # noqa: E402

# Skipped on a laptop without root or iproute2; under CI (.ci/run sets AGRO_CI=1) a machine that
# cannot run them fails them instead, so they are never silently not run.
MISSING = "network namespaces need root and iproute2 (`ip`)" if os.geteuid() != 0 or shutil.which("ip") is None else None
pytestmark = pytest.mark.skipif(bool(MISSING) and not os.environ.get("AGRO_CI"), reason=str(MISSING))


@pytest.fixture(scope="module")
def cluster():
    if MISSING:
        pytest.fail(f"CI (AGRO_CI) must run the cluster tests: {MISSING}")
    from netns_cluster import Cluster

    # Learner ranks may go on either worker (learner_slot); the head keeps the driver (generator 0 evaluates).
    # Ray's temp folders under a short root: its AF_UNIX socket paths must stay under 108 bytes.
    # Each worker can hold the generator (gen_slot) and both learner ranks: when one is lost, the
    # other takes everything. The head declares a node dead after ~3 missed 1 s health checks
    # (Ray's defaults take 15-60 s: the same recovery, slower).
    slots = {"learner_slot": 2, "gen_slot": 1}
    c = Cluster(prefix="agt", workers=2, subnet="10.77.0", root=f"/tmp/agt-{os.getpid()}", python_bin=BIN,
                cpus={"head": 1, "w1": 3, "w2": 3}, resources={"w1": slots, "w2": slots},
                node_env={"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                          "RAY_health_check_failure_threshold": "3"})
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


# ---------------------------------------------------------------------- nodes lost mid-run


def _submit(cluster, args):
    """``ray job submit --no-wait`` from the machine's namespace: the job's id."""
    cmd = [f"{BIN}/ray", "job", "submit", "--address", cluster.dashboard, "--no-wait", "--working-dir", ROOT,
           "--runtime-env-json", json.dumps({"env_vars": {"PYTHONPATH": TESTS}}), "--", sys.executable, "-m", "agro_dist", *args]
    for _ in range(30):  # the head's job agent may still be starting
        p = subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=180, cwd=ROOT)
        if p.returncode == 0 or "No available agent" not in p.stdout + p.stderr:
            break
        time.sleep(2)
    assert p.returncode == 0, p.stdout + p.stderr
    return re.search(r"raysubmit_[A-Za-z0-9]+", p.stdout).group(0)


def _job_state(cluster, job_id):
    p = subprocess.run([f"{BIN}/ray", "job", "status", "--address", cluster.dashboard, job_id], env=cluster.env(),
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Job '\S+' (succeeded|failed|was stopped)", p.stdout + p.stderr)
    return m.group(1) if m else None


def _job_logs(cluster, job_id):
    return subprocess.run([f"{BIN}/ray", "job", "logs", "--address", cluster.dashboard, job_id], env=cluster.env(),
                          capture_output=True, text=True, timeout=120).stdout


def _placements(out):
    """Each ``placement:`` line of the driver's log as {actor: address}."""
    return [dict(re.findall(r"(\S+) on ([\d.]+)", m)) for m in re.findall(r"placement: (.*) \(driver on", out)]


FAULT_STEPS = 16  # enough that the generator must be back to finish, even when the fault lands late (~0.5 s a step)


def _run_through_a_fault(cluster, model, tmp_path, name, fault, watch=None):
    """An async run of FAULT_STEPS steps, checkpoints every 2, a generator (gen_slot) and two learner ranks
    spread over the workers; after 3 steps ``fault(node)`` strikes the generator's node. ``watch()``
    is called every 2 s until the job ends. Returns (final state, job log, run folder, the node)."""
    store = tmp_path / "store"
    args = _args(model, store, name, "--run.mode", "async", "--run.steps", str(FAULT_STEPS), "--run.checkpoint_every", "2",
                 "--run.max_staleness", "null", "--resources.learner_ranks", "2", "--resources.learner_resources", "{learner_slot: 1}",
                 "--resources.learner_placement", "SPREAD", "--resources.generator_resources", "{gen_slot: 1}")
    job = _submit(cluster, args)
    run = store / name
    deadline = time.time() + 300
    while not (run / "train.csv").exists() or len(_rows(run / "train.csv")) < 3:
        assert time.time() < deadline and _job_state(cluster, job) is None, _job_logs(cluster, job)[-6000:]
        time.sleep(1)
    first = _placements((run / "driver.log").read_text())[0]
    node = next(n for n in cluster.nodes if cluster.addr(n) == first["generator-0"])
    assert node != "head" and {first["learner-0"], first["learner-1"]} == {cluster.addr("w1"), cluster.addr("w2")}, first
    fault(node)
    deadline = time.time() + 600
    while (state := _job_state(cluster, job)) is None and time.time() < deadline:
        if watch is not None:
            watch()
        time.sleep(2)
    return state, _job_logs(cluster, job), run, node


def _recovered_on_the_other_worker(cluster, state, out, run, node):
    assert state == "succeeded", out[-6000:]
    gone, other = cluster.addr(node), cluster.addr("w2" if node == "w1" else "w1")
    # The failures name the lost node; the learner ranks are rebuilt and the generator restarted on the other worker.
    assert re.search(rf"learner rank \d \(on {gone}\) failed .*rebuilding it from the latest checkpoint", out), out[-6000:]
    assert f"generator 0 (on {gone}) failed" in out and f"generator 0 is back, on {other}" in out, out[-6000:]
    last = _placements(out)[-1]
    assert last["learner-0"] == last["learner-1"] == other, last
    steps = [int(r["step"]) for r in _rows(run / "train.csv")]
    k = next(i for i, r in enumerate(_rows(run / "train.csv")) if int(r["learner_restarts"]) == 1)
    f, c = steps[k - 1], steps[k] - 1  # the last step before the loss, the checkpoint it went on from
    assert steps == list(range(1, f + 1)) + list(range(c + 1, FAULT_STEPS + 1)) and c % 2 == 0 and c <= f, steps
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == FAULT_STEPS and summary["learner_restarts"] == 1 and summary["generator_restarts"] >= 1, summary
    _nothing_lost(run)  # every group put is acked or still in the buffer


def test_a_worker_node_lost_mid_run_moves_its_actors_and_loses_no_group(cluster, tiny_vllm_model, tmp_path):
    seen = set()

    def metrics():  # the run's gauges (numbers of the actors on the workers, set by the driver) on the head's endpoint
        try:
            text = urllib.request.urlopen(cluster.metrics, timeout=10).read().decode()
            seen.update(line.split("{")[0] for line in text.splitlines() if line.startswith("ray_agro_") and 'run="lost"' in line)
        except OSError:
            pass

    lost = []
    try:
        state, out, run, node = _run_through_a_fault(cluster, tiny_vllm_model, tmp_path, "lost",
                                                     lambda n: lost.append((n, cluster.kill_node(n))), watch=metrics)
        assert lost[0][1] > 0  # processes of that host were killed
        _recovered_on_the_other_worker(cluster, state, out, run, node)
        assert {"ray_agro_trained_tokens_per_s", "ray_agro_reward_mean", "ray_agro_buffer_backlog"} <= seen, seen
    finally:
        for n, _ in lost:
            cluster.restart_node(n)


def test_a_worker_node_cut_off_for_20_s_is_given_up_and_the_run_goes_on(cluster, tiny_vllm_model, tmp_path):
    cut = []

    def partition(n):
        cut.append(n)
        cluster.set_link(n, False)
        time.sleep(20)
        cluster.set_link(n, True)

    try:
        state, out, run, node = _run_through_a_fault(cluster, tiny_vllm_model, tmp_path, "cut", partition)
        _recovered_on_the_other_worker(cluster, state, out, run, node)
    finally:
        for n in cut:
            cluster.restart_node(n)
