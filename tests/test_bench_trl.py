"""The TRL bench's bookkeeping (the bench itself is a script, never a timed test): what both systems
train with, and the per-seed comparison and mean +- s.e. it prints."""

from __future__ import annotations

import os

from agro_dist.bench_trl import report, setting_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_both_systems_follow_the_config_and_the_seed():
    st = setting_of(os.path.join(ROOT, "docs", "experiments", "task.yaml"), 2, None)
    assert st["task_options"] == {"levels": [2, 3]} and st["seed"] == 2 and st["lr"] == 1e-5 and st["max_tokens"] == 12
    assert setting_of(None, 0, 1e-4)["lr"] == 1e-4 and setting_of(None, 0, None)["task_options"] == {}


def _run(system, seed, step_s, accs, kl):
    evals = [dict(step=10 * i, elapsed_s=60.0 * i * step_s / 10, sampled=a, greedy=a + 0.05) for i, a in enumerate(accs)]
    return dict(system=system, seed=seed, round=0, step_s=step_s, gen_tok_s=10.0, peak_gb=4.0, kl_end=kl, evals=evals,
                split={"generate_s": 1.0})


def test_the_report_compares_run_for_run_and_gives_mean_and_se(capsys, tmp_path):
    runs = {f"a{s}": _run("agro_dist", s, 10.0, [0.1, 0.3, 0.5], 2.0) for s in (0, 1)}
    runs.update({f"t{s}": _run("trl-hf", s, 20.0, [0.1, 0.2, 0.4], 0.02) for s in (0, 1)})
    report({"runs": runs}, plot=str(tmp_path / "p.png"))
    out = capsys.readouterr().out
    assert "agro_dist is 2.00 +- 0.00x faster per step, 2.00 +- 0.00x faster to trl-hf's final accuracy" in out
    assert "agro_dist reaches trl-hf's final 40.0% in 2.0 min (trl-hf took 4.0)" in out
    assert "runs where it got there: 2 of 2" in out and "50.0 +- 0.0" in out
    assert os.path.getsize(tmp_path / "p.png") > 10_000
