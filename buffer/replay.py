"""The replay buffer: groups of completions in Redis, as Arrow IPC, sampled with a replay probability.

Layout in Redis (all keys share the hash tag ``{name}`` so the Lua scripts work on a cluster):

- ``{name}:groups``: a Stream holding every group's payload (``d`` = Arrow IPC bytes, ``v`` =
  policy version), fresh and history alike, so a group is written once and never copied.
  Producers ``XADD``. Consumers read new entries through the consumer group ``learners``: each
  goes to exactly one consumer and stays *pending* until acked; if its consumer dies it is
  re-delivered (``XAUTOCLAIM`` after ``claim_idle_s``; a consumer restarted under the same name
  re-reads its own pending entries first).
- ``{name}:hist:z`` (ZSET of entry ids, score = arrival order) and ``{name}:hist:size`` (HASH
  id -> bytes): the replay history, i.e. the groups consumed so far. ``ack`` moves entries
  into it atomically (Lua: ``XACK`` + ``ZADD``) and evicts the oldest beyond
  ``history_max_groups`` / ``history_max_bytes`` (``XDEL``). Replay draws are uniform: the
  client draws ``u ~ U[0,1)`` from its seeded RNG and the script takes rank ``floor(u * size)``.
- ``{name}:stats``: counters (HASH) for monitoring; ``{name}:dead``: corrupt payloads, kept
  for inspection (capped stream).

Sampling (``sample(num_groups, p)``): each slot independently is a replayed group with
probability ``p``, else the oldest fresh group not yet taken. ``p = 0`` streams on-policy
data, ``p = 1`` replays only (fresh data is used while the history is still empty).

One ``ReplayBuffer`` object per thread; any number of processes and machines may share a
buffer through the same Redis and ``name``.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Union

import pyarrow as pa
import redis

from agro_dist.records import Group, RecordError, batch_to_ipc, decode_groups, encode_groups, rows_to_groups

from .client import connect
from .server import RedisServer

log = logging.getLogger("agro_dist.buffer")

CONSUMER_GROUP = "learners"

# KEYS: stream, hist_z, hist_size, stats. ARGV: group, max_count, max_bytes, counter, id1, size1, ...
# Ack entries and add them to the history (their payload stays where it is), then evict the
# oldest beyond the caps. XACK returns 0 for an entry no longer pending (acked already by a
# consumer that reclaimed it): it is in the history already and must not enter twice.
_ACK_ARCHIVE = """
local stream, z, sizes, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local grp, max_count, max_bytes, counter = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local archived = 0
for i = 5, #ARGV, 2 do
  local id, size = ARGV[i], tonumber(ARGV[i + 1])
  if redis.call('XACK', stream, grp, id) == 1 then
    local seq = redis.call('HINCRBY', stats, 'hist_seq', 1)
    redis.call('ZADD', z, seq, id)
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
  redis.call('XDEL', stream, m)
  evicted = evicted + 1
