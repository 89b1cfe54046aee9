"""The replay buffer: groups of completions in Redis, as Arrow IPC, sampled with a replay probability.

Layout in Redis (all keys share the hash tag ``{name}`` so the Lua scripts work on a cluster):

- ``{name}:fresh``: a Stream of groups not yet trained on. Producers ``XADD`` (one entry per
  group: ``d`` = Arrow IPC bytes, ``v`` = policy version). Consumers read through the consumer
  group ``learners``: each entry goes to exactly one consumer, stays *pending* until acked, and
  is re-delivered if its consumer dies (``XAUTOCLAIM`` after ``claim_idle_s``; a consumer
  restarted under the same name re-reads its own pending entries first).
- ``{name}:hist:z`` (ZSET, score = arrival order) + ``{name}:hist:data`` (HASH id -> bytes):
  the replay history, the groups consumed so far. ``ack`` moves entries from the stream into
  it atomically (Lua) and evicts the oldest beyond ``history_max_groups`` /
  ``history_max_bytes``. Replay draws are uniform: the client draws ``u ~ U[0,1)`` from its
  seeded RNG and the script takes rank ``floor(u * size)``.
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
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Union

import pyarrow as pa
import redis

from agro_dist.records import Group, RecordError, _row_to_group, batch_to_ipc, decode_group, encode_group

from .server import RedisServer

log = logging.getLogger("agro_dist.buffer")

CONSUMER_GROUP = "learners"

# KEYS: fresh, hist_z, hist_data, stats. ARGV: group, max_count, max_bytes, counter, ids...
# Ack entries, move their payloads into the history, evict the oldest beyond the caps.
_ACK_ARCHIVE = """
local fresh, z, data, stats = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local grp, max_count, max_bytes, counter = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local archived = 0
for i = 5, #ARGV do
  local id = ARGV[i]
  -- XACK returns 0 when the entry is no longer pending (acked already by a consumer that
  -- reclaimed it): then it is in the history already and must not enter twice.
  if redis.call('XACK', fresh, grp, id) == 1 then
    local e = redis.call('XRANGE', fresh, id, id)
    redis.call('XDEL', fresh, id)
    if #e == 1 then
      local f, payload = e[1][2], nil
      for j = 1, #f, 2 do if f[j] == 'd' then payload = f[j + 1] end end
      if payload then
        local seq = redis.call('HINCRBY', stats, 'hist_seq', 1)
        redis.call('ZADD', z, seq, id)
        redis.call('HSET', data, id, payload)
        redis.call('HINCRBY', stats, 'history_bytes', #payload)
        redis.call('HINCRBY', stats, 'fresh_bytes', -#payload)
        archived = archived + 1
      end
    end
  end
end
local evicted = 0
while true do
  local n = redis.call('ZCARD', z)
  local b = tonumber(redis.call('HGET', stats, 'history_bytes') or '0')
  if n == 0 or (n <= max_count and b <= max_bytes) then break end
  local m = redis.call('ZPOPMIN', z)[1]
  redis.call('HINCRBY', stats, 'history_bytes', -redis.call('HSTRLEN', data, m))
  redis.call('HDEL', data, m)
  evicted = evicted + 1
end
if evicted > 0 then redis.call('HINCRBY', stats, 'evicted', evicted) end
if archived > 0 then redis.call('HINCRBY', stats, counter, archived) end
return {archived, evicted}
"""

# KEYS: hist_z, hist_data. ARGV: u_1..u_k in [0, 1). Returns member, payload pairs.
_REPLAY_DRAW = """
local n = redis.call('ZCARD', KEYS[1])
local out = {}
if n == 0 then return out end
for i = 1, #ARGV do
  local idx = math.floor(tonumber(ARGV[i]) * n)
  if idx >= n then idx = n - 1 end
  local m = redis.call('ZRANGE', KEYS[1], idx, idx)[1]
  out[#out + 1] = m
  out[#out + 1] = redis.call('HGET', KEYS[2], m) or ''
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
        self.r = redis.Redis.from_url(redis_url, **(redis_kwargs or {}))
        self.r.ping()
        tag = "{" + cfg.name + "}"
        self.k_fresh, self.k_hz, self.k_hd = f"{tag}:fresh", f"{tag}:hist:z", f"{tag}:hist:data"
        self.k_stats, self.k_dead = f"{tag}:stats", f"{tag}:dead"
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.rng = random.Random(cfg.seed)
        self._ack_script = self.r.register_script(_ACK_ARCHIVE)
        self._draw_script = self.r.register_script(_REPLAY_DRAW)
        self._carry: collections.deque = collections.deque()  # taken, not yet handed out
        self._inflight: Dict[str, float] = {}  # handed out, not yet acked
        self._recovered = False
        self._last_stats: Optional[tuple] = None
        try:
            self.r.xgroup_create(self.k_fresh, CONSUMER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    @property
    def public_url(self) -> str:
        """A URL other processes and machines can use (TCP for the private server)."""
        return self.server.url if self.server else self.url

    # ------------------------------------------------------------------ producers

    def put(self, groups: Union[Group, pa.RecordBatch, Iterable[Union[Group, pa.RecordBatch]]]) -> List[str]:
        """Validate and append groups to the fresh stream; returns their entry ids.

        All groups are validated before anything is written: one bad record rejects the call
        with a ``RecordError`` naming it (``groups[3].completions[1].logprobs: ...``).
        """
        if isinstance(groups, (Group, pa.RecordBatch)):
            groups = [groups]
        encoded = []
        for i, g in enumerate(groups):
            try:
                if isinstance(g, pa.RecordBatch):
                    blob = batch_to_ipc(g)
                    rows = [_row_to_group(g.slice(j, 1)) for j in range(g.num_rows)]  # validates content
                    if len(rows) != 1:
                        raise RecordError("payload", f"a record batch must hold one group, got {g.num_rows} rows")
                    version = rows[0].policy_version
                else:
                    blob, version = encode_group(g), g.policy_version
            except RecordError as e:
                self.r.hincrby(self.k_stats, "rejected", 1)
                raise RecordError(f"groups[{i}].{e.field}", str(e).split(": ", 1)[1]) from None
            encoded.append((blob, version))
        pipe = self.r.pipeline(transaction=False)
        for blob, version in encoded:
            pipe.xadd(self.k_fresh, {"d": blob, "v": int(version)})
        pipe.hincrby(self.k_stats, "put_groups", len(encoded))
        nbytes = sum(len(b) for b, _ in encoded)
        pipe.hincrby(self.k_stats, "put_bytes", nbytes)
        pipe.hincrby(self.k_stats, "fresh_bytes", nbytes)
        res = pipe.execute()
        return [x.decode() for x in res[: len(encoded)]]

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
        ``"replay"`` fills the slots from the history at once (counted).
        """
        cfg = self.config
        p = cfg.replay_prob if p is None else float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        timeout_s = cfg.timeout_s if timeout_s is None else timeout_s
        t0 = time.monotonic()
        self._heartbeat()
        slots = ["replay" if self.rng.random() < p else "fresh" for _ in range(num_groups)]
        hist_size = self.r.zcard(self.k_hz)
        counts: Dict[str, int] = collections.Counter()
        if hist_size == 0 and "replay" in slots:
            counts["replay_unavailable"] += slots.count("replay")
            slots = ["fresh"] * num_groups
        need = slots.count("fresh")
        wait = cfg.when_empty == "wait" or hist_size == 0
        fresh = self._take_fresh(need, current_version, deadline=t0 + timeout_s if wait else t0, counts=counts)
        if len(fresh) < need:
            if wait:
                self._carry.extendleft(reversed(fresh))
                self._count(counts, timeouts=1)
                raise BufferTimeout(
                    f"buffer {cfg.name!r}: {len(fresh)} of {need} fresh groups after {timeout_s:.1f}s "
                    f"(when_empty='wait'); producers may be stalled or all data too stale"
                )
            short = need - len(fresh)
            counts["fresh_substituted"] += short
            for i in [i for i, s in enumerate(slots) if s == "fresh"][len(fresh):]:
                slots[i] = "replay"
        replay = self._take_replay(slots.count("replay"), current_version, counts)
        fresh_it, replay_it = iter(fresh), iter(replay)
        items = [next(fresh_it) if s == "fresh" else next(replay_it) for s in slots]
        for it in items:
            if it.source == "fresh":
                self._inflight[it.entry_id] = time.monotonic()
            if it.staleness is not None:
                counts[f"stale:{it.staleness}"] += 1
        counts["served_fresh"] += len(fresh)
        counts["served_replay"] += len(replay)
        self._count(counts)
        return SampleBatch(items, waited_s=time.monotonic() - t0)

    def ack(self, batch: Union[SampleBatch, Sequence[str]]) -> int:
        """Mark a batch's fresh groups as trained on; they move into the replay history.

        Returns how many entered the history (0 for entries that another consumer had
        reclaimed and acked already).
        """
        ids = batch.fresh_ids if isinstance(batch, SampleBatch) else list(batch)
        if not ids:
            return 0
        archived, _ = self._archive(ids, "acked")
        for i in ids:
            self._inflight.pop(i, None)
        return archived

    def _archive(self, ids: Sequence[str], counter: str):
        cfg = self.config
        args = [CONSUMER_GROUP, cfg.history_max_groups, cfg.history_max_bytes, counter, *ids]
        return self._ack_script(keys=[self.k_fresh, self.k_hz, self.k_hd, self.k_stats], args=args)

    def _heartbeat(self) -> None:
        # Reset the idle time of groups handed out but not yet acked, so that a slow but live
        # consumer does not see them reclaimed by another.
        if self._inflight:
            self.r.xclaim(self.k_fresh, CONSUMER_GROUP, self.consumer, 0, list(self._inflight), justid=True)

    def _take_fresh(self, k: int, current_version, deadline: float, counts) -> List[SampledGroup]:
        out: List[SampledGroup] = []
        while self._carry and len(out) < k:
            out.append(self._carry.popleft())
        if not self._recovered:
            # A restarted consumer with the same name: its un-acked entries come back first.
            self._recovered = True
            start = "0"
            while True:
                res = self.r.xreadgroup(CONSUMER_GROUP, self.consumer, {self.k_fresh: start}, count=256)
                entries = res[0][1] if res else []
                if not entries:
                    break
                counts["redelivered"] += len(entries)
                self._carry.extend(self._accept(entries, current_version, counts))
                start = entries[-1][0]
            while self._carry and len(out) < k:
                out.append(self._carry.popleft())
        claim_ms = int(self.config.claim_idle_s * 1000)
        while len(out) < k:
            need = k - len(out)
            claimed = self.r.xautoclaim(self.k_fresh, CONSUMER_GROUP, self.consumer, claim_ms, "0-0", count=need)
            entries = claimed[1]
            if entries:
                counts["redelivered"] += len(entries)
            if len(entries) < need:
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                res = self.r.xreadgroup(
                    CONSUMER_GROUP, self.consumer, {self.k_fresh: ">"}, count=need - len(entries),
                    block=remaining_ms if remaining_ms >= 1 else None,
                )
                entries = list(entries) + (res[0][1] if res else [])
            out.extend(self._accept(entries, current_version, counts))
            if len(out) < k and time.monotonic() >= deadline:
                break
        # Entries beyond k (possible after recovery) wait in the carry for the next call.
        for extra in out[k:]:
            self._carry.appendleft(extra)
        return out[:k]

    def _accept(self, entries, current_version, counts) -> List[SampledGroup]:
        """Decode stream entries; skip (and archive) stale ones, dead-letter corrupt ones."""
        ok, stale = [], []
        cfg = self.config
        for eid, fields in entries:
            eid = eid.decode() if isinstance(eid, bytes) else eid
            if not fields or b"d" not in fields:  # deleted from the stream while pending
                self.r.xack(self.k_fresh, CONSUMER_GROUP, eid)
                continue
            blob = fields[b"d"]
            try:
                version = int(fields.get(b"v", b"-1"))
            except ValueError:
                version = -1
            if cfg.max_staleness is not None and current_version is not None and version >= 0:
                if current_version - version > cfg.max_staleness:
                    stale.append(eid)
                    continue
            try:
                g = decode_group(blob)
            except RecordError as e:
                self._dead_letter(eid, blob, str(e), source="fresh")
                counts["corrupt"] += 1
                continue
            st = None if current_version is None else int(current_version) - int(g.policy_version)
            ok.append(SampledGroup(g, "fresh", eid, st, len(blob)))
        if stale:
            self._archive(stale, "stale_skipped")
        return ok

    def _take_replay(self, k: int, current_version, counts) -> List[SampledGroup]:
        out: List[SampledGroup] = []
        for _attempt in range(5):
            if len(out) >= k:
                break
            us = [repr(self.rng.random()) for _ in range(k - len(out))]
            res = self._draw_script(keys=[self.k_hz, self.k_hd], args=us)
            if not res:
                break
            for member, blob in zip(res[0::2], res[1::2]):
                member = member.decode()
                try:
                    g = decode_group(blob)
                except RecordError as e:
                    self._dead_letter(member, blob, str(e), source="replay")
                    counts["corrupt"] += 1
                    continue
                st = None if current_version is None else int(current_version) - int(g.policy_version)
                out.append(SampledGroup(g, "replay", member, st, len(blob)))
        if len(out) < k:
            raise BufferTimeout(f"buffer {self.config.name!r}: replay history could not supply {k} groups")
        return out

    def _dead_letter(self, eid: str, blob: bytes, why: str, *, source: str) -> None:
        log.error("buffer %r: corrupt %s group %s skipped: %s", self.config.name, source, eid, why)
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.k_dead, {"id": eid, "source": source, "error": why, "d": blob}, maxlen=self.config.dead_letter_max, approximate=True)
        if source == "fresh":
            pipe.xack(self.k_fresh, CONSUMER_GROUP, eid)
            pipe.xdel(self.k_fresh, eid)
            pipe.hincrby(self.k_stats, "fresh_bytes", -len(blob))
        else:
            pipe.zrem(self.k_hz, eid)
            pipe.hdel(self.k_hd, eid)
            pipe.hincrby(self.k_stats, "history_bytes", -len(blob))
        pipe.execute()

    def _count(self, counts, **more) -> None:
        counts = {**counts, **more}
        if not counts:
            return
        pipe = self.r.pipeline(transaction=False)
        for k, v in counts.items():
            if v:
                pipe.hincrby(self.k_stats, k, v)
        pipe.execute()

    # ------------------------------------------------------------------ monitoring

    def stats(self) -> Dict[str, object]:
        """Counters and gauges for monitoring (the dashboard, logs)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.k_stats)
        pipe.xlen(self.k_fresh)
        pipe.xpending(self.k_fresh, CONSUMER_GROUP)
        pipe.zcard(self.k_hz)
        pipe.xlen(self.k_dead)
        raw, xlen, pending, hist, dead = pipe.execute()
        c = {k.decode(): int(v) for k, v in raw.items()}
        staleness = {int(k[6:]): v for k, v in c.items() if k.startswith("stale:")}
        served_f, served_r = c.get("served_fresh", 0), c.get("served_replay", 0)
        out: Dict[str, object] = {
            "fresh_backlog": xlen - pending["pending"],
            "fresh_pending": pending["pending"],
            "fresh_bytes": c.get("fresh_bytes", 0),
            "history_groups": hist,
            "history_bytes": c.get("history_bytes", 0),
            "replay_fraction_served": served_r / max(served_f + served_r, 1),
            "staleness_hist": dict(sorted(staleness.items())),
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
        self.r.delete(self.k_fresh, self.k_hz, self.k_hd, self.k_stats, self.k_dead)

    def close(self) -> None:
        try:
            self.r.close()
        finally:
            if self.server:
                self.server.stop()

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
