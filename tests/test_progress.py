"""agro_dist/run/progress.py: the run's counters, its budget and the train.csv row (plain data)."""

from __future__ import annotations

import pytest

from agro_dist.run import config
from agro_dist.run.monitor import TRAIN_COLUMNS
from agro_dist.run.progress import Progress, budget_spent, time_left, train_row


def _run(**kw):
    return config.load(overrides={f"run.{k}": v for k, v in kw.items()}, check=False).run


def test_a_step_counts_fresh_and_replayed_completions_apart_and_offline_counts_the_batch_as_fresh():
    p = Progress()
    p.count_step({"fresh_completions": 24, "replayed_completions": 8}, completions=32)
    p.count_step({}, completions=32)  # offline: the learner says nothing about sources
    assert (p.step, p.samples, p.fresh_samples, p.replayed_samples) == (2, 64, 56, 8)


def test_a_checkpoint_keeps_the_counters_and_a_restore_gives_them_back():
    p = Progress()
    p.count_step({"fresh_completions": 24, "replayed_completions": 8}, completions=32)
    q = Progress()
    q.restore(p.extra(elapsed=61.5), version=1)
    assert (q.step, q.samples, q.fresh_samples, q.replayed_samples, q.elapsed_before) == (1, 32, 24, 8, 61.5)
    q.restore({}, version=7)  # a checkpoint made before the counters were kept: its version is the step
    assert (q.step, q.samples, q.fresh_samples) == (7, 0, 0)
    q.restore(None, version=0)  # no checkpoint: from zero
    assert (q.step, q.samples, q.elapsed_before) == (0, 0, 0.0)


@pytest.mark.parametrize("budget, state, spent", [
    (dict(steps=10), dict(step=9), False), (dict(steps=10), dict(step=10), True),
    (dict(steps=0, max_samples=100), dict(samples=99), False), (dict(steps=0, max_samples=100), dict(samples=100), True),
    (dict(steps=0, max_generated=64), dict(generated_samples=64), True),
    (dict(steps=50, max_generated=64), dict(step=3, generated_samples=70), True),  # the first budget reached ends the run
])
def test_the_run_ends_at_the_first_budget_reached(budget, state, spent):
    p = Progress(**state)
    assert budget_spent(_run(**budget), p, elapsed=1.0, epochs_done=0.0) is spent


def test_minutes_and_epochs_budgets_and_the_time_left_at_the_pace_so_far():
    assert budget_spent(_run(steps=0, max_minutes=2), Progress(), elapsed=120.0, epochs_done=0.0)
    assert not budget_spent(_run(steps=0, max_minutes=2), Progress(), elapsed=119.0, epochs_done=0.0)
    off = _run(steps=0, mode="offline", epochs=3)
    assert budget_spent(off, Progress(), elapsed=1.0, epochs_done=3.0) and not budget_spent(off, Progress(), elapsed=1.0, epochs_done=2.9)
    # A quarter of 40 steps in 60 s: 180 s left; the nearest budget decides.
    assert time_left(_run(steps=40), Progress(step=10), elapsed=60.0, epochs_done=0.0) == pytest.approx(180.0)
    assert time_left(_run(steps=40, max_minutes=2), Progress(step=10), elapsed=60.0, epochs_done=0.0) == pytest.approx(60.0)
    assert time_left(_run(steps=40), Progress(), elapsed=5.0, epochs_done=0.0) is None


def test_the_row_has_train_csv_columns_only_and_counts_new_staleness_since_the_last_row():
    p = Progress(step=3, samples=96, fresh_samples=72, replayed_samples=24, replay_short=2)
    m = {"version": 3, "reward_mean": 0.5, "kl": 0.1, "replay_fraction": 0.25, "step_s": 7.0}
    stats = dict(fresh_backlog=4, history_groups=20, stale_skipped=1, put_groups=26, put_completions=104, staleness_hist={0: 10, 1: 6},
                 replay_unavailable=1)
    gen = dict(tokens_per_s=100.0, generate_s=2.0, reward_s=0.1, reward_parts={"format": 0.75}, generated_tokens=900, restarts=0,
               reward_timeouts=0, reward_errors=0)
    seen = {0: 8, 1: 6}
    row, new = train_row(p, m, stats, gen, elapsed=30.0, sync_s=0.5, epoch=None, learner_restarts=0, stale_seen=seen)
    assert new == {0: 2} and seen == {0: 10, 1: 6}  # the histogram as of this row, for the next
    assert set(row) <= set(TRAIN_COLUMNS) | {"reward_format"}
    assert (row["generated_samples"], row["replay_unavailable"], row["reward_format"], row["weight_sync_s"]) == (104, 3, 0.75, 0.5)
