"""Sweeps: a grid of any config keys times seeds, each run a Ray job (or a local run), then a
table of mean +- standard error over the seeds, and plots.

    python deploy/sweep.py --name onpolicy --grid learner.loss rloo agro_off agro_on --seeds 0 1 2 \\
        --local --out docs/experiments/onpolicy -- --run.steps 40 --generator.task_options '{levels: [3]}'

    python deploy/sweep.py --address http://127.0.0.1:8265 --p 0 0.25 0.5 0.75 -- --run.steps 40

Each ``--grid KEY V1 V2 ...`` is one axis (values are YAML, as on agro_dist's command line);
the runs are every combination times ``--seeds`` (``--run.seed``). ``--point KEY=V KEY=V`` gives
one point whole (for grids that are not products: ``--point learner.loss=kl_pg --point
learner.loss=agro_off learner.beta=0``). ``--p P1 P2 ...`` is
``--grid run.replay_prob P1 P2 ... -- --run.mode async``. Everything after ``--`` goes to every
run's ``python -m agro_dist``; the sweep adds ``--run.name <name>-<key><value>...-s<seed>`` and
``--run.storage_path``.

Runs go one at a time: as Ray jobs on ``--address`` (``--parallel N`` for a cluster with room for
several), or with ``--local`` as ``python -m agro_dist`` processes here (they start a private
Ray, or join RAY_ADDRESS). Each run is kept in ``--storage-path``/<run> (checkpoints and all);
its small files (train.csv, eval.csv, summary.json) are copied to ``--out``/runs/<run>, which
is what the tables and plots are made from. A sweep is resumable: run it again with the same
arguments and a run whose files are in ``--out`` is skipped, a finished run in the storage is
collected, a run stopped after a checkpoint continues with ``--run.resume true``; a run stopped
before its first checkpoint is left alone unless ``--redo-incomplete`` (which replaces it).
``--report`` only remakes the tables and plots from ``--out``.

Writes ``--out``/results.csv (one row per run), summary.csv and table.md (one row per grid point:
mean +- s.e. over seeds) and curves.png (held-out accuracy against samples and minutes, reward
against KL, KL against steps; means over seeds, bands +- s.e.).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from agro_dist.io.storage import atomic_write
from agro_dist.run.monitor import read_csv, run_config

RUN_FILES = ("train.csv", "eval.csv", "summary.json", "config.yaml")
TAIL = 5  # train rows averaged for a run's final reward and KL (one batch is noisy)


# ----------------------------------------------------------------------------- the grid

def grid_runs(name: str, axes: List[List[str]], seeds: List[int], points: Optional[List[List[str]]] = None) -> List[Dict[str, Any]]:
    """Every combination of the axes' values (crossed with each ``--point``, when given) times the
    seeds: [{run, point, label, seed, args}]. ``points`` are lists of ``KEY=VALUE``."""
    import yaml

    keys = [a[0] for a in axes]
    base = [[tuple(kv.split("=", 1)) for kv in pt] for pt in points] if points else [[]]
    combos = [pt + list(zip(keys, combo)) for pt in base for combo in (itertools.product(*[a[1:] for a in axes]) if axes else [()])]
    out = []
    for kvs in combos:
        point = {k: yaml.safe_load(v) for k, v in kvs}
        label = "-".join(f"{k.split('.')[-1]}{_slug(v)}" for k, v in kvs)
        for s in seeds:
            run = f"{name}-{label}-s{s}" if label else f"{name}-s{s}"
            args = [a for k, v in kvs for a in (f"--{k}", v)] + ["--run.seed", str(s)]
            out.append(dict(run=run, point=point, label=point_label(point), seed=s, args=args))
    return out


def point_label(point: Dict[str, Any]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "all"


def _slug(v: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "_", str(v)).strip("_") or "x"


# ----------------------------------------------------------------------------- one run's outcome

def run_metrics(folder: str) -> Dict[str, Any]:
    """A finished run's numbers from its collected files."""
    tr, ev = read_csv(os.path.join(folder, "train.csv")), read_csv(os.path.join(folder, "eval.csv"))
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    tail = tr[-TAIL:]

    def mean(rows, k):
        xs = [r[k] for r in rows if k in r]
        return sum(xs) / len(xs) if xs else None

    sampled = [r["sampled_accuracy"] for r in ev if "sampled_accuracy" in r]
    peak = max(range(len(sampled)), key=lambda i: sampled[i]) if sampled else None
    return dict(steps=summary.get("steps"), samples=summary.get("samples"), minutes=summary.get("elapsed_s", 0) / 60,
                sampled_before=sampled[0] if sampled else None, sampled_final=sampled[-1] if sampled else None,
                greedy_before=ev[0].get("greedy_accuracy") if ev else None, greedy_final=ev[-1].get("greedy_accuracy") if ev else None,
                sampled_peak=sampled[peak] if sampled else None, peak_step=int(ev[peak]["step"]) if sampled else None,
                reward_final=mean(tail, "reward_mean"), kl_final=mean(tail, "kl"), eval_problems=ev[-1].get("eval_problems") if ev else None,
                replay_fraction=mean(tr, "replay_fraction"), stale_skipped=summary.get("buffer", {}).get("stale_skipped"),
                # The cost of the data (runs before these counters have none: their columns are left out).
                generated_samples=summary.get("generated_samples"), replayed_samples=summary.get("replayed_samples"))


