"""The run configuration: defaults < YAML file < command line, every key documented, errors that name the key."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from agro_dist.run import config

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
    (["--run.replay_prob", "auto"], "run.replay_prob auto fills with replay what async generation has not made yet"),
    (["--run.mode", "async", "--run.replay_prob", "auto", "--run.replay_max", "2"], "run.replay_max must be in [0, 1]"),
    (["--run.sync_every", "2"], "run.mode=sync loads every new version before the next step"),
    (["--run.mode", "async", "--run.replay_prob", "often"], "run.replay_prob must be float"),
    (["--buffer.replay_weighting", "newest"], "buffer.replay_weighting must be uniform or recency"),
    (["--buffer.replay_window", "-1"], "buffer.replay_window and buffer.replay_max_uses must be >= 0"),
    (["--run.mode", "async", "--run.replay_prob", "1.5"], "replay_prob must be in [0, 1] or auto"),
    (["--learner.batch_groups", "6"], "must split into"),
    (["--buffer.redis_port", "6379"], "Ray's default GCS port"),
    (["--run.steps", "0"], "set a budget"),
    (["--run.eval_engine", "gpu"], "run.eval_engine must be auto, generator or separate"),
    (["--learner.pack", "packed"], "learner.pack must be prefix, rows, none"),
    (["--learner.gradient_checkpointing", "true"], "learner.pack prefix keeps the prompts' keys and values"),
    (["--run.mode", "frozen", "--run.eval_engine", "generator"], "run.eval_engine=generator needs generators that follow the learner"),
    # ("" reads as YAML null.)
    *[(["--run.name", bad], f"run.name {bad or None!r}: use letters, digits") for bad in ("..", ".", "", "/abs", "a/../..", "runs/x", "a b", "x*", ".hidden")],
    (["--learner.temperature", "0"], "learner.temperature must be a number > 0 or null"),
    (["--learner.temperature", "hot"], "learner.temperature must be a number > 0 or null"),
    (["--learner.loss", "agro"], "learner.loss: unknown loss 'agro'"),
    # Losses that assume y ~ pi, on any other data: named, with the loss to use instead.
    (["--learner.loss", "agro_on", "--run.mode", "async"], "learner.loss agro_on assumes samples of the current policy (y ~ pi), "
                                                           "but run.mode async trains on groups sampled by earlier weights"),
    (["--learner.loss", "rloo", "--run.mode", "frozen"], "learner.loss rloo assumes samples of the current policy (y ~ pi), but run.mode frozen"),
    (["--learner.loss", "agro_on", "--run.mode", "offline", "--data.path", "x.jsonl"], "but run.mode offline trains on logged data"),
    (["--learner.loss", "agro_on", "--run.replay_prob", "0.25"], "but run.replay_prob 0.25 replays groups sampled by earlier weights"),
    (["--learner.loss", "agro_on", "--generator.top_p", "0.9"], "but generator.top_p 0.9 samples from a truncated policy"),
    (["--learner.loss", "agro_on", "--generator.temperature", "0"], "but generator.temperature 0 samples greedily"),
    (["--learner.loss", "rloo", "--learner.temperature", "1"], "but learner.temperature 1 scores another policy than the one "
                                                               "generator.temperature 0.7 samples"),
    (["--learner.loss_options", "{kl_estimator: causal}", "--learner.loss", "rloo", "--run.mode", "async"],
     "learner.loss rloo with loss_options {'kl_estimator': 'causal'} assumes samples of the current policy"),
    (["--learner.loss", "agro_on", "--run.mode", "async"], "Use learner.loss agro_off, which is unbiased for data from any sampler"),
    (["--learner.loss", "agro_on", "--learner.loss_options", "{lr_baseline: loo_var}", "--generator.n", "2"],
     "lr_baseline loo_var estimates the variance of R from the other n - 1 completions of a group: it needs generator.n >= 3 (got 2)"),
])
def test_bad_values_are_refused_with_the_key_named(args, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.from_args(args)


def test_who_evaluates_follows_the_mode_and_another_eval_task_is_handed_to_the_generator():
    def cfg(*a):
        return config.from_args(list(a))[0]

    assert cfg().eval_on_generator() and cfg("--run.mode", "async").eval_on_generator()
    assert not cfg("--run.mode", "frozen").eval_on_generator()  # frozen generators keep pi_ref
    assert not cfg("--run.eval_engine", "separate").eval_on_generator()
    assert cfg().eval_task_spec() is None  # the training task's held-out split: the generator's own task
    spec = cfg("--run.eval_task", "math500", "--run.eval_task_path", "/d/math500").eval_task_spec()
    assert spec == dict(task="math500", task_path="/d/math500", task_options={}, reward_fn=None)


def test_unknown_keys_in_the_file_name_the_file_and_the_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("learner:\n  learning_rate: 1e-5\n")
    with pytest.raises(config.ConfigError, match=re.escape(f"{f}: unknown key 'learner.learning_rate'")):
        config.load(str(f))
    f.write_text("learner:\n  model: /elsewhere\n")  # driver-owned: set by the top-level model key
    with pytest.raises(config.ConfigError, match="unknown key 'learner.model'"):
        config.load(str(f))


def test_help_lists_every_key_with_a_meaning_and_docs_config_md_documents_each():
    keys = [k for k, _ in config.keys()]
    assert len(keys) == len(set(keys)) > 60
    missing_help = [k for k in keys if not config.HELP.get(k)]
    assert not missing_help, f"keys without help text: {missing_help}"
    out = subprocess.run([sys.executable, "-m", "agro_dist", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for k in keys:
        assert f"--{k} " in out.stdout or f"--{k}\n" in out.stdout, k
    # docs/config.md is the table of exactly these keys and texts, and the README points at it.
    doc = open(os.path.join(ROOT, "docs", "config.md")).read()
    assert doc == config.CONFIG_DOC_HEAD + config.markdown_table(), "regenerate: python -m agro_dist.run.config markdown > docs/config.md"
    assert all(f"| `{k}` |" in doc for k in keys)
    assert "docs/config.md" in open(os.path.join(ROOT, "README.md")).read()


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


def test_a_new_run_never_lands_on_an_earlier_one(tmp_path):
    # `make train` twice: the second refuses before anything starts, and deletes nothing.
    run = tmp_path / "agro"
    (run / "checkpoints" / "step_00000040").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000040")
    (run / "train.csv").write_text("step\n1\n")
    (run / "config.yaml").write_text("run:\n  name: agro\n")
    out = subprocess.run([sys.executable, "-m", "agro_dist", "--run.output_dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stdout + out.stderr
    assert (f"run.name 'agro': {run} already holds a run (latest checkpoint step_00000040): continue it with --run.resume true, "
            "choose another --run.name, or delete it with --run.overwrite true") in out.stderr
    assert (run / "train.csv").exists() and (run / "checkpoints" / "latest").exists()
    cfg = config.load(overrides={"run.output_dir": str(tmp_path), "run.overwrite": True})
    from agro_dist.run.run_folder import check_run_home

    check_run_home(cfg)  # explicitly asked: allowed (the driver deletes it when it starts)
    check_run_home(config.load(overrides={"run.output_dir": str(tmp_path), "run.name": "other"}))


def test_a_ray_job_keeps_runs_outside_its_working_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the driver
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg, _ = config.from_args(["--run.name", "j"])
    assert cfg.run.storage_path == "~/agro_dist_results" and cfg.run_home == str(tmp_path / "agro_dist_results" / "j")
    cfg, _ = config.from_args(["--run.name", "j", "--run.output_dir", str(tmp_path / "abs")])  # an absolute folder is kept
    assert cfg.run.storage_path is None and cfg.run_home == str(tmp_path / "abs" / "j")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    cfg, _ = config.from_args(["--run.name", "j"])
    assert cfg.run.storage_path is None and cfg.run_home == os.path.abspath(os.path.join("runs", "j"))


def test_the_learner_scores_at_the_generators_temperature_unless_told_otherwise():
    def lt(*a):
        cfg = config.from_args(list(a))[0]
        assert cfg.learner_config()["temperature"] == cfg.learner_temperature
        return cfg.learner_temperature

    assert lt() == 0.7 and lt("--generator.temperature", "1.2") == 1.2
    assert lt("--learner.temperature", "0.5") == 0.5  # agro_off: any sampler
    assert lt("--generator.temperature", "0") == 1.0  # greedy sampling has no tempered distribution
    # On-policy losses where the data is on-policy: sync, p 0, the learner at the sampler's temperature.
    for loss in ("agro_on", "rloo"):
        assert lt("--learner.loss", loss) == 0.7
    assert lt("--learner.loss", "agro_on", "--learner.temperature", "0.7") == 0.7
    # The paper's off-policy baselines stay allowed where the paper runs them.
    config.from_args(["--learner.loss", "kl_pg", "--run.mode", "offline", "--data.path", "x.jsonl"])
    config.from_args(["--learner.loss", "grpo", "--run.mode", "async"])


def test_an_on_policy_loss_on_stale_data_exits_2_before_ray_starts():
    out = subprocess.run([sys.executable, "-m", "agro_dist", "--learner.loss", "agro_on", "--run.mode", "async", "--run.steps", "1"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "agro_dist: error: learner.loss agro_on assumes samples of the current policy" in out.stderr
    assert "Ray" not in out.stdout + out.stderr  # refused before anything started


def test_overwrite_deletes_only_a_run_folder_of_that_name(tmp_path):
    """run.overwrite on a folder agro_dist did not make for this run: exit 2, before anything starts,
    and nothing deleted (the issue's repro was `--run.name .. --run.overwrite true`, which deleted
    the parent folder; `..` is now refused as a name, and a folder that merely exists is not a run)."""
    out_dir = tmp_path / "X" / "runs"
    (out_dir / "notes").mkdir(parents=True)
    (out_dir / "notes" / "mine.txt").write_text("a user's file")
    (tmp_path / "X" / "beside.txt").write_text("a file beside runs/")
    base = [sys.executable, "-m", "agro_dist", "--run.overwrite", "true", "--run.steps", "1", "--run.output_dir", str(out_dir)]
    for name, message in (("..", "run.name '..': use letters"), ("notes", "run.overwrite: ")):
        p = subprocess.run(base + ["--run.name", name], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 2 and message in p.stderr, p.stderr
    assert (out_dir / "notes" / "mine.txt").read_text() == "a user's file" and (tmp_path / "X" / "beside.txt").exists()
    # A folder with another run's config.yaml is not this run's either.
    (out_dir / "notes" / "config.yaml").write_text("run:\n  name: other\n")
    p = subprocess.run(base + ["--run.name", "notes"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and "not a run folder agro_dist made for run 'notes'" in p.stderr, p.stderr
    assert (out_dir / "notes" / "mine.txt").exists()


def test_a_run_folder_is_recognised_by_its_marker_or_its_config(tmp_path):
    import json

    from agro_dist.io.storage import Storage
    from agro_dist.run.run_folder import RUN_MARKER, is_run_folder

    st = Storage(str(tmp_path))
    assert not is_run_folder(st, "a")
    (tmp_path / "config.yaml").write_text("run:\n  name: a\n")
    assert is_run_folder(st, "a") and not is_run_folder(st, "b")  # a run made before the marker
    (tmp_path / RUN_MARKER).write_text(json.dumps({"run": "b"}))
    assert is_run_folder(st, "b") and not is_run_folder(st, "a")  # the marker decides where there is one
    (tmp_path / RUN_MARKER).write_text("not json")
    assert not is_run_folder(st, "b")


def test_replay_in_sync_mode_and_auto_in_async_are_accepted():
    cfg, _ = config.from_args(["--run.replay_prob", "0.5"])  # the paper's synchronous replay
    assert cfg.fixed_replay_prob == 0.5 and cfg.fresh_per_step() == 4 and not cfg.replay_auto
    cfg, _ = config.from_args(["--run.mode", "async", "--run.replay_prob", "0.3"])
    assert cfg.fresh_per_step() == 8 - 2  # at most B - floor(pB) fresh groups a step
    cfg, _ = config.from_args(["--run.mode", "async", "--run.replay_prob", "auto", "--run.replay_max", "0.25"])
    assert cfg.replay_auto and cfg.fixed_replay_prob == 0.0 and cfg.fresh_per_step() == 8 and cfg.run.replay_max == 0.25


def test_bad_task_inputs_exit_2_naming_the_key_before_ray_starts(tmp_path):
    """A task option the task does not take, a reward function that cannot be imported, a task
    file that is not there, evaluation options with no evaluation task: exit 2 with the key named,
    before Ray or anything else starts."""
    base = [sys.executable, "-m", "agro_dist", "--run.steps", "1", "--run.output_dir", str(tmp_path)]
    cases = [
        (["--generator.task_options", "{levelz: [1]}"], "generator.task=arithmetic: bad task options {'levelz': [1]}"),
        (["--generator.reward_fn", "no_such_module:score"], "generator.reward_fn: reward function 'no_such_module:score' cannot be imported"),
        (["--generator.task", "gsm8k", "--generator.task_path", str(tmp_path / "missing")], f"task data not found: {tmp_path / 'missing'}"),
        (["--run.eval_task_options", "{levels: [2]}"], "run.eval_task_path and run.eval_task_options belong to run.eval_task"),
        (["--run.eval_task", "arithmetic", "--run.eval_task_options", "{bogus: 1}"], "run.eval_task=arithmetic: bad task options"),
        # your data, your reward (issue 40): the row and field, the list item, the template
        (["--generator.task", "dataset", "--generator.task_path", str(tmp_path / "rows.jsonl")],
         f"generator.task=dataset (path {tmp_path / 'rows.jsonl'}): {tmp_path / 'rows.jsonl'}:2: field 'prompt' missing"),
        (["--generator.reward_fn", "[numeric, {fn: math, weight: heavy}]"], "generator.reward_fn: reward function 1 (math): weight must be a number"),
        (["--generator.task_options", "{chat_template: '{% if %}'}"], "task_options.chat_template: not a valid Jinja template"),
    ]
    (tmp_path / "rows.jsonl").write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"question": "What is 2 + 2?", "answer": "4"}\n')
    for args, message in cases:
        p = subprocess.run(base + args, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 2 and message in p.stderr, (args, p.stdout[-1000:], p.stderr[-2000:])
        assert "Ray" not in p.stdout + p.stderr and "Traceback" not in p.stderr, p.stdout + p.stderr


def test_the_shipped_configs_validate():
    # deploy/gpu.yaml (the GPU cluster's), docs/experiments/task.yaml (the experiments'): what a user copies must load.
    for rel in ("deploy/gpu.yaml", "docs/experiments/task.yaml"):
        cfg = config.load(os.path.join(ROOT, rel))
        assert cfg.run.steps > 0 or cfg.run.max_generated or cfg.run.max_minutes, rel
