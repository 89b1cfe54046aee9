"""Shared fixtures: one real Redis server per test session (no mocks), a fresh buffer name per test."""

import itertools
import os

import pytest

from agro_dist.buffer import RedisServer, ReplayBuffer

_names = itertools.count()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(str(tmp_path_factory.mktemp("redis")), appendfsync="everysec").start()
    yield server
    server.stop()


@pytest.fixture
def make_buffer(redis_server):
    """Buffers on the session's server, each test under its own key prefix; keys removed after."""
    made = []

    def make(name=None, url=None, **cfg):
        name = name or f"t{os.getpid()}-{next(_names)}"
        buf = ReplayBuffer(url or redis_server.url, name=name, **cfg)
        made.append(buf)
        return buf

    yield make
    for b in made:
        b.delete()
        b.close()
