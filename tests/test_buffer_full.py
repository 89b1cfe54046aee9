"""A full Redis (``maxmemory`` reached, ``noeviction``) against the real server: every buffer
operation still runs, a put evicts the oldest history or waits for the learner (backpressure),
and no group is lost or half-moved. The same tests pass on Redis 7 (``AGRO_REDIS_SERVER``)."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from agro_dist.buffer import BufferFull, BufferTimeout, RedisServer, ReplayBuffer
from groups import make_group

MB = 1 << 20


@pytest.fixture
def full_server(tmp_path):
    """A private Redis whose limit is 2 MB above what it uses empty (about 100 groups of ~20 KB)."""
    server = RedisServer(str(tmp_path / "redis")).start()
    c = server.client()
    used = int(c.info("memory")["used_memory"])
    c.execute_command(server.config_command, "SET", "maxmemory", str(used + 2 * MB))
    c.execute_command(server.config_command, "SET", "maxmemory-policy", "noeviction")
    c.close()
    yield server
    server.stop()


def over_the_limit(server):
    with server.client() as c:
        c.execute_command(server.config_command, "SET", "maxmemory", str(int(c.info("memory")["used_memory"]) - 32 * 1024))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            c.hincrby("{full}:stats", "x", 1)


def big_group(i: int, version: int = 0):
    return make_group(i, version=version, tokens=512, seed=5)  # ~20 KB of Arrow


def conserved(s):
    """Every group put is trained on, waiting, or skipped as stale; every group trained on is in
    the history or was evicted (by the caps, the window, the replay cap or a full Redis)."""
    assert s["fresh_pending"] == 0, s
    assert s["put_groups"] == s["acked"] + s["fresh_backlog"] + s["stale_skipped"], s
    gone = s["evicted"] + s["evicted_window"] + s["retired"] + s["evicted_full"]
    assert s["history_groups"] == s["acked"] - gone, s


def test_every_operation_runs_on_a_full_redis_and_a_put_evicts_the_oldest_history(full_server):
    buf = ReplayBuffer(full_server.url, name="full", seed=0, room_timeout_s=0.5, max_staleness=3)
    i = 0
    with pytest.raises(BufferFull, match="memory is full of groups not yet trained on"):
        while True:  # fresh groups until Redis is full: with no history to evict, the put waits, then says so
            buf.put(big_group(i))
            i += 1
    put = i
    assert put > 20
    s = buf.stats()
    assert s["memory_bytes"] > s["memory_limit_bytes"] - 64 * 1024 and s["put_groups"] == put and s["evicted_full"] == 0
    # A put is refused while its own 20 KB wait in Redis's input buffer: what is stored is a little
    # under the limit, so small writes would still fit. Put the limit just under what is used, so
    # that every write that may grow memory is refused (a plain HINCRBY included).
    over_the_limit(full_server)

    # Memory is full: sampling (with its counters), acking into the history, replay draws and the
    # skipping of stale groups all still run.
    b = buf.sample(8, p=0.0, current_version=0, timeout_s=5)
    assert buf.ack(b) == 8
    b = buf.sample(8, replay_groups=4, batch_index=1, current_version=1, timeout_s=5)
    assert b.num_replayed == 4 and buf.ack(b) == 4
    s = buf.stats()
    assert s["history_groups"] == 12 and s["served_replay"] == 4 and s["acked"] == 12

    # A put makes room by evicting the oldest history (here all of it: the 12 groups trained on).
    over_the_limit(full_server)  # again: what the steps above added (Redis 7 holds on to some of it)
    full_before = s["put_full"]
    buf.put(big_group(put))
    s = buf.stats()
    assert 0 < s["evicted_full"] <= 12 and s["put_full"] == full_before + 1 and s["put_wait_s"] > 0
    assert s["history_groups"] == 12 - s["evicted_full"]

    # Stale fresh groups are skipped (acked, deleted, counted) on a full Redis too.
    with pytest.raises(BufferTimeout):
        buf.sample(4, p=0.0, current_version=7, timeout_s=0.5)
    s = buf.stats()
    assert s["stale_skipped"] == put + 1 - 12 and s["fresh_backlog"] == 0
    conserved(s)
    buf.close()


def test_a_producer_faster_than_the_learner_is_held_back_and_nothing_is_lost(full_server):
    """Producers put 240 groups (~5 MB through a 2 MB Redis) while a slower learner trains with
    replay: the oldest history makes room, the producer waits when there is none, every group put
    is trained on exactly once, and Redis stays near its limit."""
    total = 240
    prod = ReplayBuffer(full_server.url, name="flow", seed=0, room_timeout_s=60)
    learner = ReplayBuffer(full_server.url, name="flow", seed=0, consumer="learner-0")
    errors, peak = [], [0]

    def produce():
        try:
            for i in range(0, total, 4):
                prod.put([big_group(j, version=i // 16) for j in range(i, i + 4)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=produce)
    t.start()
    seen, step = [], 0
    while len(seen) < total:
        f, r = min(6, total - len(seen)), 2 if step else 0  # 6 fresh and 2 replayed a step
        b = learner.sample(f + r, replay_groups=r, batch_index=step, current_version=step // 2, timeout_s=60)
        time.sleep(0.02)  # "training"
        learner.ack(b)
        seen += [it.group.group_id for it in b.items if it.source == "fresh"]
        step += 1
        peak[0] = max(peak[0], learner.stats()["memory_bytes"])
    t.join(60)
    assert not errors, errors
    assert sorted(seen) == sorted(f"g-5-{j}" for j in range(total))  # each exactly once
    s = learner.stats()
    conserved(s)
    assert s["put_groups"] == s["acked"] == total and s["evicted_full"] > 0 and s["put_full"] > 0
    assert peak[0] < s["memory_limit_bytes"] + 1 * MB, (peak[0], s["memory_limit_bytes"])
    prod.close()
    learner.close()