# ----------------------------------------------------------------------------- the report

METRICS = [("sampled_before", "sampled acc before", True), ("sampled_final", "sampled acc final", True),
           ("sampled_peak", "sampled acc peak", True), ("greedy_final", "greedy acc final", True),
           ("reward_final", f"reward (last {TAIL} steps)", False), ("kl_final", f"KL (last {TAIL} steps)", False),
           ("minutes", "minutes", False), ("steps", "learner steps", False), ("generated_samples", "completions generated", False)]
# Shown only where some run has them (families run before these counters keep their tables).
OPTIONAL = ("steps", "generated_samples")


def _metrics(results: Dict[str, Dict[str, Any]]) -> List[tuple]:
    gen = any(r.get("generated_samples") is not None for r in results.values())
    return [m for m in METRICS if m[0] not in OPTIONAL or gen]


def mean_se(xs: List[float]):
    """Mean and standard error of the mean (sample s.d. / sqrt(n)); s.e. None for one value."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summarise(runs: List[Dict[str, Any]], results: Dict[str, Dict[str, Any]], metrics: Optional[List[tuple]] = None) -> List[Dict[str, Any]]:
    """One row per grid point, in grid order: mean and s.e. of each metric over its finished seeds."""
    out, seen = [], []
    for r in runs:
        if r["label"] in seen:
            continue
        seen.append(r["label"])
        done = [results[x["run"]] for x in runs if x["label"] == r["label"] and results.get(x["run"], {}).get("status") == "done"]
        row = dict(point=r["label"], seeds=len(done), of=sum(x["label"] == r["label"] for x in runs))
        for k, _, _ in metrics or METRICS:
            row[k], row[k + "_se"] = mean_se([d.get(k) for d in done])
        out.append(row)
    return out


PAIRED = ["sampled_final", "sampled_peak", "greedy_final", "reward_final", "kl_final"]


def paired(runs: List[Dict[str, Any]], results: Dict[str, Dict[str, Any]]) -> str:
    """Each grid point minus the first, seed by seed (the same seed: the same prompts and eval set,
    so the difference's s.e. is over seeds both finished): mean +- s.e. of the differences."""
    labels = list(dict.fromkeys(r["label"] for r in runs))
    if len(labels) < 2:
        return ""
    by = {(r["label"], r["seed"]): results.get(r["run"], {}) for r in runs}
    base = labels[0]
    head = ["point - " + base, "seeds"] + [m.replace("_", " ") for m in PAIRED]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels[1:]:
        seeds = [s for (lb, s), v in by.items() if lb == label and v.get("status") == "done" and by.get((base, s), {}).get("status") == "done"]
        cells = []
        for m in PAIRED:
            pct = m != "kl_final" and m != "reward_final"
            mean, se = mean_se([by[(label, s)][m] - by[(base, s)][m] for s in seeds
                                if by[(label, s)].get(m) is not None and by[(base, s)].get(m) is not None])
            f = (lambda x: f"{100 * x:+.1f}") if pct else (lambda x: f"{x:+.3g}")
            cells.append("-" if mean is None else f(mean) + (f" +- {f(se)[1:]}" if se is not None else ""))
        lines.append("| " + " | ".join([label, str(len(seeds))] + cells) + " |")
    return "\n".join(lines)


def eval_points(train_rows: List[Dict[str, Any]], eval_rows: List[Dict[str, Any]]) -> List[tuple]:
    """(step, sampled accuracy, KL over the TAIL steps up to it or None) at each evaluation of a run
    (its train.csv and eval.csv rows): held-out accuracy against KL, the KL-efficiency view that
    replayed groups' stale rewards cannot bias."""
    tr = {int(x["step"]): x for x in train_rows}
    out = []
    for e in eval_rows:
        if "sampled_accuracy" not in e:
            continue
        s = int(e["step"])
        ks = [tr[j]["kl"] for j in range(s - TAIL + 1, s + 1) if "kl" in tr.get(j, {})]
        out.append((s, e["sampled_accuracy"], sum(ks) / len(ks) if ks else None))
    return out


def by_eval(runs: List[Dict[str, Any]], out_dir: str) -> str:
    """Two tables, one row per grid point and one column per evaluation step: the sampled accuracy
    there and the KL over the TAIL steps up to it, mean +- s.e. over the seeds that reached it
    (the offline family's "at a fixed epoch", the replay family's "against steps")."""
    acc: Dict[tuple, List[float]] = {}
    kl: Dict[tuple, List[float]] = {}
    for r in runs:
        folder = os.path.join(out_dir, "runs", r["run"])
        if not os.path.exists(os.path.join(folder, "summary.json")):
            continue
        for s, a, k in eval_points(read_csv(os.path.join(folder, "train.csv")), read_csv(os.path.join(folder, "eval.csv"))):
            acc.setdefault((r["label"], s), []).append(a)
            if k is not None:
                kl.setdefault((r["label"], s), []).append(k)
    steps = sorted({s for _, s in acc})
    if not steps:
        return ""
    labels = list(dict.fromkeys(r["label"] for r in runs))

    def grid(vals, pct):
        lines = ["| point | " + " | ".join(f"step {s}" for s in steps) + " |", "|" + "---|" * (len(steps) + 1)]
        for lb in labels:
            lines.append(f"| {lb} | " + " | ".join(_cell(*mean_se(vals.get((lb, s), [])), pct) for s in steps) + " |")
        return "\n".join(lines)

    return (f"Sampled accuracy (%) at each evaluation:\n\n{grid(acc, True)}\n\n"
            f"KL over the {TAIL} steps up to each evaluation:\n\n{grid(kl, False)}")


def _cell(m, se, pct: bool) -> str:
    """A table cell: mean +- s.e. (percent with one decimal, or 3 significant digits); '-' for none."""
    if m is None:
        return "-"
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3g}")
    return f(m) + (f" +- {f(se)}" if se is not None else "")


