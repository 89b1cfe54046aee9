"""Blocking reads wait up to their own deadline whatever the client library's default timeouts
are, and a dead or hung Redis is still noticed promptly (issue 15).

redis-py 8 reads every reply with a 5 s socket timeout by default; before ``buffer/client.py`` a
learner waiting longer than that for fresh groups died with ``TimeoutError: Timeout reading from
socket``. Every test here uses a real Redis server.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from agro_dist.buffer import RedisServer, ReplayBuffer
from agro_dist.buffer.client import blocking_seconds, connect, socket_timeout_of
from groups import make_group


def _put_later(url: str, name: str, delay_s: float, count: int) -> threading.Thread:
    def run():
        time.sleep(delay_s)
        with ReplayBuffer(url, name=name) as prod:
            prod.put([make_group(i) for i in range(count)])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _library_default_timeout() -> float:
    """redis-py's own default read timeout (5 s in 8.x; None = no timeout in 5.x)."""
    return redis.Redis().connection_pool.connection_kwargs.get("socket_timeout") or 0.0


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_consumer_waiting_longer_than_the_clients_default_timeout_gets_its_groups(redis_server, transport):
    url = redis_server.url if transport == "tcp" else redis_server.unix_url
    name = f"wait-{transport}-{os.getpid()}"
    delay = 8.0  # longer than redis-py 8's 5 s default and than a 5 s ping timeout
    assert delay > _library_default_timeout()
    buf = ReplayBuffer(url, name=name, timeout_s=60)
    try:
        t = _put_later(url, name, delay, 4)
        batch = buf.sample(4, p=0.0)
        t.join()
        assert len(batch) == 4 and batch.waited_s >= delay - 0.5
        assert buf.ack(batch) == 4
    finally:
        buf.delete()
        buf.close()


def test_a_wait_longer_than_a_short_socket_timeout_in_the_url_works(redis_server):
    # The user's own read timeout (1 s) bounds how late a reply may be, not how long a command
    # may block by design: a 3 s wait for fresh data still works.
    url = redis_server.url + "?socket_timeout=1"
    name = f"short-{os.getpid()}"
    buf = ReplayBuffer(url, name=name, timeout_s=30)
    assert socket_timeout_of(buf.r) == 1.0
    try:
        t = _put_later(redis_server.url, name, 3.0, 2)
        batch = buf.sample(2, p=0.0)
        t.join()
        assert len(batch) == 2 and batch.waited_s >= 2.5
        # The connection is back on its plain deadline after the long read.
        assert buf.r.ping()
    finally:
        buf.delete()
        buf.close()


def test_a_killed_redis_is_noticed_within_seconds_during_a_long_block(tmp_path):
    server = RedisServer(str(tmp_path / "r"), appendonly=False).start()
    buf = ReplayBuffer(server.url, name="dead", timeout_s=120)
    try:
        threading.Timer(1.0, server.kill).start()
        t0 = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            buf.sample(1, p=0.0)
        # Not the 120 s the sample may block: the closed socket is noticed, six reconnects fail (~10 s of backoff).
        assert time.monotonic() - t0 < 15, time.monotonic() - t0
    finally:
        server.stop()
        buf.r.close()


def test_a_hung_redis_misses_its_reply_deadline(tmp_path):
    server = RedisServer(str(tmp_path / "r"), appendonly=False).start()
    buf = ReplayBuffer(server.url + "?socket_timeout=1", name="hung", timeout_s=2)
    assert buf.r.ping()  # connected before the server stops
    try:
        os.kill(server.proc.pid, signal.SIGSTOP)  # alive to TCP, answers nothing
        t0 = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            buf.sample(1, p=0.0)
        # The block (2 s) plus the reply margin (1 s), not forever and not retried.
        assert time.monotonic() - t0 < 6, time.monotonic() - t0
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
        buf.r.close()


def test_pipelines_read_each_reply_with_its_own_commands_deadline(redis_server):
    r = connect(redis_server.url + "?socket_timeout=1")
    key = f"pl-{os.getpid()}"
    try:
        r.delete(key)
        threading.Timer(2.5, lambda: connect(redis_server.url).rpush(key, "x")).start()
        pipe = r.pipeline(transaction=False)
        pipe.ping()
        pipe.blpop([key], timeout=10)  # waits ~2.5 s, longer than the 1 s socket timeout
        pipe.ping()
        t0 = time.monotonic()
        res = pipe.execute()
        assert res[0] is True and res[1] == (key.encode(), b"x") and res[2] is True
        assert time.monotonic() - t0 >= 2
    finally:
        r.delete(key)
        r.close()


def test_blocking_seconds_reads_each_commands_own_wait():
    assert blocking_seconds(("XREADGROUP", "GROUP", "g", "c", "COUNT", 4, "BLOCK", 8000, "STREAMS", "s", ">")) == 8.0
    assert blocking_seconds((b"XREAD", b"block", b"0", b"STREAMS", b"s", b"$")) == float("inf")
    assert blocking_seconds(("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">")) == 0.0
    assert blocking_seconds(("BLPOP", "a", "b", 3)) == 3.0
    assert blocking_seconds(("BZMPOP", 1.5, 1, "z", "MIN")) == 1.5
    assert blocking_seconds(("WAIT", 1, 250)) == 0.25
    assert blocking_seconds(("GET", "k")) == 0.0 and blocking_seconds(()) == 0.0
