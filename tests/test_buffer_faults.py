"""The buffer under concurrency and crashes: nothing lost, nothing duplicated."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from agro_dist.buffer import RedisServer, ReplayBuffer
from groups import make_group

HERE = os.path.dirname(__file__)


def test_four_producers_two_consumers_every_group_delivered_exactly_once(redis_server, tmp_path):
    import buffer_workers as w

    ctx = mp.get_context("spawn")
    name = f"conc-{os.getpid()}"
    seconds = 3.0
    done = ctx.Event()
    prods = [ctx.Process(target=w.producer, args=(redis_server.url, name, i, seconds, str(tmp_path / f"p{i}.json"))) for i in range(4)]
    cons = [ctx.Process(target=w.consumer, args=(redis_server.url, name, i, done, str(tmp_path / f"c{i}.json"))) for i in range(2)]
    t0 = time.monotonic()
    for p in cons + prods:
        p.start()
    for p in prods:
        p.join(120)
    done.set()
    for p in cons:
        p.join(120)
    elapsed = time.monotonic() - t0
    assert all(p.exitcode == 0 for p in prods + cons), [p.exitcode for p in prods + cons]
    put = [gid for i in range(4) for gid in json.load(open(tmp_path / f"p{i}.json"))]
    got = [json.load(open(tmp_path / f"c{i}.json")) for i in range(2)]
    delivered = got[0] + got[1]
    print(f"\n4 producers for {seconds}s, 2 consumers: {len(put)} put, {len(delivered)} delivered in {elapsed:.1f}s "
          f"({len(got[0])} / {len(got[1])} per consumer)")
    assert len(put) > 400
    assert len(delivered) == len(set(delivered)) == len(put), "duplicates or losses"
    assert set(delivered) == set(put)
    assert not set(got[0]) & set(got[1])
    assert got[0] and got[1], "one consumer got nothing: not a concurrency test"
    # Each consumer saw each producer's groups in the order they were put.
    for seen in got:
        for i in range(4):
            seq = [int(g.split("-")[2]) for g in seen if g.startswith(f"g-{i}-")]
            assert seq == sorted(seq)
    with ReplayBuffer(redis_server.url, name=name) as buf:
        s = buf.stats()
        assert s["fresh_backlog"] == 0 and s["fresh_pending"] == 0 and s["acked"] == len(put)
        buf.delete()


def _start_victim(url, name, consumer, n):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "buffer_workers.py"), "victim", url, name, consumer, str(n)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )
    ids = json.loads(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return ids


@pytest.mark.parametrize("restart_as", ["same consumer name", "another consumer"])
def test_consumer_killed_before_ack_loses_nothing(redis_server, restart_as):
    name = f"crash-{os.getpid()}-{restart_as[0]}"
    with ReplayBuffer(redis_server.url, name=name) as buf:
        buf.put([make_group(i) for i in range(8)])
    taken = _start_victim(redis_server.url, name, "victim", 5)
    assert taken == [f"g-0-{i}" for i in range(5)]
    if restart_as == "same consumer name":
        # A restarted learner under its stable name gets its un-acked groups back at once.
        rescuer = ReplayBuffer(redis_server.url, name=name, consumer="victim", claim_idle_s=3600)
    else:
        # Anyone else reclaims them once they have been idle for claim_idle_s.
        rescuer = ReplayBuffer(redis_server.url, name=name, consumer="rescuer", claim_idle_s=0.5)
        time.sleep(0.6)
    with rescuer:
        b = rescuer.sample(8, p=0.0, timeout_s=5)
        assert [g.group_id for g in b.groups] == [f"g-0-{i}" for i in range(8)]
        rescuer.ack(b)
        s = rescuer.stats()
        assert s["redelivered"] == 5 and s["acked"] == 8 and s["history_groups"] == 8
        assert s["fresh_backlog"] == 0 and s["fresh_pending"] == 0
        rescuer.delete()


def test_slow_live_consumer_keeps_its_groups(redis_server):
    """Heartbeats: a consumer that samples again keeps its un-acked groups from being reclaimed."""
    name = f"slow-{os.getpid()}"
    with ReplayBuffer(redis_server.url, name=name, consumer="slow", claim_idle_s=0.5) as slow, \
         ReplayBuffer(redis_server.url, name=name, consumer="other", claim_idle_s=0.5) as other:
        slow.put([make_group(i) for i in range(6)])
        first = slow.sample(2, p=0.0, timeout_s=2)
        for _ in range(3):
            time.sleep(0.3)
            slow.sample(1, p=0.0, timeout_s=2)  # each call re-claims its in-flight entries
        b = other.sample(1, p=0.0, timeout_s=2)
        assert b.groups[0].group_id == "g-0-5"
        assert slow.ack(first) == 2
        other.delete()


@pytest.mark.parametrize("how", ["SIGKILL with appendfsync always", "clean shutdown with everysec"])
def test_redis_restart_with_aof_keeps_backlog_history_and_pending(tmp_path, how):
    fsync = "always" if how.startswith("SIGKILL") else "everysec"
    server = RedisServer(str(tmp_path), appendfsync=fsync).start()
    try:
        with ReplayBuffer(server.url, name="aof", consumer="c1") as buf:
            buf.put([make_group(i) for i in range(12)])
            buf.ack(buf.sample(4, p=0.0, timeout_s=2))  # history: 0..3
            buf.sample(2, p=0.0, timeout_s=2)  # pending for c1: 4, 5
            before = buf.stats()
        if how.startswith("SIGKILL"):
            server.kill()
        else:
            server.stop()
        assert not server.alive()
        server.start()
        with ReplayBuffer(server.url, name="aof", consumer="c1", seed=0) as buf:
            after = buf.stats()
            for k in ("fresh_backlog", "fresh_pending", "history_groups", "history_bytes", "put_groups", "acked"):
                assert after[k] == before[k], k
            assert (after["fresh_backlog"], after["fresh_pending"], after["history_groups"]) == (6, 2, 4)
            b = buf.sample(8, p=0.0, timeout_s=2)
            assert [g.group_id for g in b.groups] == [f"g-0-{i}" for i in range(4, 12)]
            # The history came back too: a batch of 4 replays (drawn without replacement) is all of it.
            assert {g.group_id for g in buf.sample(4, p=1.0).groups} == {f"g-0-{i}" for i in range(4)}
    finally:
        server.stop()
