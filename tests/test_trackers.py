"""run.loggers: W&B (offline) and MLflow (a file store) get every train/eval value, the config and
the evaluations' sampled completions; read back with the libraries' own readers. No network."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from agro_dist.run.monitor import RunMonitor


def _wandb_records(run_dir):
    # Offline, a resumed run writes a second folder with the same run id (``wandb sync`` joins them).
    files = sorted(glob.glob(os.path.join(run_dir, "wandb", "wandb", "offline-run-*", "run-*.wandb")))
    assert len({os.path.basename(f) for f in files}) == 1, files  # one W&B run
    wandb_cli = os.path.join(os.path.dirname(sys.executable), "wandb")
    recs = []
    for f in files:
        out = subprocess.run([wandb_cli, "leet", "inspect", "--json", f], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        recs += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return recs


def test_wandb_offline_and_mlflow_file_store_get_the_rows_config_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    config = {"model": "tiny", "learner": {"lr": 1e-5, "loss": "agro_off"}}

    def monitor(resume):
        return RunMonitor(str(tmp_path), "trk", resume=resume, ray_metrics=False, reward_names=["numeric", "fmt"],
                          loggers=["wandb", "mlflow", "tensorboard"], config=config)

    m = monitor(False)
    for step in (1, 2):
        m.train(dict(step=step, version=step, samples=8 * step, reward_mean=0.25 * step, kl=0.1 * step, reward_numeric=0.5,
                      reward_fmt=float(step), skipped=None))
    m.eval(dict(step=2, version=2, samples=16, sampled_accuracy=0.375, greedy_accuracy=0.5, eval_problems=8))
    m.samples(2, [dict(version=2, prompt="What is 1 + 1?", completion="2", reward=1.0, answer="2")])
    m.close()
    m = monitor(True)  # a resumed run appends to the same tracker runs
    m.train(dict(step=3, version=3, samples=24, reward_mean=0.75, kl=0.3, reward_numeric=1.0, reward_fmt=3.0))
    m.close()

    rows = list(map(json.loads, open(tmp_path / "samples.jsonl")))
    assert rows == [dict(step=2, version=2, prompt="What is 1 + 1?", completion="2", reward=1.0, answer="2")]
    assert open(tmp_path / "train.csv").readline().strip().endswith("reward_numeric,reward_fmt")

    recs = _wandb_records(str(tmp_path))
    hist = [r["history"]["item"] for r in recs if r["type"] == "history"]
    train = [h for h in hist if "train/step" in h]
    assert [(h["train/step"], h["train/reward_mean"], h["train/reward_fmt"]) for h in train] == [(1, 0.25, 1), (2, 0.5, 2), (3, 0.75, 3)]
    assert any(h.get("eval/sampled_accuracy") == 0.375 and h.get("eval/step") == 2 for h in hist)
    assert any("eval/samples" in str(h) for h in hist)  # the sampled completions' table
    runs = [r["run"] for r in recs if r["type"] == "run"]
    assert runs[0]["display_name"] == "trk" and runs[0]["config"]["update"]["learner"]["lr"] == 1e-5
    assert glob.glob(str(tmp_path / "wandb" / "wandb" / "offline-run-*" / "files" / "media" / "table" / "eval" / "samples_*.table.json"))

    import mlflow

    uri = "file:" + str(tmp_path / "mlruns")
    client = mlflow.tracking.MlflowClient(uri)
    run_id = open(tmp_path / "mlflow_run_id").read().strip()
    run = client.get_run(run_id)
    assert run.info.run_name == "trk" and run.data.params["learner.lr"] == "1e-05" and run.info.status == "FINISHED"
    assert [(x.step, x.value) for x in client.get_metric_history(run_id, "train/reward_mean")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert [(x.step, x.value) for x in client.get_metric_history(run_id, "eval/sampled_accuracy")] == [(2, 0.375)]
    assert "train/skipped" not in run.data.metrics  # missing values are not logged as numbers
    art = client.download_artifacts(run_id, "samples/step_00000002.json", str(tmp_path / "dl"))
    assert json.load(open(art))[0]["completion"] == "2"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("eval/samples")[0].tensor_proto.string_val[0].decode()
    assert "What is 1 + 1?" in text and "reward 1" in text


def test_a_tracker_that_fails_mid_run_is_switched_off_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    m = RunMonitor(str(tmp_path), "trk", ray_metrics=False, loggers=["wandb"])
    m.trackers.active["wandb"].run.finish()  # its run is gone: the next log raises
    m.train(dict(step=1, version=1, samples=8, reward_mean=0.5))
    m.train(dict(step=2, version=2, samples=16, reward_mean=0.5))
    m.close()
    assert caplog.text.count("logger wandb failed") == 1 and "off for the rest of the run" in caplog.text
    assert len(open(tmp_path / "train.csv").readlines()) == 3


def test_unknown_or_missing_loggers_are_refused_before_start(tmp_path, monkeypatch):
    from agro_dist.run.config import ConfigError, load

    # W&B online with no key anywhere would stop for a login (or wait on the network): refused first.
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(ConfigError, match="not logged in to W&B.*WANDB_MODE=offline"):
        load(overrides={"run.loggers": ["wandb"]})
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert load(overrides={"run.loggers": ["wandb"]}).run.loggers == ["wandb"]
    # An MLflow server that is not there: refused at once, not after the client's minutes of retries.
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=f"tracking server 127.0.0.1:{port} cannot be reached"):
        load(overrides={"run.loggers": ["mlflow"]})
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    with pytest.raises(ConfigError, match="run.loggers: unknown logger 'comet'"):
        load(overrides={"run.loggers": ["wandb", "comet"]})
    with pytest.raises(ConfigError, match="run.loggers must be list"):
        load(overrides={"run.loggers": {"wandb": 1}})
    assert load(overrides={"run.loggers": "mlflow"}).run.loggers == ["mlflow"]  # one name, as TRL's report_to


def test_the_grafana_dashboard_in_deploy_is_the_one_the_code_makes_and_plots_every_gauge():
    import pathlib

    from agro_dist.run.monitor import EVAL_GAUGES, GAUGES, grafana_dashboard

    path = pathlib.Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "agro_dist.json"
    dash = json.loads(path.read_text())
    assert dash == grafana_dashboard(), "regenerate it: python -m agro_dist.run.monitor grafana > deploy/grafana/agro_dist.json"
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for name in [*GAUGES, *EVAL_GAUGES, "agro_reward_fn_mean", "agro_staleness_bucket"]:
        assert f"ray_{name}{{" in exprs, name
    # (test_system's job test checks that a real run exports every one of them.)


def test_the_run_plot_is_titled_with_the_setting_and_drops_panels_with_nothing_to_show(tmp_path):
    """training.png: the title names model, task, loss, beta, mode and p; a sync run at p = 0 has no
    staleness or replay to draw (that panel is dropped), an async run with replay keeps it."""
    from agro_dist.run.monitor import _run_title, plot_run, run_panels

    sync = [dict(step=s, generated_samples=32 * s, samples=32 * s, elapsed_s=10.0 * s, reward_mean=0.1 * s, kl=0.2 * s,
                 fresh_staleness_mean=0.0, fresh_staleness_max=0.0, replay_fraction=0.0, generated_tokens_per_s=50.0) for s in range(1, 4)]
    assert run_panels(sync) == ["reward", "reward_minutes", "kl", "reward_vs_kl", "throughput"]
    stale = [dict(r, fresh_staleness_max=1.0, replay_fraction=0.5) for r in sync]
    assert "staleness" in run_panels(stale)
    run = tmp_path / "r1"
    run.mkdir()
    (run / "config.yaml").write_text("model: /models/SmolLM2-135M-Instruct\nrun: {mode: async, replay_prob: 0.5}\n"
                                     "generator: {task: gsm8k}\nlearner: {loss: agro_off, beta: 0.05, lora_rank: 16}\n")
    with open(run / "train.csv", "w") as f:
        f.write(",".join(stale[0]) + "\n" + "\n".join(",".join(str(v) for v in r.values()) for r in stale) + "\n")
    (run / "eval.csv").write_text("step,generated_samples,elapsed_s,sampled_accuracy,greedy_accuracy\n0,0,0,0.1,0.2\n3,96,30,0.3,0.4\n")
    assert _run_title(str(run)) == "r1: SmolLM2-135M-Instruct on gsm8k | agro_off, beta 0.05, LoRA 16 | async mode, p 0.5"
    assert os.path.getsize(plot_run(str(run))) > 10_000
