"""Where a training run's memory goes: whole machine and per process, sampled through the run.

    python -m agro_dist.memory [--every 2] [--csv mem.csv] -- [training overrides ...]

Runs ``python -m agro_dist <overrides>`` (the default run without any) and samples, every
``--every`` seconds until it ends:

- the whole machine as ``free`` sees it: used = MemTotal - MemAvailable (the same figure as the
  "used" column of procps-ng 4), minus what was used before the run started;
- every process of the run by role: the driver, each Ray actor by its name (generator-0,
  learner-0, eval; the reward workers they start are counted with them), Ray's own processes
  (raylet with the object store, GCS, dashboard, agents, idle workers) and the private Redis.
  Per process its private resident memory plus mapped files (RssAnon + RssFile in
  /proc/PID/status: kernel counters, free to read); shared memory is left out of the processes
  and counted once:
- the shared-memory total (Shmem in /proc/meminfo: Ray's object store lives there).

Not the proportional set size (PSS, smaps_rollup), although it would split shared pages exactly:
reading it walks a process's page tables under its memory-map lock, and sampling it every 5 s
slowed the default run's learner steps from 13 s to 20 s (measured). Mapped files (libraries,
a model's safetensors) are counted in every process that maps them, so the roles' sum is a
little above the machine's figure.

Actors are told apart through the dashboard's state API (actor name -> pid), at the address the
run prints. At the end it prints the peak of the whole machine, each role's peak and each role at
the moment of the machine's peak; ``--csv`` keeps every sample.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from typing import Dict, List, Optional

GB = 1e9


def meminfo() -> Dict[str, float]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = float(v.split()[0]) * 1024
    return out


def machine_used() -> float:
    m = meminfo()
    return m["MemTotal"] - m["MemAvailable"]


def resident(pid: int) -> float:
    """RssAnon + RssFile of a process in bytes (its shared memory, RssShmem, is left out)."""
    out = 0.0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    out += float(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def processes() -> Dict[int, tuple]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        out[int(d)] = (ppid, cmd)
    return out


_RAY_ROLES = [("raylet", "ray: raylet + object store"), ("gcs_server", "ray: gcs"), ("dashboard", "ray: dashboard + agents"),
              ("runtime_env", "ray: dashboard + agents"), ("log_monitor", "ray: dashboard + agents"), ("monitor.py", "ray: dashboard + agents"),
              ("ray::IDLE", "ray: idle workers"), ("redis-server", "redis (buffer)")]


def role_of(pid: int, procs: Dict[int, tuple], actors: Dict[int, str], root: int) -> Optional[str]:
    """The role a process's memory is counted under, or None when it is not part of the run."""
    p, seen = pid, 0
    while p in procs and seen < 64:
        if p in actors:
            return actors[p]
        if p == root:
            break
        p, seen = procs[p][0], seen + 1
    else:
        return None  # not a descendant of the run
    if pid == root:
        return "driver"
    cmd = procs[pid][1]
    for pat, role in _RAY_ROLES:
        if pat in cmd:
            return role
    if cmd.startswith("ray::"):
        return "ray: other workers"
    # Children of a process already classified (a reward worker under the driver's Ray ...).
    parent = procs[pid][0]
    if parent != root and parent in procs:
        r = role_of(parent, procs, actors, root)
        if r and r != "driver":
            return r
    return "driver (children)"


def actor_pids(dashboard: str) -> Dict[int, str]:
    """pid -> role (the actor's name less the run name) from the dashboard's state API."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token and os.path.exists(os.path.expanduser("~/.ray/auth_token")):  # Ray's token auth (on by default)
        with open(os.path.expanduser("~/.ray/auth_token")) as f:
            token = f.read().strip()
    req = urllib.request.Request(f"{dashboard}/api/v0/actors?limit=1000&detail=1",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            data = json.load(r)
    except Exception:
        return {}
    rows = data.get("data", {}).get("result", {}).get("result", [])
    out = {}
    for a in rows:
        if a.get("pid") and a.get("name") and a.get("state") != "DEAD":  # also while the actor is being created
            m = re.search(r"(generator-\d+|learner-\d+|eval)$", a["name"])
            out[int(a["pid"])] = m.group(1) if m else a["name"]
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--csv", default=None, help="write every sample here (time, machine, shmem, one column per role)")
    ap.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then the training run's overrides")
    a = ap.parse_args(argv)
    overrides = a.overrides[1:] if a.overrides[:1] == ["--"] else a.overrides

    base, base_shm = machine_used(), meminfo()["Shmem"]
    proc = subprocess.Popen([sys.executable, "-m", "agro_dist", *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    dashboard: List[str] = []

    def pump():  # the run's output goes on to ours; the dashboard's address is read from it
        for line in proc.stdout:
            sys.stdout.write(line)
            m = re.search(r"dashboard (http://[0-9.:]+)", line)
            if m and not dashboard:
                dashboard.append(m.group(1))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    samples: List[Dict[str, float]] = []
    actors: Dict[int, str] = {}
    t0 = time.time()
    while proc.poll() is None:
        procs = processes()
        if dashboard and (not actors or any(p not in procs for p in actors) or len(samples) % 10 == 0):
            actors = actor_pids(dashboard[0]) or actors
        by_role: Dict[str, float] = defaultdict(float)
        for pid in procs:
            r = role_of(pid, procs, actors, proc.pid)
            if r:
                by_role[r] += resident(pid)
        m = meminfo()
        samples.append(dict(t=time.time() - t0, machine=m["MemTotal"] - m["MemAvailable"] - base, shmem=m["Shmem"] - base_shm,
                            **by_role))
        time.sleep(a.every)
    reader.join(timeout=5)
    rc = proc.wait()
    if not samples:
        print("no samples (the run ended at once)")
        return rc
    roles = sorted({k for s in samples for k in s} - {"t", "machine", "shmem"},
                   key=lambda r: -max(s.get(r, 0.0) for s in samples))
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t", "machine", "shmem", *roles])
            for s in samples:
                w.writerow([f"{s['t']:.1f}"] + [f"{s.get(k, 0.0) / GB:.3f}" for k in ("machine", "shmem", *roles)])
    at = max(samples, key=lambda s: s["machine"])
    print(f"\nmemory of `python -m agro_dist {' '.join(overrides)}` (exit {rc}), {len(samples)} samples every {a.every:g} s")
    print(f"whole machine (MemTotal - MemAvailable, less {base / GB:.2f} GB used before): peak {at['machine'] / GB:.2f} GB "
          f"at {at['t']:.0f} s; shared memory (object store) at that moment {at['shmem'] / GB:.2f} GB")
    print(f"{'role (anon + file RSS)':32s} {'peak GB':>8s} {'at machine peak':>16s}")
    for r in roles:
        print(f"{r:32s} {max(s.get(r, 0.0) for s in samples) / GB:8.2f} {at.get(r, 0.0) / GB:16.2f}")
    print(f"{'shared memory (object store)':32s} {max(s['shmem'] for s in samples) / GB:8.2f} {at['shmem'] / GB:16.2f}")
    print(f"{'sum at machine peak':32s} {'':8s} {(sum(at.get(r, 0.0) for r in roles) + at['shmem']) / GB:16.2f}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
