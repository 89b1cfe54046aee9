"""agro_dist/run/generator_pool.py: the pool's calls, counters and failures, with real vLLM generator
actors (tiny model) on a local Ray and the real Redis buffer."""

from __future__ import annotations

import logging
import os
import time

import pytest
import ray

from agro_dist.buffer import ReplayBuffer
from agro_dist.run import config
from agro_dist.run.generator_pool import GeneratorPool
from agro_dist.run.learner_group import LearnerGroup
from agro_dist.run.startup import Placement


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_counters_take_what_is_new_since_the_last_call_and_a_restarted_generator_counts_from_zero():
    cfg = config.load(check=False)
    pool = GeneratorPool(cfg, [None, None], None, None, None, check_faults=lambda: None)  # counting needs no actor
    pool.counters(0, dict(tokens=100, generate_s=2.0, reward_s=0.5, reward_parts={"acc": {"sum": 3.0, "count": 4}}))
    pool.counters(1, dict(tokens=50, generate_s=1.0))
    pool.counters(0, dict(tokens=160, generate_s=3.0, reward_s=0.5, reward_parts={"acc": {"sum": 4.0, "count": 8}}))
    w = pool.take_window()
    # 210 tokens in 4 engine seconds over 2 generators working side by side: 2 x 210 / 4 tokens/s.
    assert (w["generate_s"], w["tokens_per_s"], w["generated_tokens"], w["reward_parts"]) == (4.0, 105.0, 210, {"acc": 0.5})
    pool.counters(1, dict(tokens=20, generate_s=0.5, reward_timeouts=2))  # restarted: its totals start again
    w = pool.take_window()
    assert (w["generate_s"], w["generated_tokens"], w["reward_timeouts"], w["reward_parts"]) == (0.5, 230, 2, {})


def test_the_pool_makes_a_steps_groups_refills_to_its_bound_and_brings_a_killed_generator_back(local_ray, tiny_vllm_model, redis_server,
                                                                                             tmp_path, caplog):
    from agro_dist.actors.generator import GeneratorActor

    name = f"pool-{os.getpid()}"
    cfg = config.load(overrides={"model": tiny_vllm_model, "run.name": name, "generator.n": 2, "generator.max_tokens": 8,
                                 "generator.prompts_per_call": 2, "generator.max_model_len": 256, "generator.kv_cache_gb": 1,
                                 "learner.batch_groups": 4}, check=False)
    gens = [GeneratorActor.options(num_cpus=1, max_restarts=1, max_task_retries=0).remote(
        cfg.generator_config(i), buffer_url=redis_server.url, buffer_options={"name": name}) for i in range(2)]
    placement = Placement()
    learners = LearnerGroup(cfg, redis_server.url, {}, str(tmp_path), placement, check_faults=lambda: None)  # nothing published yet
    with ReplayBuffer(redis_server.url, name=name) as buf:
        buf.delete()
        pool = GeneratorPool(cfg, gens, buf, placement, learners, check_faults=lambda: None)
        pool.produce_step(5)  # 3 + 2, exactly
        assert buf.stats()["fresh_backlog"] == 5 and buf.stats()["put_groups"] == 5
        assert pool.take_window()["generated_tokens"] > 0
        # Async: idle generators are asked for the learner's next groups until the bound: 5 + 2 reaches 7, so one call.
        refs = {}
        pool.refill(refs, max_backlog=7)
        assert len(refs) == 1
        for ref, i in list(refs.items()):
            pool.outcome(i, ref)
        assert buf.stats()["fresh_backlog"] == 7
        pool.refill(refs := {}, max_backlog=7)
        assert refs == {}  # the bound holds: nothing made to wait
        # Generator 1 killed: Ray restarts it; the pool counts it and says when it is back.
        ray.kill(gens[1], no_restart=False)
        caplog.set_level(logging.INFO, logger="agro_dist")
        pool.outcome(1, gens[1].produce.remote(groups=1))
        assert pool.down == {1} and pool.restarts == 1
        deadline = time.monotonic() + 300
        while pool.down and time.monotonic() < deadline:
            time.sleep(2)
            pool.outcome(1, gens[1].produce.remote(groups=1))
        assert not pool.down and pool.restarts == 1
        assert "generator 1 failed" in caplog.text and "generator 1 is back, on " in caplog.text
        buf.delete()
    for g in gens:
        ray.kill(g)
