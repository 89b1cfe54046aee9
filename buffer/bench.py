"""Replay-buffer throughput and latency, side by side with raw Redis on the same bytes.

    python -m agro_dist.buffer.bench [--quick]

For each group shape (n completions x tokens each) and transport (the embedded server over
its unix socket, and TCP on 127.0.0.1), it times:

- ``put``: ``ReplayBuffer.put`` of ``--batch`` groups per call (validate, Arrow-encode, one
  pipelined round trip), against raw pipelined ``XADD`` of the same pre-encoded bytes;
- ``sample+ack``: ``sample(--batch, p=0)`` then ``ack`` (read, Arrow-decode and validate, then
  the Lua script that acks them into the history), against raw ``XREADGROUP`` + ``XACK`` +
  ``XDEL`` of the same entries (no decode, no history).

It prints groups/s, MB/s, per-call p50/p99 latency, the ratio to raw, and where the time goes
(encode and decode per group, measured alone).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from agro_dist.core.records import Completion, Group, decode_groups, encode_group, encode_groups

from .client import connect
from .replay import CONSUMER_GROUP, ReplayBuffer
from .server import RedisServer


def make_groups(count: int, n: int, tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        comps = [
            Completion(rng.integers(0, 50_000, tokens, dtype=np.int32), -rng.exponential(1.0, tokens).astype(np.float32),
                       float(rng.integers(0, 2)), "stop", "")
            for _ in range(n)
        ]
        out.append(Group(f"p{i}", "prompt text " * 20, rng.integers(0, 50_000, 128).tolist(), comps, 3, "bench", {"answer": "42"}))
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _best(fn, repeat=5, number=16):
    """Seconds per call, best of ``repeat`` runs of ``number`` calls (warm caches)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best


def _ours(url, name, groups, batch):
    buf = ReplayBuffer(url, name=name, consumer="bench", history_max_groups=4 * batch, timeout_s=10)
    res = {}
    try:
        for op in ("put", "sample+ack"):
            lat = []
            t0 = time.perf_counter()
            for i in range(0, len(groups), batch):
                t = time.perf_counter()
                if op == "put":
                    buf.put(groups[i:i + batch])
                else:
                    buf.ack(buf.sample(batch, p=0.0))
                lat.append(time.perf_counter() - t)
            res[op] = (time.perf_counter() - t0, lat)
    finally:
        buf.delete()
        buf.close()
    return res


def _raw(url, name, blobs, batch):
    """The same bytes through the same stream and consumer-group commands, nothing else."""
    r = connect(url)  # the same client the buffer uses
    key = f"{{{name}}}:raw"
    r.delete(key)
    r.xgroup_create(key, CONSUMER_GROUP, id="0", mkstream=True)
    res = {}
    try:
        lat = []
        t0 = time.perf_counter()
        for i in range(0, len(blobs), batch):
            t = time.perf_counter()
            pipe = r.pipeline(transaction=False)
            for blob in blobs[i:i + batch]:
                pipe.xadd(key, {"d": blob, "v": 3})
            pipe.execute()
            lat.append(time.perf_counter() - t)
        res["put"] = (time.perf_counter() - t0, lat)
        lat = []
        t0 = time.perf_counter()
        for _ in range(0, len(blobs), batch):
            t = time.perf_counter()
            ids = [e[0] for e in r.xreadgroup(CONSUMER_GROUP, "raw", {key: ">"}, count=batch)[0][1]]
            pipe = r.pipeline(transaction=False)
            pipe.xack(key, CONSUMER_GROUP, *ids)
            pipe.xdel(key, *ids)
            pipe.execute()
            lat.append(time.perf_counter() - t)
        res["sample+ack"] = (time.perf_counter() - t0, lat)
    finally:
        r.delete(key)
        r.close()
    return res


def run_shape(url: str, n: int, tokens: int, batch: int, target_mb: float, rounds: int):
    """Best of ``rounds`` interleaved runs (ours, then raw) for each op: the machine is shared
    by client and server, so single runs are noisy."""
    size = encode_group(make_groups(1, n, tokens)[0]).size
    count = int(np.clip(target_mb * 2**20 / size, 4 * batch, 4000)) // batch * batch
    groups = make_groups(count, n, tokens, seed=1)
    blobs = [memoryview(encode_group(g)) for g in groups]
    enc = _best(lambda: encode_groups(groups[:batch])) / batch  # as put() does it
    dec = _best(lambda: decode_groups(blobs[:batch])) / batch  # as sample() does it
    best: dict = {}
    for k in range(rounds):
        name = f"bench-{os.getpid()}-{n}-{tokens}-{k}"
        for kind, res in (("", _ours(url, name, groups, batch)), ("raw ", _raw(url, name, blobs, batch))):
            for op, (secs, lat) in res.items():
                if kind + op not in best or secs < best[kind + op][0]:
                    best[kind + op] = (secs, lat)
    return size, count, enc, dec, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agro_dist.buffer.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="groups per put / sample call (default: %(default)s)")
    ap.add_argument("--mb", type=float, default=48.0, help="approximate MB moved per shape and op (default: %(default)s)")
    ap.add_argument("--aof", action="store_true", help="append-only persistence on (everysec); off by default "
                    "because AOF rewrites land at random points and swamp the comparison")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best kept (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="two shapes, 8 MB each, one round (a smoke run)")
    a = ap.parse_args(argv)
    shapes = [(4, 512), (16, 4096)] if a.quick else [(4, 512), (4, 4096), (16, 512), (16, 4096)]
    mb = 8.0 if a.quick else a.mb
    server = RedisServer(appendonly=a.aof, appendfsync="everysec").start()
    transports = [("unix socket", server.unix_url), ("tcp", server.url)]
    aof = "AOF everysec" if a.aof else "no AOF"
    print(f"redis-server {server.executable}, {aof}, batch={a.batch} groups per call, best of {1 if a.quick else a.rounds} rounds\n")
    hdr = f"{'transport':11} {'n':>3} {'tokens':>6} {'KB/group':>8} {'op':>10} {'groups/s':>9} {'MB/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'raw g/s':>8} {'raw MB/s':>8} {'ratio':>6}"
    print(hdr)
    print("-" * len(hdr))
    notes = []
    try:
        for tname, url in transports:
            for n, tokens in shapes:
                size, count, enc, dec, res = run_shape(url, n, tokens, a.batch, mb, 1 if a.quick else a.rounds)
                for op in ("put", "sample+ack"):
                    secs, lat = res[op]
                    rsecs, _ = res["raw " + op]
                    gps, rgps = count / secs, count / rsecs
                    print(f"{tname:11} {n:3d} {tokens:6d} {size / 1024:8.1f} {op:>10} {gps:9.0f} {gps * size / 2**20:7.1f} "
                          f"{statistics.median(lat) * 1e3:7.2f} {pct(lat, 0.99) * 1e3:7.2f} {rgps:8.0f} {rgps * size / 2**20:8.1f} {rgps / gps:5.2f}x")
                if tname == transports[0][0]:
                    notes.append(f"  n={n:2d} x {tokens:4d} tokens ({size / 1024:.0f} KB): encode+validate {enc * 1e3:.2f} ms/group, "
                                 f"decode+validate {dec * 1e3:.2f} ms/group")
    finally:
        server.stop()
    print("\nratio = buffer time / raw Redis time for the same groups (1.00x = as fast as raw; the aim is <= 2x).")
    print(f"Where the time goes: Arrow + validation alone, warm, per group, in calls of {a.batch} groups")
    print("(the rest of a call is Redis and redis-py, about the raw column's time, plus the Lua ack):")
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
