"""agro_dist/run/evaluator.py: held-out evaluations on generator 0 (a real vLLM generator actor, tiny
model, local Ray), recorded in eval.csv, and run again when the generator dies under one."""

from __future__ import annotations

import logging
import os

import pytest
import ray

from agro_dist.run import config
from agro_dist.run.evaluator import Evaluator
from agro_dist.run.generator_pool import GeneratorPool
from agro_dist.run.learner_group import LearnerGroup
from agro_dist.run.monitor import RunMonitor, read_csv
from agro_dist.run.startup import Placement


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_an_evaluation_is_a_row_of_eval_csv_and_one_lost_with_generator_0_runs_again_once_it_is_back(local_ray, tiny_vllm_model,
                                                                                                  redis_server, tmp_path, caplog):
    from agro_dist.actors.generator import GeneratorActor

    name = f"evaluator-{os.getpid()}"
    cfg = config.load(overrides={"model": tiny_vllm_model, "run.name": name, "generator.max_tokens": 8, "generator.max_model_len": 256,
                                 "generator.kv_cache_gb": 1, "run.eval_size": 6, "run.eval_samples": 2}, check=False)
    gen = GeneratorActor.options(num_cpus=1, max_restarts=1, max_task_retries=0).remote(
        cfg.generator_config(0), buffer_url=redis_server.url, buffer_options={"name": name})
    placement = Placement()
    learners = LearnerGroup(cfg, redis_server.url, {}, str(tmp_path / "checkpoints"), placement, check_faults=lambda: None)
    pool = GeneratorPool(cfg, [gen], None, placement, learners, check_faults=lambda: None)
    monitor = RunMonitor(str(tmp_path), name, tensorboard=False, ray_metrics=False)
    ev = Evaluator(cfg, None, pool, learners, monitor)
    assert ev.on_generator and ev.last is None
    first = ev.collect(ev.submit(0, 0, 0), 1.0, wait=True)
    assert (first["step"], first["generated_samples"], first["eval_problems"], first["version"]) == (0, 0, 6, 0)
    # Generator 0 dies under a training call (the pool counts it down), then an evaluation is due:
    # it runs on the restarted generator, which the pool then counts as back.
    ray.kill(gen, no_restart=False)
    caplog.set_level(logging.INFO, logger="agro_dist")
    pool.outcome(0, gen.produce.remote(groups=1))
    assert pool.down == {0}
    again = ev.collect(ev.submit(3, 96, 80), 2.0, wait=True)
    assert (again["step"], again["samples"], again["generated_samples"]) == (3, 96, 80)
    assert again["greedy_accuracy"] == first["greedy_accuracy"]  # the same weights, the same greedy answers
    assert not pool.down and "generator 0 is back" in caplog.text
    assert ev.last is again and len(ev.rows) == 2
    monitor.close()
    rows = read_csv(str(tmp_path / "eval.csv"))
    assert [int(r["step"]) for r in rows] == [0, 3] and [r["generated_samples"] for r in rows] == [0, 80]
    ray.kill(gen)
