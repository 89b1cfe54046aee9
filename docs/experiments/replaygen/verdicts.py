"""Verdicts (a) and (b) of docs/experiments.md's "Replay at equal generation", from the runs' files:

    python docs/experiments/replaygen/verdicts.py

(a) final sampled accuracy minus p 0's, paired by seed: mean +- standard error over seeds;
(b) for each run, the generated completions at its first evaluation at or above p 0's final
accuracy of the same seed (the goal: 30% fewer than p 0's 1280), or "never".
"""

import csv
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "deploy"))
from sweep import mean_se  # noqa: E402 (the sweep's tables use the same mean and s.e.)


def runs():
    """{point: {seed: eval rows}} from runs/<name>-s<seed>/eval.csv."""
    out = defaultdict(dict)
    for name in sorted(os.listdir(os.path.join(HERE, "runs"))):
        m = re.fullmatch(r"replaygen-(.+)-s(\d+)", name)
        path = os.path.join(HERE, "runs", name, "eval.csv")
        if m and os.path.exists(os.path.join(HERE, "runs", name, "summary.json")):
            out[m.group(1)][int(m.group(2))] = list(csv.DictReader(open(path)))
    return out


def main():
    pts = runs()
    base = pts.pop("replay_prob0-eval_every10")
    final = {s: float(rows[-1]["sampled_accuracy"]) for s, rows in base.items()}
    print("p 0 final sampled %: " + ", ".join(f"s{s} {100 * a:.1f}" for s, a in sorted(final.items())))
    print(f"{'point':45s} {'seeds':>5s} {'final - p0 (paired), points':>30s}   generated to reach p 0's final, per seed")
    for point, seeds in sorted(pts.items()):
        diffs, reach = [], []
        for s, rows in sorted(seeds.items()):
            if s not in final:
                continue
            diffs.append(100 * (float(rows[-1]["sampled_accuracy"]) - final[s]))
            hit = next((int(r["generated_samples"]) for r in rows if float(r["sampled_accuracy"]) >= final[s]), None)
            reach.append(f"s{s} {hit if hit is not None else 'never'}")
        m, se = mean_se(diffs)
        per = ", ".join(f"{d:+.1f}" for d in diffs)
        se = f"{se:.1f}" if se is not None else "-"
        print(f"{point:45s} {len(diffs):5d} {f'{m:+.1f} +- {se} [{per}]':>30s}   {', '.join(reach)}")


if __name__ == "__main__":
    main()
