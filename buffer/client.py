"""The one place Redis clients are made: read deadlines that cover each command's own wait.

A Redis client has one read timeout for every reply (redis-py 8's default is 5 s). A blocking
command such as ``XREADGROUP ... BLOCK 60000`` legitimately sends no reply for up to its block
time, so with a fixed timeout any wait longer than 5 s fails with ``TimeoutError: Timeout reading
from socket`` (issue 15: an async run whose learner waited for the generator's first groups).
Turning the timeout off instead would leave a hung or unreachable server undetected forever.

``connect(url)`` gives a ``redis.Redis`` whose connections read each reply with the deadline
``socket_timeout + the command's own blocking time`` (``BLOCK`` of XREAD/XREADGROUP, the timeout
of BLPOP/BRPOP/BLMOVE/BZPOPMIN/..., WAIT), for single commands and pipelines alike. So:

- a wait of any length up to the caller's own deadline works, whatever the library defaults are;
- a dead Redis is still noticed promptly: a killed server closes the socket (an error after ~10 s
  of reconnect attempts, time for the driver to start its private Redis again),
  a hung one misses its reply deadline by ``socket_timeout`` (``DEFAULT_SOCKET_TIMEOUT_S`` unless
  the URL or the caller sets ``socket_timeout``), and a lost host or network is found by TCP
  keepalive probes within ~``KEEPALIVE`` seconds even in the middle of a long block.

Tested against redis-py 5.2.1, 7.4.1 and 8.1.0 (``pyproject.toml`` declares ``redis>=5,<9``).
"""

from __future__ import annotations

import collections
import math
import socket
from typing import Any, Deque, Optional, Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.retry import Retry

DEFAULT_SOCKET_TIMEOUT_S = 10.0  # a reply (beyond the command's own blocking time) later than this: the server is hung
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# A dropped connection is retried 6 times within ~10 s (0.5, 1, 2, 2, 2, 2 s apart): long enough
# for a restarting server (the driver starts its private Redis again from the AOF within ~1 s) or a
# network blip; a reply deadline missed is not retried: the server is hung, and a retried blocking
# read would wait its whole block time again. (redis-py 8's own default retries timeouts too, up to ~30 s.)
RETRIES, BACKOFF_BASE_S, BACKOFF_CAP_S = 6, 0.25, 2.0
# TCP keepalive: first probe after 5 s idle, then every 2 s, give up after 3 unanswered (~11 s).
KEEPALIVE = {"TCP_KEEPIDLE": 5, "TCP_KEEPINTVL": 2, "TCP_KEEPCNT": 3}


def _num(x: Any) -> float:
    return float(x.decode() if isinstance(x, bytes) else x)


def blocking_seconds(args: Sequence[Any]) -> float:
    """How long the server may legitimately wait before replying to this command (``inf`` for
    a block without a limit, 0 for commands that answer at once)."""
    if not args:
        return 0.0
    name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
    name = name.upper()
    try:
        if name in ("XREAD", "XREADGROUP"):
            up = [a.decode().upper() if isinstance(a, bytes) else str(a).upper() for a in args]
            if "BLOCK" not in up:
                return 0.0
            ms = _num(args[up.index("BLOCK") + 1])
            return math.inf if ms == 0 else ms / 1000.0
        if name in ("BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BZPOPMIN", "BZPOPMAX"):
            s = _num(args[-1])  # the timeout is the last argument, in seconds
        elif name in ("BLMPOP", "BZMPOP"):
            s = _num(args[1])
        elif name == "WAIT":
            s = _num(args[2]) / 1000.0
        elif name == "WAITAOF":
            s = _num(args[3]) / 1000.0
        else:
            return 0.0
    except (IndexError, ValueError):
        return 0.0
    return math.inf if s == 0 else s


class _DeadlineMixin:
    """Reads each reply with ``socket_timeout`` plus the blocking time of the command it answers.

    Replies come back in the order commands were sent, so the extra waits are kept in a FIFO:
    one entry per command, appended once the command is on the wire (a health-check PING or a
    reconnect's handshake sent in between adds and consumes its own entries first)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._waits: Deque[float] = collections.deque()
        self._staged: list = []

    def send_command(self, *args, **kw):
        wait = blocking_seconds(args)
        super().send_command(*args, **kw)
        self._waits.append(wait)

    def pack_commands(self, commands):
        self._staged = [blocking_seconds(c) for c in commands]
        return super().pack_commands(commands)

    def send_packed_command(self, command, check_health=True):
        staged, self._staged = self._staged, []
        super().send_packed_command(command, check_health=check_health)
        self._waits.extend(staged)

    def read_response(self, *a, **kw):
        extra = self._waits.popleft() if self._waits else 0.0
        sock = getattr(self, "_sock", None)
        if not extra or sock is None or self.socket_timeout is None:
            return super().read_response(*a, **kw)
        sock.settimeout(None if math.isinf(extra) else self.socket_timeout + extra)
        try:
            return super().read_response(*a, **kw)
        finally:
            if getattr(self, "_sock", None) is sock:  # still connected: back to the plain deadline
                sock.settimeout(self.socket_timeout)

    def disconnect(self, *a, **kw):
        self._waits.clear()
        self._staged = []
        return super().disconnect(*a, **kw)


class DeadlineConnection(_DeadlineMixin, Connection):
    pass


class DeadlineSSLConnection(_DeadlineMixin, SSLConnection):
    pass


class DeadlineUnixConnection(_DeadlineMixin, UnixDomainSocketConnection):
    pass


def _keepalive_options() -> dict:
    return {getattr(socket, k): v for k, v in KEEPALIVE.items() if hasattr(socket, k)}


def connect(url: str, **kw: Any) -> redis.Redis:
    """A ``redis.Redis`` for ``url`` (``redis://``, ``rediss://``, ``unix://``) with deadline-aware
    reads. Options in the URL's query (``?socket_timeout=30``) or in ``kw`` override the defaults
    here; ``kw`` wins over the URL, as in ``redis.Redis.from_url``."""
    from urllib.parse import parse_qs, urlparse

    u = urlparse(url)
    in_url = set(parse_qs(u.query))
    cls = {"unix": DeadlineUnixConnection, "rediss": DeadlineSSLConnection}.get(u.scheme, DeadlineConnection)
    opts: dict = {"connection_class": cls}
    defaults = {"socket_timeout": DEFAULT_SOCKET_TIMEOUT_S, "socket_connect_timeout": DEFAULT_CONNECT_TIMEOUT_S,
                "retry": Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), RETRIES,
                               supported_errors=(redis.ConnectionError,))}
    if cls is not DeadlineUnixConnection:  # keepalive is a TCP option
        defaults.update(socket_keepalive=True, socket_keepalive_options=_keepalive_options())
    for k, v in defaults.items():
        if k not in in_url:
            opts[k] = v
    opts.update(kw)
    return redis.Redis.from_url(url, **opts)


def socket_timeout_of(client: redis.Redis) -> Optional[float]:
    """The plain read deadline of a client's connections (tests, diagnostics)."""
    return client.connection_pool.connection_kwargs.get("socket_timeout")
