"""The learner as Ray actors (local Ray), fed by the real replay buffer."""

from __future__ import annotations

import os
import socket

import pytest
import ray
import torch

from agro_dist.buffer import ReplayBuffer
from agro_dist.io.weights import is_packed, unpack
from learner_worker import batch_for_step, make_learner


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.path.dirname(__file__)}})
    yield
    ray.shutdown()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_learner_actor_trains_from_the_buffer_and_publishes_through_the_object_store(local_ray, tiny_model, redis_server):
    from agro_dist.learner.actor import LearnerActor

    name = f"ray-learner-{os.getpid()}"
    with ReplayBuffer(redis_server.url, name=name) as buf:
        second = batch_for_step(1, 4)
        for g in second:
            g.policy_version = 0  # sampled by the initial weights: one version stale at step 2
        buf.put(batch_for_step(0, 4) + second + batch_for_step(2, 4))
        cfg = dict(model=tiny_model, batch_groups=4, micro_groups=2, lr=1e-2, beta=0.1, weight_decay=0.01, adam_eps=1e-4)
        actor = LearnerActor.options(num_cpus=1).remote(cfg, master_port=_port(), buffer_url=redis_server.url, buffer_options={"name": name})
        m0 = ray.get(actor.step_from_buffer.remote(p=0.0, timeout_s=10))
        m1 = ray.get(actor.step_from_buffer.remote(p=0.0, timeout_s=10))
        assert (m0["version"], m1["version"]) == (1, 2) and m0["wait_s"] >= 0
        assert (m0["fresh_staleness_mean"], m1["fresh_staleness_mean"], m1["fresh_staleness_max"]) == (0.0, 1.0, 1.0)
        assert "replay_age_mean" not in m1 and m1["kl"] >= 0  # p = 0: nothing replayed
        version, ref, secs = ray.get(actor.publish.remote())
        packed = ray.get(ref)
        assert is_packed(packed)
        # The tied output head travels once: one array under both names.
        assert packed["lm_head.weight"][0] is packed["model.embed_tokens.weight"][0]
        weights = {k: v.clone() for k, v in unpack(packed).items()}
        del packed
        # The store holds its own copy (the actor put the parameters themselves, no copy of its
        # own): a further step changes the learner, not the published weights.
        assert ray.get(actor.step_from_buffer.remote(p=0.0, timeout_s=10))["version"] == 3
        again = unpack(ray.get(ref))
        assert all(torch.equal(again[k], weights[k]) for k in weights)
        now = unpack(ray.get(ray.get(actor.publish.remote())[1]))
        assert max((now[k] - weights[k]).abs().max().item() for k in weights) > 1e-3  # ... which the step did change (lr 1e-2)
        del now, again
        s = buf.stats()
        assert s["acked"] == 12 and s["fresh_backlog"] == 0 and s["fresh_pending"] == 0
        buf.delete()
    # The same two batches through an in-process learner give the same weights.
    local = make_learner(tiny_model, adam_eps=1e-4)
    for step in range(2):
        local.train_step(batch_for_step(step, 4))
    _, want = local.publish()
    assert version == 2 and set(weights) == set(want)
    assert max((weights[k] - want[k]).abs().max().item() for k in want) < 1e-6
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    ray.kill(actor)
