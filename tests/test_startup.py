"""Start-up never hangs (issue 18): a run without an address starts its own Ray whatever files
earlier Ray sessions left, and a cluster address that does not answer stops the driver within
``run.connect_timeout_s`` with exit 3 and a line naming the address.

Each case is the real CLI in a subprocess. Ray's temp folder is a fresh one (``RAY_TMPDIR``),
never the user's ``/tmp/ray``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from agro_dist.buffer.server import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def ray_tmp():
    # Short: Ray's socket paths under it must fit AF_UNIX's 107 bytes.
    d = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(ray_tmp, **extra):
    drop = ("RAY_ADDRESS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=os.pathsep.join([TESTS, env.get("PYTHONPATH", "")]).strip(os.pathsep), **extra)
    return env


def _args(model, out, *extra):
    return ["--model", model, "--run.output_dir", str(out), "--run.name", "s", "--generator.max_tokens", "8", "--generator.n", "2",
            "--generator.prompts_per_call", "2", "--generator.max_model_len", "256", "--generator.kv_cache_gb", "1",
            "--generator.reward_fn", "reward_fns:even_length", "--learner.batch_groups", "2", "--learner.micro_groups", "2",
            "--run.eval_size", "2", "--run.eval_samples", "1", "--run.steps", "1", "--run.plots", "false",
            "--resources.generator_memory_gb", "1", "--resources.learner_memory_gb", "1", "--resources.eval_memory_gb", "1", *extra]


def _run(args, env, timeout):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "agro_dist", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


def test_a_stale_ray_current_cluster_file_does_not_capture_a_local_run(tiny_vllm_model, tmp_path, ray_tmp):
    # What a killed `ray start --head` leaves behind: Ray's record of "the current cluster", naming a dead head.
    os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)
    dead = f"127.0.0.1:{free_port()}"
    with open(os.path.join(ray_tmp, "ray", "ray_current_cluster"), "w") as f:
        f.write(dead)
    p, secs = _run(_args(tiny_vllm_model, tmp_path), _env(ray_tmp), timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    assert "starting a private local Ray" in p.stdout and "Ray local (started here)" in p.stdout
    assert dead not in p.stdout + p.stderr


def test_ray_address_on_a_closed_port_exits_3_at_once(tiny_vllm_model, tmp_path, ray_tmp):
    address = f"127.0.0.1:{free_port()}"
    p, secs = _run(_args(tiny_vllm_model, tmp_path), _env(ray_tmp, RAY_ADDRESS=address), timeout=120)
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"the Ray cluster at {address} (RAY_ADDRESS) does not answer" in p.stdout, p.stdout[-3000:]
    assert secs < 60, secs
    assert "Traceback" not in p.stdout + p.stderr


def test_a_cluster_address_that_accepts_but_never_answers_exits_3_within_the_bound(tiny_vllm_model, tmp_path, ray_tmp):
    # A port that accepts TCP connections and says nothing (a wedged head, the wrong service): Ray's
    # client would retry it forever. run.connect_timeout_s bounds it.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    address = f"127.0.0.1:{srv.getsockname()[1]}"
    try:
        p, secs = _run(_args(tiny_vllm_model, tmp_path, "--run.ray_address", address, "--run.connect_timeout_s", "10"),
                       _env(ray_tmp), timeout=180)
    finally:
        srv.close()
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"the Ray cluster at {address} (run.ray_address) did not answer within run.connect_timeout_s=10 s" in p.stdout, p.stdout[-3000:]
    assert secs < 10 + 60, secs  # the bound plus the interpreter and the model check


def test_the_driver_does_not_import_torch(tmp_path):
    """The driver only orchestrates: reading a config, starting Ray and Redis, naming the actor
    classes and writing the run's tables and TensorBoard scalars must not load torch,
    transformers, DeepSpeed or vLLM into it (~0.4 GB of resident memory and ~5 s of start-up,
    measured; issue 14's 8 GB budget)."""
    code = ("import sys, agro_dist.run.driver, agro_dist.run.config, agro_dist.learner.actor, agro_dist.actors.generator, agro_dist.buffer, "
            "agro_dist.io.weights; from agro_dist.learner import LearnerConfig, PACKINGS; from agro_dist.run.monitor import RunMonitor; "
            "m = RunMonitor(sys.argv[1], 'r', ray_metrics=False); m.train(dict(step=1, reward_mean=0.5)); m.train(dict(step=2, reward_mean=0.75)); "
            "m.close(); print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'deepspeed', 'vllm'}))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    # The scalars are what TensorBoard reads.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/reward_mean")] == [(1, 0.5), (2, 0.75)]
