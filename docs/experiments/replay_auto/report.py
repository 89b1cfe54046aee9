"""`run.replay_prob auto` against plain async `p` 0 with a slow generator (issue 35): the table and
plot of docs/experiments.md's "The learner never waits" from the two runs' files.

    python docs/experiments/replay_auto/report.py RUNS_DIR EVALS_DIR

RUNS_DIR holds the runs `auto-slowgen-p0-s0` and `auto-slowgen-pauto-s0` (train.csv); EVALS_DIR the
JSON of `python -m agro_dist.evaluate --out` for each checkpoint, named `eval-p{0,auto}-step_N.json`
(200 held-out problems, 4 samples, an unthrottled engine). Writes table.md and curves.png here.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import statistics as st
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(runs: str, evals: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["| run | learner steps | steps / min | learner wait (median s, total min) | step time (median s) | "
             "replayed fraction (mean) | completions generated | trained | final sampled / greedy % |", "|---|---|---|---|---|---|---|---|---|"]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    curves = []
    for p in ("0", "auto"):
        rows = list(csv.DictReader(open(os.path.join(runs, f"auto-slowgen-p{p}-s0", "train.csv"))))
        by_step = {int(r["step"]): r for r in rows}
        pts = [(0, 0.0, 0, None)]  # (step, minutes, generated, eval)
        for f in sorted(glob.glob(os.path.join(evals, f"eval-p{p}-step_*.json"))):
            step = int(re.search(r"step_(\d+)", f).group(1))
            r = by_step.get(step)
            if r is not None:
                pts.append((step, float(r["elapsed_s"]) / 60, int(float(r["generated_samples"])), json.load(open(f))))
        base = next(iter(sorted(glob.glob(os.path.join(evals, "eval-base.json")))), None)
        if base:
            pts[0] = (0, 0.0, 0, json.load(open(base)))
        pts = [x for x in pts if x[3] is not None]
        curves.append((p, pts))
        wait = [float(r["wait_s"] or 0) for r in rows]
        last = rows[-1]
        mins = float(last["elapsed_s"]) / 60
        fin = pts[-1][3] if pts else None
        lines.append(f"| `p` {p} | {len(rows)} | {len(rows) / mins:.2f} | {st.median(wait):.1f}, {sum(wait) / 60:.1f} | "
                     f"{st.median(float(r['step_s']) for r in rows):.1f} | {st.mean(float(r['replay_fraction'] or 0) for r in rows):.2f} | "
                     f"{int(float(last['generated_samples']))} | {int(float(last['samples']))} | "
                     + (f"{100 * fin['sampled_accuracy']:.1f} / {100 * fin['greedy_accuracy']:.1f} (step {pts[-1][0]})" if fin else "-") + " |")
    for p, pts in curves:
        for a, i, lab in ((ax[0], 1, "minutes of training"), (ax[1], 2, "completions generated"), (ax[2], 0, "learner step")):
            a.plot([x[i] for x in pts], [100 * x[3]["sampled_accuracy"] for x in pts], "o-", label=f"p {p}")
            a.set_xlabel(lab)
            a.set_ylabel("held-out sampled accuracy %")
            a.grid(alpha=0.3)
            a.legend()
    fig.suptitle("replay_prob auto vs async p 0, slow generator (vLLM max_num_seqs 2), SmolLM2-135M, arithmetic 2-3, seed 0")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "curves.png"), dpi=90)
    evals_table = ["", "| run | step | minutes | generated | sampled % | greedy % |", "|---|---|---|---|---|---|"]
    for p, pts in curves:
        for step, m, g, e in pts:
            evals_table.append(f"| `p` {p} | {step} | {m:.1f} | {g} | {100 * e['sampled_accuracy']:.1f} | {100 * e['greedy_accuracy']:.1f} |")
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write("\n".join(lines + evals_table) + "\n")
    print("\n".join(lines + evals_table))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
