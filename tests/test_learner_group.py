"""agro_dist/run/learner_group.py: gathering the ranks' answers to one call (local Ray).

The ranks here are stand-ins (``StandInRank``: a Ray actor that answers, raises, hangs or dies on
demand): what is tested is how the group reads its ranks' calls, which is Ray's alone. The real
learner ranks, killed and rebuilt from a checkpoint, are tested through the driver
(tests/test_system.py, tests/test_cluster.py)."""

from __future__ import annotations

import os
import time

import pytest
import ray

from agro_dist.run import config
from agro_dist.run.errors import TrainingError, ray_actor_errors
from agro_dist.run.learner_group import LearnerGroup
from agro_dist.run.startup import Placement


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0, max_restarts=0)
class StandInRank:
    def answer(self, what, value=None):
        if what == "value":
            return value
        if what == "raise":
            raise ValueError("this rank's own error")
        if what == "hang":
            time.sleep(600)
        if what == "die":
            os._exit(1)


def _group(tmp_path):
    cfg = config.load(overrides={"run.output_dir": str(tmp_path)}, check=False)
    return LearnerGroup(cfg, None, {}, str(tmp_path / "checkpoints"), Placement(), check_faults=lambda: None)


def test_gather_returns_every_ranks_answer_in_rank_order(local_ray, tmp_path):
    ranks = [StandInRank.remote() for _ in range(3)]
    refs = [r.answer.remote("value", i) for i, r in enumerate(ranks)]
    assert _group(tmp_path).gather(refs, 60, "a step") == [0, 1, 2]


def test_a_rank_whose_actor_dies_raises_rays_actor_error_at_once_with_its_rank_while_a_peer_hangs(local_ray, tmp_path):
    ranks = [StandInRank.remote() for _ in range(2)]
    refs = [ranks[0].answer.remote("hang"), ranks[1].answer.remote("die")]
    t = time.monotonic()
    with pytest.raises(ray_actor_errors()) as e:
        _group(tmp_path).gather(refs, 300, "a step")
    assert e.value.agro_rank == 1 and time.monotonic() - t < 60  # not the peer's 600 s: the caller rebuilds the group
    ray.kill(ranks[0])


def test_a_rank_that_raises_on_its_own_reraises_once_its_peers_answer_and_a_hang_is_named(local_ray, tmp_path):
    ranks = [StandInRank.remote() for _ in range(2)]
    with pytest.raises(ray.exceptions.RayTaskError, match="this rank's own error"):
        _group(tmp_path).gather([ranks[0].answer.remote("value", 1), ranks[1].answer.remote("raise")], 60, "a step")
    with pytest.raises(TrainingError, match=r"a checkpoint took over 2 s; learner ranks still running: \[1\]"):
        _group(tmp_path).gather([ranks[0].answer.remote("value", 1), ranks[1].answer.remote("hang")], 2, "a checkpoint")
    for r in ranks:
        ray.kill(r)


def test_nothing_is_sent_to_a_generator_before_the_first_publish(local_ray, tmp_path):
    g = _group(tmp_path)
    assert g.weights_to_send() is None and g.published_version == 0 and g.load_checkpoint() is None
