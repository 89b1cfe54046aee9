"""The replay family at matched KL: for each `p`, the mean held-out sampled accuracy of the
evaluations at steps 20, 30, 40 (where every `p`'s KL is 3-4 per sequence) and the mean KL of
steps 16-40, each paired by seed with `p` 0 (mean +- s.e. over the seeds both finished).

    python docs/experiments/replay_kl.py [docs/experiments/replay/runs]

Reads only the committed per-run CSVs; prints a Markdown table (docs/experiments.md, Replay)."""
import csv
import glob
import os
import statistics as st
import sys

EVALS, FIRST_STEP = (20, 30, 40), 16


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def se(x):
    return st.stdev(x) / len(x) ** 0.5 if len(x) > 1 else float("nan")


def main(root):
    runs = {}  # (p, seed) -> (accuracy %, KL)
    for d in sorted(glob.glob(os.path.join(root, "replay-replay_prob*-s*"))):
        p, seed = os.path.basename(d)[len("replay-replay_prob"):].rsplit("-s", 1)
        acc = {int(r["step"]): float(r["sampled_accuracy"]) for r in rows(os.path.join(d, "eval.csv"))}
        if not all(s in acc for s in EVALS):
            continue  # unfinished
        kl = [float(r["kl"]) for r in rows(os.path.join(d, "train.csv")) if int(r["step"]) >= FIRST_STEP]
        runs[(p, int(seed))] = (100 * st.mean(acc[s] for s in EVALS), st.mean(kl))
    print(f"| p | seeds | sampled % at steps {', '.join(map(str, EVALS))} | KL steps {FIRST_STEP}-40 | paired accuracy - p 0 | paired KL - p 0 |")
    print("|---|---|---|---|---|---|")
    for p in sorted({p for p, _ in runs}, key=float):
        seeds = sorted(s for q, s in runs if q == p)
        acc, kl = [runs[(p, s)][0] for s in seeds], [runs[(p, s)][1] for s in seeds]
        both = [s for s in seeds if ("0", s) in runs]
        da = [runs[(p, s)][0] - runs[("0", s)][0] for s in both]
        dk = [runs[(p, s)][1] - runs[("0", s)][1] for s in both]
        paired = (f"{st.mean(da):+.1f} +- {se(da):.1f} ({len(da)} seeds) | {st.mean(dk):+.2f} +- {se(dk):.2f}"
                  if p != "0" and da else "- | -")
        print(f"| {p} | {len(seeds)} | {st.mean(acc):.1f} +- {se(acc):.1f} | {st.mean(kl):.2f} +- {se(kl):.2f} | {paired} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "replay", "runs"))
