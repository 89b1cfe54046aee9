"""The run configuration: defaults < YAML file < command line, every key documented, errors that name the key."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from agro_dist import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_command_line_wins_over_the_file_which_wins_over_the_defaults(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model: /models/x\nrun:\n  steps: 7\n  mode: async\n  replay_prob: 0.25\nlearner:\n  lr: 3e-6\n  adam_betas: [0.9, 0.95]\n")
    cfg, _ = config.from_args(["--config", str(f), "--learner.lr", "1e-4", "--run.max_staleness", "null", "--run.name", "2024"])
    assert cfg.model == "/models/x" and cfg.run.steps == 7 and cfg.run.mode == "async" and cfg.run.replay_prob == 0.25
    assert cfg.learner.lr == 1e-4  # command line over file
    assert cfg.learner.adam_betas == (0.9, 0.95) and cfg.run.max_staleness is None
    assert cfg.run.name == "2024"  # a string key stays a string
    assert cfg.learner.beta == config.Config().learner.beta  # untouched: the default
    # The component configs receive the driver-owned fields.
    assert cfg.generator_config(1)["seed"] == cfg.run.seed + 1 and cfg.generator_config(1)["generator_id"] == "gen-1"
    assert cfg.learner_config()["model"] == "/models/x"


@pytest.mark.parametrize("args, message", [
    (["--learner.lr", "fast"], "learner.lr must be float"),
    (["--run.mode", "sometimes"], "run.mode must be sync, async, frozen or offline"),
    (["--run.mode", "offline"], "run.mode=offline trains from data.path"),
    (["--data.path", "x.jsonl"], "data.path is read in run.mode=offline only"),
    (["--run.mode", "offline", "--data.path", "x.jsonl", "--run.steps", "0"], "set a budget"),
    (["--run.replay_prob", "0.5"], "run.mode=sync is on-policy"),
    (["--run.mode", "async", "--run.replay_prob", "1.5"], "replay_prob must be in [0, 1]"),
    (["--learner.batch_groups", "6"], "must split into"),
    (["--buffer.redis_port", "6379"], "Ray's default GCS port"),
    (["--run.steps", "0"], "set a budget"),
])
def test_bad_values_are_refused_with_the_key_named(args, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.from_args(args)


def test_unknown_keys_in_the_file_name_the_file_and_the_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("learner:\n  learning_rate: 1e-5\n")
    with pytest.raises(config.ConfigError, match=re.escape(f"{f}: unknown key 'learner.learning_rate'")):
        config.load(str(f))
    f.write_text("learner:\n  model: /elsewhere\n")  # driver-owned: set by the top-level model key
    with pytest.raises(config.ConfigError, match="unknown key 'learner.model'"):
        config.load(str(f))


def test_help_lists_every_key_with_a_meaning_and_the_readme_documents_each():
    keys = [k for k, _ in config.keys()]
    assert len(keys) == len(set(keys)) > 60
    missing_help = [k for k in keys if not config.HELP.get(k)]
    assert not missing_help, f"keys without help text: {missing_help}"
    out = subprocess.run([sys.executable, "-m", "agro_dist", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for k in keys:
        assert f"--{k} " in out.stdout or f"--{k}\n" in out.stdout, k
    readme = open(os.path.join(ROOT, "README.md")).read()
    undocumented = [k for k in keys if f"`{k}`" not in readme]
    assert not undocumented, f"README's config table lacks: {undocumented}"


def test_print_config_round_trips_through_the_file(tmp_path):
    out = subprocess.run([sys.executable, "-m", "agro_dist", "--print-config", "--run.mode", "async", "--learner.lr", "2e-5"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    f = tmp_path / "resolved.yaml"
    f.write_text(out.stdout)
    cfg = config.load(str(f))
    assert cfg.run.mode == "async" and cfg.learner.lr == 2e-5 and cfg.to_dict() == config.load(str(f)).to_dict()


def test_a_bad_command_line_exits_2_with_the_message():
    out = subprocess.run([sys.executable, "-m", "agro_dist", "--run.mode", "later"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and "agro_dist: error: run.mode must be sync, async, frozen or offline" in out.stderr