def table(rows: List[Dict[str, Any]], metrics: Optional[List[tuple]] = None) -> str:
    metrics = metrics or METRICS
    head = ["point", "seeds"] + [t + (" %" if pct else "") for _, t, pct in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["point"], f"{r['seeds']}/{r['of']}"] +
                                        [_cell(r[k], r[k + "_se"], pct) for k, _, pct in metrics]) + " |")
    return "\n".join(lines)


def coinciding(curves: Dict[str, tuple]) -> List[List[str]]:
    """Groups of labels whose curves are identical (drawn one over the other)."""
    groups: Dict[tuple, List[str]] = {}
    for label, curve in curves.items():
        groups.setdefault(curve, []).append(label)
    return [g for g in groups.values() if len(g) > 1]


def _run_mode(folder: str) -> str:
    return str(((run_config(folder) or {}).get("run") or {}).get("mode", "?"))


def curves(runs: List[Dict[str, Any]], out_dir: str, title: str) -> Optional[str]:
    """curves.png: per grid point, the mean over its seeds (eval rows and train rows aligned by index)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in runs))
    fig, ax = plt.subplots(2, 3, figsize=(17, 8))
    drawn, new_style = False, False
    accuracy: Dict[str, tuple] = {}  # label -> its held-out accuracy curve, to say which lines coincide
    modes = set()
    for i, label in enumerate(labels):
        folders = [os.path.join(out_dir, "runs", r["run"]) for r in runs if r["label"] == label]
        folders = [f for f in folders if os.path.exists(os.path.join(f, "summary.json"))]
        if not folders:
            continue
        drawn = True
        c = f"C{i % 10}"
        modes |= {_run_mode(f) for f in folders}
        ev = [read_csv(os.path.join(f, "eval.csv")) for f in folders]
        tr = [read_csv(os.path.join(f, "train.csv")) for f in folders]
        n = min(len(e) for e in ev)
        # Runs that count generated completions are drawn against them (the cost of the data) and
        # against learner steps; older runs against completions trained and batch reward by step.
        gen = all(all(x.get("generated_samples") is not None for x in e) for e in ev)
        new_style = new_style or gen
        for a, xk, scale in ((ax[0, 0], "generated_samples" if gen else "samples", 1.0), (ax[0, 1], "elapsed_s", 1 / 60)):
            x = [mean_se([e[j][xk] * scale for e in ev])[0] for j in range(n)]
            ms = [mean_se([e[j].get("sampled_accuracy") for e in ev]) for j in range(n)]
            y = [m for m, _ in ms]
            if a is ax[0, 0]:
                accuracy[label] = (tuple(x), tuple(y))
            a.plot(x, y, "o-", color=c, label=f"{label} (n={len(folders)})")
            if len(folders) > 1:
                a.fill_between(x, [m - (s or 0) for m, s in ms], [m + (s or 0) for m, s in ms], color=c, alpha=0.2)
        # Accuracy against KL at each evaluation (before training the policy is pi_ref: KL 0).
        pts = [eval_points(r, e)[:n] for r, e in zip(tr, ev)]
        kx = [mean_se([p[j][2] if p[j][2] is not None else 0.0 for p in pts])[0] for j in range(n)]
        ax[0, 2].plot(kx, [mean_se([p[j][1] for p in pts])[0] for j in range(n)], "o-", color=c, label=label)
        t = min(len(r) for r in tr)
        kl = [mean_se([r[j].get("kl") for r in tr])[0] for j in range(t)]
        rw = [mean_se([r[j].get("reward_mean") for r in tr])[0] for j in range(t)]
        steps = [tr[0][j]["step"] for j in range(t)]
        ax[1, 0].plot(_smooth(kl), _smooth(rw), "-", color=c, label=label)
        if gen:
            ax[1, 1].plot([mean_se([e[j]["step"] for e in ev])[0] for j in range(n)],
                          [mean_se([e[j].get("sampled_accuracy") for e in ev])[0] for j in range(n)],
                          "o-", color=c, label=label)
        else:
            ax[1, 1].plot(steps, _smooth(rw), "-", color=c, label=label)
        ax[1, 2].plot(steps, kl, "-", color=c, label=label)
    if not drawn:
        plt.close(fig)
        return None
    batch_reward = "batch reward, replays included (mean of 5)"
    # Offline, the batch reward is the file's (the same data every epoch): those panels say nothing.
    no_reward = modes == {"offline"}
    for a, xl, yl in ((ax[0, 0], "completions generated" if new_style else "completions trained", "held-out sampled accuracy"),
                      (ax[0, 1], "minutes of training", "held-out sampled accuracy"),
                      (ax[0, 2], f"KL(pi || pi_ref) per sequence (mean of {TAIL} steps to the evaluation)", "held-out sampled accuracy"),
                      (ax[1, 0], "KL(pi || pi_ref) per sequence (moving mean of 5)", batch_reward),
                      (ax[1, 1], "learner step", "held-out sampled accuracy" if new_style else batch_reward),
                      (ax[1, 2], "learner step", "KL(pi || pi_ref) per sequence")):
        if no_reward and yl == batch_reward:
            a.set_visible(False)
            continue
        a.set_xlabel(xl)
        a.set_ylabel(yl)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(f"{title}: means over seeds (bands +- s.e.)")
    same = coinciding(accuracy)
    if same:  # a line drawn exactly under another is otherwise invisible
        fig.text(0.5, 0.005, "; ".join(" and ".join(g) + " coincide (the same held-out accuracy at every evaluation)" for g in same),
                 ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.02 if same else 0, 1, 1))
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _smooth(ys: List[Optional[float]], w: int = 5) -> List[float]:
    ys = [float("nan") if y is None else y for y in ys]
    return [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]


def report(runs: List[Dict[str, Any]], out_dir: str, title: str, status: Dict[str, str]) -> List[Dict[str, Any]]:
    """results.csv, summary.csv, table.md and curves.png from the runs collected in out_dir."""
    results = {}
    for r in runs:
        folder = os.path.join(out_dir, "runs", r["run"])
        if os.path.exists(os.path.join(folder, "summary.json")):
            results[r["run"]] = dict(status="done", **run_metrics(folder))
        else:
            results[r["run"]] = dict(status=status.get(r["run"], "not run"))
    cols = ["run", "point", "seed", "status", "steps", "samples", "minutes", "sampled_before", "sampled_final", "sampled_peak", "peak_step",
            "greedy_before", "greedy_final", "reward_final", "kl_final", "eval_problems", "replay_fraction", "stale_skipped"]
    metrics = _metrics(results)
    if any(m[0] == "generated_samples" for m in metrics):
        cols += ["generated_samples", "replayed_samples"]
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow(dict(run=r["run"], point=r["label"], seed=r["seed"], **{k: _fmt(v) for k, v in results[r["run"]].items()}))
    rows = summarise(runs, results, metrics)
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: _fmt(v) for k, v in row.items()} for row in rows])
    text = table(rows, metrics)
    diff = paired(runs, results)
    if diff:
        text += "\n\nPaired by seed, each point minus the first (accuracy differences in points):\n\n" + diff
    evals = by_eval(runs, out_dir)
    if evals:
        text += "\n\n" + evals
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(f"{title}: mean +- s.e. over seeds (accuracies in %)\n\n{text}\n")
    print(text)
    plot = curves(runs, out_dir, title)
    print(f"\nwritten: {out_dir}/results.csv, summary.csv, table.md" + (", curves.png" if plot else ""), flush=True)
    return rows


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


# ----------------------------------------------------------------------------- running

def state(run: str, storage: str) -> str:
    """finished | resumable | incomplete | new, from what the storage holds for this run."""
    from agro_dist.io.storage import Storage, join, latest_checkpoint

    st = Storage(join(storage, run))
    if st.exists("summary.json"):
        return "finished"
    if latest_checkpoint(join(storage, run, "checkpoints")):
        return "resumable"
    return "incomplete" if st.exists("config.yaml") else "new"


def collect(run: str, storage: str, out_dir: str) -> bool:
    from agro_dist.io.storage import Storage, join

    st = Storage(join(storage, run))
    if not st.exists("summary.json"):
        return False
    dest = os.path.join(out_dir, "runs", run)
    os.makedirs(dest, exist_ok=True)
    for name in RUN_FILES:  # summary.json last: its presence marks a complete copy
        if name != "summary.json" and st.exists(name):
            atomic_write(os.path.join(dest, name), st.read_text(name))
    atomic_write(os.path.join(dest, "summary.json"), st.read_text("summary.json"))
    return True


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", nargs="+", action="append", default=[], metavar=("KEY", "VALUE"),
                    help="one axis: a config key and its values (repeat for more axes)")
    ap.add_argument("--point", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                    help="one grid point given whole, e.g. --point learner.loss=agro_off learner.beta=0 (repeat for more; "
                         "crossed with any --grid axes)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="run.seed values (default: 0)")
    ap.add_argument("--p", type=float, nargs="+", default=None, help="shorthand: --grid run.replay_prob P... with --run.mode async")
    ap.add_argument("--name", default="sweep", help="run name prefix")
    ap.add_argument("--out", default=None, help="folder of the collected files, tables and plots (default: sweep-<name>)")
    ap.add_argument("--local", action="store_true", help="run here, one at a time, as python -m agro_dist processes (no job server)")
    ap.add_argument("--storage-path", default=None,
                    help="run.storage_path of the runs (a folder or a URI both this machine and the runs can reach); "
                         "default: runs with --local, else ~/agro_dist_results (the driver node's: readable here on a local cluster)")
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                    help="the Ray dashboard / job server address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    ap.add_argument("--working-dir", default=".", help="uploaded as the jobs' working directory")
    ap.add_argument("--runtime-env", default=None, help="a runtime_env YAML (deploy/runtime_env.yaml); working_dir is set by --working-dir")
    ap.add_argument("--python", default=None, help="the interpreter of the runs (default: python on a cluster, this one with --local)")
    ap.add_argument("--parallel", type=int, default=1, help="jobs in flight at once (not with --local)")
    ap.add_argument("--redo-incomplete", action="store_true", help="replace runs stopped before their first checkpoint (run.overwrite)")
    ap.add_argument("--report", action="store_true", help="run nothing: remake the tables and plots from --out")
    args = ap.parse_args(argv)
    axes = [list(a) for a in args.grid]
    if any(len(a) < 2 for a in axes):
        ap.error("--grid takes a key and at least one value")
    if any("=" not in kv for pt in args.point for kv in pt):
        ap.error("--point takes KEY=VALUE pairs")
    if args.p is not None:
        axes.append(["run.replay_prob", *(f"{p:g}" for p in args.p)])
        extra = ["--run.mode", "async", *extra]
    if args.local and args.parallel != 1:
        ap.error("--local runs one at a time")
    out_dir = os.path.abspath(args.out or f"sweep-{args.name}")
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    runs = grid_runs(args.name, axes, args.seeds, args.point)
    if "--run.storage_path" in extra:
        storage = extra[len(extra) - 1 - extra[::-1].index("--run.storage_path") + 1]
    else:
        storage = args.storage_path or ("runs" if args.local else "~/agro_dist_results")
        if args.local:
            from agro_dist.io.storage import is_remote

            storage = storage if is_remote(storage) else os.path.abspath(os.path.expanduser(storage))
        extra = [*extra, "--run.storage_path", storage]
    print(f"sweep {args.name}: {len(runs)} runs ({len(runs) // len(args.seeds)} points x {len(args.seeds)} seeds), kept in {storage}, tables in {out_dir}", flush=True)
    status: Dict[str, str] = {}
    if not args.report:
        todo = []
        for r in runs:
            if os.path.exists(os.path.join(out_dir, "runs", r["run"], "summary.json")):
                continue
            s = state(r["run"], storage)
            if s == "finished":
                collect(r["run"], storage, out_dir)
                print(f"{r['run']}: finished earlier, collected", flush=True)
            elif s == "incomplete" and not args.redo_incomplete:
                status[r["run"]] = "incomplete"
                print(f"{r['run']}: stopped before its first checkpoint; left alone (--redo-incomplete replaces it)", flush=True)
            else:
                todo.append((r, {"resumable": ["--run.resume", "true"], "incomplete": ["--run.overwrite", "true"]}.get(s, [])))
        done_before = len(runs) - len(todo) - len(status)
        print(f"{done_before} done, {len(todo)} to run" + (f", {len(status)} left alone" if status else ""), flush=True)
        runner = _run_local if args.local else _run_jobs
        status.update(runner(todo, extra, args, storage, out_dir))
    report(runs, out_dir, args.name, status)
    bad = {k: v for k, v in status.items() if v != "done"}
    for k, v in bad.items():
        print(f"{k}: {v}", file=sys.stderr)
    return 1 if bad else 0


def _command(python: str, r: Dict[str, Any], extra: List[str], more: List[str]) -> List[str]:
    return [python, "-m", "agro_dist", *extra, *r["args"], "--run.name", r["run"], *more]


def _run_local(todo, extra, args, storage, out_dir) -> Dict[str, str]:
    status = {}
    for i, (r, more) in enumerate(todo):
        cmd = _command(args.python or sys.executable, r, extra, more)
        print(f"[{i + 1}/{len(todo)}] {r['run']}: {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        proc = subprocess.Popen(cmd)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the run too: let it stop its actors and its Ray, then stop
            try:
                rc = proc.wait(timeout=120)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                proc.kill()
                rc = proc.wait()
            status[r["run"]] = "interrupted"
            print(f"{r['run']}: interrupted (exit {rc}); run the same command again to continue", flush=True)
            break
        ok = rc == 0 and collect(r["run"], storage, out_dir)
        status[r["run"]] = "done" if ok else f"exit {rc}"
        print(f"[{i + 1}/{len(todo)}] {r['run']}: {status[r['run']]} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return status


def _run_jobs(todo, extra, args, storage, out_dir) -> Dict[str, str]:
    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    runtime_env = {}
    if args.runtime_env:
        with open(args.runtime_env) as f:
            runtime_env = yaml.safe_load(f) or {}
    runtime_env["working_dir"] = args.working_dir
    status, running, todo = {}, {}, list(todo)
    while todo or running:
        while todo and len(running) < args.parallel:
            r, more = todo.pop(0)
            cmd = shlex.join(_command(args.python or "python", r, extra, more))
            job = _submit(client, entrypoint=cmd, runtime_env=runtime_env, metadata={"agro_dist_sweep": args.name, "run": r["run"]})
            print(f"submitted {job}: {r['run']}  ({cmd})", flush=True)
            running[job] = r
        time.sleep(5)
        for job, r in list(running.items()):
            st = client.get_job_status(job)
            if st not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                continue
            del running[job]
            if st != JobStatus.SUCCEEDED:
                status[r["run"]] = f"job {job} {st.value}"
                print(f"{job}: {r['run']} {st.value}; the log's end:\n{client.get_job_logs(job)[-2000:]}", flush=True)
            elif collect(r["run"], storage, out_dir):
                status[r["run"]] = "done"
                print(f"{job}: {r['run']} succeeded, collected", flush=True)
            else:
                status[r["run"]] = f"job {job} succeeded, but {storage}/{r['run']} is not readable here (give --storage-path shared by both)"
                print(f"{job}: {status[r['run']]}", flush=True)
    return status


def _submit(client, **kw) -> str:
    """submit_job, waiting up to a minute for a head that is still starting its job agent."""
    deadline = time.time() + 60
    while True:
        try:
            return client.submit_job(**kw)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