end
if evicted > 0 then redis.call('HINCRBY', stats, 'evicted', evicted) end
if archived > 0 then redis.call('HINCRBY', stats, counter, archived) end
return {archived, evicted}
"""

# KEYS: hist_z, stream. ARGV: u_1..u_k in [0, 1). Returns id, payload pairs (none if empty).
_REPLAY_DRAW = """
local n = redis.call('ZCARD', KEYS[1])
local out = {}
if n == 0 then return out end
for i = 1, #ARGV do
  local idx = math.floor(tonumber(ARGV[i]) * n)
  if idx >= n then idx = n - 1 end
  local m = redis.call('ZRANGE', KEYS[1], idx, idx)[1]
  local e = redis.call('XRANGE', KEYS[2], m, m)
  local payload = ''
  if #e == 1 then
    local f = e[1][2]
    for j = 1, #f, 2 do if f[j] == 'd' then payload = f[j + 1] end end
  end
  out[#out + 1] = m
  out[#out + 1] = payload
end
return out
"""


class BufferTimeout(TimeoutError):
    """No (or not enough) fresh data arrived in time, and replay could not stand in."""


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
    max_staleness: Optional[int] = None
    when_empty: str = "wait"  # "wait": block up to timeout_s, then raise; "replay": serve history
    timeout_s: float = 60.0
    claim_idle_s: float = 300.0
    dead_letter_max: int = 1000
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
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.rng = random.Random(cfg.seed)
        self._sha: Dict[str, str] = {}
        self._load_scripts()
        self._carry: collections.deque = collections.deque()  # taken, not yet handed out
        self._inflight: Dict[str, int] = {}  # handed out, not yet acked: id -> bytes
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
        self._sha = {"ack": self.r.script_load(_ACK_ARCHIVE), "draw": self.r.script_load(_REPLAY_DRAW)}

    def _run(self, build) -> list:
        """Execute a pipeline built by ``build(pipe)``; reload the Lua scripts and retry once
        if the server lost them (a restarted Redis)."""
        for attempt in (0, 1):
            pipe = self.r.pipeline(transaction=False)
            self._flush_counts(pipe)
            build(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                self._load_scripts()
        raise AssertionError("unreachable")

    def _flush_counts(self, pipe) -> None:
        for k, v in self._counts.items():
            if v:
                pipe.hincrby(self.k_stats, k, v)
        self._counts.clear()

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
                encoded = list(zip(encode_groups(groups), [g.policy_version for g in groups]))
            else:
                encoded = [self._encode_one(i, g) for i, g in enumerate(groups)]
        except RecordError:
            self._counts["rejected"] += 1
            self._run(lambda pipe: None)
            raise
        pipe = self.r.pipeline(transaction=True)
        for blob, version in encoded:
            pipe.xadd(self.k_stream, {"d": memoryview(blob), "v": int(version)})
        nbytes = sum(b.size for b, _ in encoded)
        pipe.hincrby(self.k_stats, "put_groups", len(encoded))
        pipe.hincrby(self.k_stats, "put_bytes", nbytes)
        pipe.hincrby(self.k_stats, "fresh_bytes", nbytes)
        res = pipe.execute()
        return [x.decode() for x in res[: len(encoded)]]

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
                return blob, row.policy_version
            return encode_groups([g])[0], g.policy_version
        except RecordError as e:
            field = e.field.split(".", 1)[1] if e.field.startswith("groups[") else e.field
            raise RecordError(f"groups[{i}].{field}", str(e).split(": ", 1)[1]) from None

    # ------------------------------------------------------------------ consumers

    def sample(
        self,
        num_groups: int,
        p: Optional[float] = None,
        *,
        current_version: Optional[int] = None,
        timeout_s: Optional[float] = None,
    ) -> SampleBatch:
        """``num_groups`` whole groups: each slot replayed with probability ``p``, else fresh.

        Fresh groups come oldest first. With ``max_staleness`` and ``current_version``, fresh
        groups more than ``max_staleness`` versions old are skipped (counted; they join the
        history). When fresh data is short: ``when_empty="wait"`` blocks up to ``timeout_s``
        then raises ``BufferTimeout`` (groups already taken are kept for the next call);
        ``"replay"`` fills the slots from the history at once (counted). The common case is
        one round trip to Redis (plus one blocking read when fresh data has to be waited for).
        """
        cfg = self.config
        p = cfg.replay_prob if p is None else float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        timeout_s = cfg.timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        counts = self._counts
        if not self._recovered:
            self._recover_own_pending(current_version)
        slots = ["replay" if self.rng.random() < p else "fresh" for _ in range(num_groups)]
        fresh: List[SampledGroup] = []
        want = slots.count("fresh")
        fresh += self._from_carry(want, current_version)
        need = want - len(fresh)
        n_replay = num_groups - want
        claim = time.monotonic() >= self._next_claim
        us = [repr(self.rng.random()) for _ in range(n_replay)]

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
                pipe.evalsha(self._sha["draw"], 2, self.k_hz, self.k_stream, *us)

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
        replay_raw = res[-1] if n_replay else []
        fresh += self._accept(entries, current_version)
        if n_replay and not replay_raw:  # no history yet: those slots take fresh data
            counts["replay_unavailable"] += n_replay
            slots = ["fresh"] * num_groups
            want = num_groups
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
            counts["fresh_substituted"] += want - len(fresh)
            for i in [i for i, s in enumerate(slots) if s == "fresh"][len(fresh):]:
                slots[i] = "replay"
        replay = self._decode_replay(replay_raw, current_version)
        short = slots.count("replay") - len(replay)
        if short > 0:
            replay += self._draw_replay(short, current_version)
        fresh_it, replay_it = iter(fresh), iter(replay)
        items = [next(fresh_it) if s == "fresh" else next(replay_it) for s in slots]
        for it in items:
            if it.source == "fresh":
                self._inflight[it.entry_id] = it.nbytes
            if it.staleness is not None:  # fresh groups' staleness and replayed groups' age, kept apart
                counts[f"{'stale' if it.source == 'fresh' else 'age'}:{it.staleness}"] += 1
        counts["served_fresh"] += len(fresh)
        counts["served_replay"] += len(items) - len(fresh)
        return SampleBatch(items, waited_s=time.monotonic() - t0)

    def ack(self, batch: Union[SampleBatch, Sequence[str]]) -> int:
        """Mark a batch's fresh groups as trained on; they join the replay history.

        Returns how many joined (0 for entries that another consumer had reclaimed and acked
        already). Takes a ``SampleBatch`` or the entry ids of groups this object handed out.
        """
        if isinstance(batch, SampleBatch):
            pairs = [(it.entry_id, it.nbytes) for it in batch.items if it.source == "fresh"]
        else:
            pairs = [(i, self._inflight.get(i, 0)) for i in batch]
        if not pairs:
            return 0
        archived, _ = self._archive(pairs, "acked")
        for i, _ in pairs:
            self._inflight.pop(i, None)
        return archived

    def _archive(self, pairs, counter: str):
        cfg = self.config
        args = [CONSUMER_GROUP, cfg.history_max_groups, cfg.history_max_bytes, counter]
        for eid, size in pairs:
            args += [eid, size]
        keys = [self.k_stream, self.k_hz, self.k_hsize, self.k_stats]
        return self._run(lambda pipe: pipe.evalsha(self._sha["ack"], len(keys), *keys, *args))[-1]

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
        if stale:
            self._archive(stale, "stale_skipped")
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
        if stale:
            self._archive(stale, "stale_skipped")
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

    def _draw_replay(self, k: int, current_version) -> List[SampledGroup]:
        """Draw until k good groups (corrupt ones are dead-lettered and drawn again)."""
        out: List[SampledGroup] = []
        for _attempt in range(5):
            us = [repr(self.rng.random()) for _ in range(k - len(out))]
            raw = self._run(lambda pipe: pipe.evalsha(self._sha["draw"], 2, self.k_hz, self.k_stream, *us))[-1]
            if not raw:
                break
            out += self._decode_replay(raw, current_version)
            if len(out) >= k:
                return out
        raise BufferTimeout(f"buffer {self.config.name!r}: replay history could not supply {k} groups")

    def _dead_letter(self, eid: str, blob: bytes, why: str, *, source: str) -> None:
        log.error("buffer %r: corrupt %s group %s skipped: %s", self.config.name, source, eid, why)
        self._counts["corrupt"] += 1
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.k_dead, {"id": eid, "source": source, "error": why, "d": blob}, maxlen=self.config.dead_letter_max, approximate=True)
        pipe.xdel(self.k_stream, eid)
        if source == "fresh":
            pipe.xack(self.k_stream, CONSUMER_GROUP, eid)
            pipe.hincrby(self.k_stats, "fresh_bytes", -len(blob))
        else:
            pipe.zrem(self.k_hz, eid)
            pipe.hdel(self.k_hsize, eid)
            pipe.hincrby(self.k_stats, "history_bytes", -len(blob))
        pipe.execute()

    # ------------------------------------------------------------------ monitoring

    def stats(self) -> Dict[str, object]:
        """Counters and gauges for monitoring (the dashboard, logs)."""

        def build(pipe):
            pipe.hgetall(self.k_stats)
            pipe.xlen(self.k_stream)
            pipe.xpending(self.k_stream, CONSUMER_GROUP)
            pipe.zcard(self.k_hz)
            pipe.xlen(self.k_dead)

        raw, xlen, pending, hist, dead = self._run(build)[-5:]
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
        }
        for k in ("put_groups", "put_bytes", "served_fresh", "served_replay", "acked", "rejected", "corrupt",
                  "stale_skipped", "evicted", "redelivered", "timeouts", "replay_unavailable", "fresh_substituted"):
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
        self.r.delete(self.k_stream, self.k_hz, self.k_hsize, self.k_stats, self.k_dead)

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
