"""Replay-ratio sweep: one Ray job per replay probability p, then a table of the results.

    python deploy/sweep.py --address http://127.0.0.1:8265 --p 0 0.25 0.5 0.75 -- \\
        --config my.yaml --run.steps 40

Everything after ``--`` goes to every job's ``python -m agro_dist``; the sweep adds
``--run.mode async --run.replay_prob P --run.name <prefix>-p<P>``. Jobs run one at a time by
default (``--parallel`` for a cluster with room for several). The table is read from each
job's log (the driver's ``AGRO_RESULT`` line), so it works wherever the jobs ran; it is also
written to ``<out>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                    help="the Ray dashboard / job server address (default: RAY_ADDRESS or http://127.0.0.1:8265)")
    ap.add_argument("--p", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75], help="replay probabilities")
    ap.add_argument("--name", default="sweep", help="run name prefix")
    ap.add_argument("--working-dir", default=".", help="uploaded as the jobs' working directory")
    ap.add_argument("--runtime-env", default=None, help="a runtime_env YAML (deploy/runtime_env.yaml); working_dir is set by --working-dir")
    ap.add_argument("--python", default="python", help="the interpreter on the cluster")
    ap.add_argument("--parallel", type=int, default=1, help="jobs in flight at once")
    ap.add_argument("--out", default="sweep", help="table file prefix (writes <out>.csv)")
    args = ap.parse_args(argv)

    import yaml
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    runtime_env = {}
    if args.runtime_env:
        with open(args.runtime_env) as f:
            runtime_env = yaml.safe_load(f) or {}
    runtime_env["working_dir"] = args.working_dir
    todo = list(args.p)
    running, results = {}, {}
    while todo or running:
        while todo and len(running) < args.parallel:
            p = todo.pop(0)
            tag = f"{args.name}-p{p:g}"
            cmd = " ".join([args.python, "-m", "agro_dist", *map(_quote, extra), "--run.mode", "async", "--run.replay_prob", str(p),
                            "--run.name", tag])
            job = client.submit_job(entrypoint=cmd, runtime_env=runtime_env, metadata={"agro_dist_sweep": args.name, "p": str(p)})
            print(f"submitted {job}: p={p:g}  ({cmd})", flush=True)
            running[job] = p
        time.sleep(5)
        for job, p in list(running.items()):
            status = client.get_job_status(job)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                del running[job]
                logs = client.get_job_logs(job)
                line = next((x for x in reversed(logs.splitlines()) if x.startswith("AGRO_RESULT ")), None)
                results[p] = dict(job=job, status=str(status), **(json.loads(line[len("AGRO_RESULT "):]) if line else {}))
                print(f"{job}: p={p:g} {status}", flush=True)
    rows = []
    for p in args.p:
        r = results[p]
        ok = "after" in r
        rows.append(dict(p=p, job=r["job"], status=r["status"].split(".")[-1],
                         before=r["before"]["sampled_accuracy"] if ok else None, after=r["after"]["sampled_accuracy"] if ok else None,
                         greedy_after=r["after"]["greedy_accuracy"] if ok else None, steps=r.get("steps"), samples=r.get("samples"),
                         minutes=r["elapsed_s"] / 60 if ok else None, replayed_groups=r.get("replay_served"),
                         stale_skipped=r.get("stale_skipped")))
    print()
    print(table(rows))
    with open(f"{args.out}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"\nwritten: {args.out}.csv")
    return 0 if all(r["status"] == "SUCCEEDED" for r in rows) else 1


def table(rows) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:5.1f}%"

    lines = ["   p | status    | sampled acc before -> after | greedy after | steps | samples | minutes | replayed | stale skipped",
             "-----|-----------|-----------------------------|--------------|-------|---------|---------|----------|--------------"]
    for r in rows:
        mins = "-" if r["minutes"] is None else f"{r['minutes']:.1f}"
        lines.append(f"{r['p']:4g} | {r['status']:<9} | {pct(r['before']):>12} -> {pct(r['after']):<12} | {pct(r['greedy_after']):>12} | "
                     f"{r['steps'] or '-':>5} | {r['samples'] or '-':>7} | {mins:>7} | {r['replayed_groups'] or 0:>8} | {r['stale_skipped'] or 0:>13}")
    return "\n".join(lines)


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


if __name__ == "__main__":
    sys.exit(main())
