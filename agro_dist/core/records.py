"""The record contract shared by generator actors, the replay buffer and the learner.

One *group* is one prompt with its ``n`` scored completions, sampled by one policy version.
On the wire it is one Arrow IPC stream holding one row of ``GROUP_SCHEMA`` (list columns carry
the per-completion fields), so any Arrow reader can open it. The schema is versioned twice:
the ``schema_version`` column (checked row by row) and the schema metadata key
``agro_dist.schema_version``. Groups are validated when written (``encode_group``) and when
read (``decode_group``); every error is a ``RecordError`` whose message starts with the field
at fault, e.g. ``completions[2].logprobs: 63 values for 64 token_ids``.

Per-completion arrays are numpy arrays after decoding (zero-copy views of the Arrow buffers),
lists or arrays before encoding.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Union

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1
_META_KEY = b"agro_dist.schema_version"

GROUP_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int32(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("token_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("texts", pa.list_(pa.string()), nullable=False),
        pa.field("rewards", pa.list_(pa.float64()), nullable=False),
        pa.field("finish_reasons", pa.list_(pa.string()), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        pa.field("generator_id", pa.string(), nullable=False),
        pa.field("created_at", pa.float64(), nullable=False),
        pa.field("metadata", pa.string(), nullable=False),  # JSON object: task metadata, e.g. the answer
    ],
    metadata={_META_KEY: str(SCHEMA_VERSION).encode()},
)


class RecordError(ValueError):
    """A group that breaks the contract. ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass
class Completion:
    token_ids: Sequence[int]
    logprobs: Sequence[float]  # behaviour log-probs of the sampled tokens, one per token
    reward: float
    finish_reason: str  # "stop", "length", ...
    text: str = ""


@dataclass
class Group:
    prompt_id: str
    prompt: str
    prompt_token_ids: Sequence[int]
    completions: List[Completion]
    policy_version: int
    generator_id: str
    metadata: Dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    group_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    schema_version: int = SCHEMA_VERSION

    @property
    def n(self) -> int:
        return len(self.completions)

    @property
    def rewards(self) -> np.ndarray:
        return np.array([c.reward for c in self.completions], dtype=np.float64)

    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)


# --------------------------------------------------------------------------- validation
# Checks run on whole flat arrays (one pass per group, not per completion) because they sit on
# the buffer's hot path: every put and every sample validates.


def _describe(x) -> str:
    a = np.asarray(x) if not isinstance(x, (str, bytes)) else None
    return type(x).__name__ if a is None else f"{type(x).__name__} of dtype {a.dtype} and shape {a.shape}"


def _check_str(value, where: str, *, empty_ok: bool = True) -> None:
    if not isinstance(value, str):
        raise RecordError(where, f"expected a string, got {type(value).__name__}")
    if not empty_ok and not value:
        raise RecordError(where, "must not be empty")


def _as_1d(x, where: str, *, ints: bool) -> np.ndarray:
    a = x if isinstance(x, np.ndarray) else np.asarray(x if len(x) else [], dtype=None if ints else np.float64)
    if a.ndim != 1:
        raise RecordError(where, f"expected a 1-D sequence, got {_describe(x)}")
    if ints and a.size and a.dtype.kind not in "iu":
        raise RecordError(where, f"expected a 1-D sequence of ints, got {_describe(x)}")
    if not ints and a.size and a.dtype.kind not in "fiu":
        raise RecordError(where, f"expected a 1-D sequence of numbers, got {_describe(x)}")
    return a


def _first_bad(offsets: np.ndarray, bad: np.ndarray) -> int:
    """Index of the completion holding the first True of ``bad`` (flat over completions)."""
    return int(np.searchsorted(offsets, int(np.argmax(bad)), side="right") - 1)


def _check_flat(offsets, flat_ids: np.ndarray, flat_lp: np.ndarray) -> None:
    # Fast path: two reductions per array, no temporaries (NaN fails both comparisons).
    # The per-token mask is built only to say which completion is at fault.
    if flat_ids.size:
        lo, hi = int(flat_ids.min()), int(flat_ids.max())
        if lo < 0 or hi > np.iinfo(np.int32).max:
            bad = (flat_ids < 0) | (flat_ids > np.iinfo(np.int32).max)
            raise RecordError(f"completions[{_first_bad(offsets, bad)}].token_ids", "token ids must be in [0, 2**31)")
    if flat_lp.size:
        if not (flat_lp.min() > -np.inf and flat_lp.max() <= 1e-4):
            bad = ~np.isfinite(flat_lp) | (flat_lp > 1e-4)
            raise RecordError(f"completions[{_first_bad(offsets, bad)}].logprobs", "log-probs must be finite and <= 0")


def _check_header(g: Group) -> None:
    if not isinstance(g, Group):
        raise RecordError("group", f"expected agro_dist.core.records.Group, got {type(g).__name__}")
    if g.schema_version != SCHEMA_VERSION:
        raise RecordError("schema_version", f"unknown schema version {g.schema_version!r} (this build reads {SCHEMA_VERSION})")
    for name in ("group_id", "prompt_id", "generator_id"):
        _check_str(getattr(g, name), name, empty_ok=False)
    _check_str(g.prompt, "prompt")
    p = _as_1d(g.prompt_token_ids, "prompt_token_ids", ints=True)
    if p.size and (p.min() < 0 or p.max() > np.iinfo(np.int32).max):
        raise RecordError("prompt_token_ids", "token ids must be in [0, 2**31)")
    if isinstance(g.policy_version, bool) or not isinstance(g.policy_version, (int, np.integer)) or g.policy_version < 0:
        raise RecordError("policy_version", f"expected an int >= 0, got {g.policy_version!r}")
    if isinstance(g.created_at, bool) or not isinstance(g.created_at, (int, float)) or not math.isfinite(g.created_at):
        raise RecordError("created_at", f"expected a finite unix time, got {g.created_at!r}")
    if not isinstance(g.metadata, dict):
        raise RecordError("metadata", f"expected a dict, got {type(g.metadata).__name__}")
    if not isinstance(g.completions, (list, tuple)) or not g.completions:
        raise RecordError("completions", "a group needs at least one completion")


def _check_completion_scalars(i: int, reward, finish_reason, text) -> None:
    where = f"completions[{i}]"
    if isinstance(reward, bool) or not isinstance(reward, (int, float, np.floating, np.integer)):
        raise RecordError(f"{where}.reward", f"expected a number, got {type(reward).__name__}")
    if not math.isfinite(float(reward)):
        raise RecordError(f"{where}.reward", f"must be finite, got {reward}")
    _check_str(finish_reason, f"{where}.finish_reason", empty_ok=False)
    _check_str(text, f"{where}.text")


def _completion_parts(g: Group):
    """Per-completion checks that need no token pass; returns the id and log-prob arrays."""
    ids, lps = [], []
    for i, c in enumerate(g.completions):
        if not isinstance(c, Completion):
            raise RecordError(f"completions[{i}]", f"expected Completion, got {type(c).__name__}")
        a = _as_1d(c.token_ids, f"completions[{i}].token_ids", ints=True)
        lp = _as_1d(c.logprobs, f"completions[{i}].logprobs", ints=False)
        if len(lp) != len(a):
            raise RecordError(f"completions[{i}].logprobs", f"{len(lp)} values for {len(a)} token_ids")
        _check_completion_scalars(i, c.reward, c.finish_reason, c.text)
        ids.append(a)
        lps.append(lp)
    return ids, lps


def _flatten_checked(groups: Sequence[Group]):
    """All completions of all groups as one flat int32 / float32 pair (a single copy), token
    checks vectorised over it; errors name ``groups[g].completions[c]``.

    Returns (per-group completion counts, token offsets over all completions, ids, log-probs).
    """
    ids, lps, counts = [], [], []
    for gi, g in enumerate(groups):
        try:
            _check_header(g)
            a, b = _completion_parts(g)
        except RecordError as e:
            raise RecordError(f"groups[{gi}].{e.field}", str(e).split(": ", 1)[1]) from None
        ids += a
        lps += b
        counts.append(len(a))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in ids], out=offsets[1:])
    flat_ids = np.concatenate(ids) if offsets[-1] else np.zeros(0, np.int32)  # dtype kept: no extra copy
    flat_lp = np.concatenate(lps).astype(np.float32, copy=False) if offsets[-1] else np.zeros(0, np.float32)
    try:
        _check_flat(offsets, flat_ids, flat_lp)
    except RecordError as e:
        # e.field is completions[k] over all groups: map k back to (group, completion).
        k = int(e.field.split("[", 1)[1].split("]", 1)[0])
        starts = np.cumsum([0] + counts)
        gi = int(np.searchsorted(starts, k, side="right") - 1)
        rest = e.field.split("]", 1)[1]
        raise RecordError(f"groups[{gi}].completions[{k - starts[gi]}]{rest}", str(e).split(": ", 1)[1]) from None
    return counts, offsets, flat_ids.astype(np.int32, copy=False), flat_lp


def validate_group(g: Group) -> None:
    """Raise ``RecordError`` naming the first field that breaks the contract."""
    try:
        _flatten_checked([g])
    except RecordError as e:
        raise RecordError(e.field.split(".", 1)[1], str(e).split(": ", 1)[1]) from None


# --------------------------------------------------------------------------- encode / decode
# Many groups go through one multi-row Arrow batch (one set of array constructions per call,
# not per group), then each row is written as its own IPC stream: a group stays a
# self-describing unit in Redis while the per-group fixed cost stays small.


def groups_to_batch(groups: Sequence[Group]) -> pa.RecordBatch:
    """Validate groups and build one Arrow batch, a row per group.

    Raises ``RecordError`` for the first bad group, its field prefixed ``groups[i].``.
    """
    counts, offsets, flat_ids, flat_lp = _flatten_checked(groups)
    metas = []
    for i, g in enumerate(groups):
        try:
            metas.append(json.dumps(g.metadata, sort_keys=True))
        except (TypeError, ValueError) as e:
            raise RecordError(f"groups[{i}].metadata", f"not JSON-serialisable: {e}") from None
    outer = np.zeros(len(groups) + 1, dtype=np.int32)
    np.cumsum(counts, out=outer[1:])
    comps = [c for g in groups for c in g.completions]
    p_ids = [np.asarray(g.prompt_token_ids, dtype=np.int32) if len(g.prompt_token_ids) else np.zeros(0, np.int32) for g in groups]
    p_off = np.zeros(len(groups) + 1, dtype=np.int32)
    np.cumsum([len(x) for x in p_ids], out=p_off[1:])
    outer_pa = pa.array(outer)
    inner_pa = pa.array(offsets.astype(np.int32))

    def nested(flat, typ):
        return pa.ListArray.from_arrays(outer_pa, pa.ListArray.from_arrays(inner_pa, pa.array(flat, type=typ)))

    def per_completion(values, typ):
        return pa.ListArray.from_arrays(outer_pa, pa.array(values, type=typ))

    cols = [
        pa.array(np.full(len(groups), SCHEMA_VERSION, np.int32)),
        pa.array([g.group_id for g in groups], pa.string()),
        pa.array([g.prompt_id for g in groups], pa.string()),
        pa.array([g.prompt for g in groups], pa.string()),
        pa.ListArray.from_arrays(pa.array(p_off), pa.array(np.concatenate(p_ids) if p_ids else np.zeros(0, np.int32), pa.int32())),
        nested(flat_ids, pa.int32()),
        nested(flat_lp, pa.float32()),
        per_completion([c.text for c in comps], pa.string()),
        per_completion([float(c.reward) for c in comps], pa.float64()),
        per_completion([c.finish_reason for c in comps], pa.string()),
        pa.array([int(g.policy_version) for g in groups], pa.int64()),
        pa.array([g.generator_id for g in groups], pa.string()),
        pa.array([float(g.created_at) for g in groups], pa.float64()),
        pa.array(metas, pa.string()),
    ]
    return pa.RecordBatch.from_arrays(cols, schema=GROUP_SCHEMA)


def group_to_batch(g: Group) -> pa.RecordBatch:
    try:
        return groups_to_batch([g])
    except RecordError as e:  # a single group reports its own fields, without "groups[0]."
        raise RecordError(e.field.split(".", 1)[1], str(e).split(": ", 1)[1]) from None


def encode_groups(groups: Sequence[Group]) -> List[pa.Buffer]:
    """Validate and serialise groups, one Arrow IPC stream each (``pyarrow.Buffer``s:
    bytes-like without a copy; ``.to_pybytes()`` gives ``bytes``)."""
    out: List[pa.Buffer] = []
    start, tokens = 0, 0
    for i, g in enumerate(groups):
        tokens += g.num_tokens() if isinstance(g, Group) else 0
        # Batch small groups (amortises per-array costs); flush before a chunk holds more than
        # _CHUNK_BYTES of tokens, where one big concatenation costs more than it saves.
        if tokens * 8 >= _CHUNK_BYTES or i == len(groups) - 1:
            try:
                batch = groups_to_batch(groups[start:i + 1])
            except RecordError as e:
                k = int(e.field[len("groups["):].split("]", 1)[0])
                raise RecordError(f"groups[{start + k}]" + e.field.split("]", 1)[1], str(e).split(": ", 1)[1]) from None
            out += [_write_ipc(batch.slice(j, 1)) for j in range(batch.num_rows)]
            start, tokens = i + 1, 0
    return out


_CHUNK_BYTES = 1 << 18  # 256 KiB: best of 64 KiB..1 MiB on all four bench shapes


def encode_group(g: Group) -> pa.Buffer:
    """Validate and serialise one group as Arrow IPC stream bytes."""
    return _write_ipc(group_to_batch(g))


def batch_to_ipc(batch: pa.RecordBatch) -> pa.Buffer:
    """Serialise a one-group batch from another producer after checking its schema."""
    return _write_ipc(canonical_batch(batch))


def canonical_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Validate a batch's schema (fields matched by name) and return it in ``GROUP_SCHEMA``'s
    column order and metadata, so every reader can treat all payloads alike."""
    validate_batch_schema(batch.schema)
    if batch.schema.equals(GROUP_SCHEMA, check_metadata=True):
        return batch
    return pa.RecordBatch.from_arrays([batch.column(n) for n in GROUP_SCHEMA.names], schema=GROUP_SCHEMA)


def _write_ipc(batch: pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue()


def validate_batch_schema(schema: pa.Schema) -> None:
    """Check an Arrow schema against ``GROUP_SCHEMA``; name the first field that differs."""
    if schema.equals(GROUP_SCHEMA, check_metadata=True):
        return
    meta = schema.metadata or {}
    if _META_KEY in meta and meta[_META_KEY] != str(SCHEMA_VERSION).encode():
        raise RecordError("schema_version", f"unknown schema version {meta[_META_KEY].decode(errors='replace')!r} (this build reads {SCHEMA_VERSION})")
    want = {f.name: f for f in GROUP_SCHEMA}
    have = {f.name: f for f in schema}
    for name, f in want.items():
        if name not in have:
            raise RecordError(name, "missing from the record's schema")
        if not have[name].type.equals(f.type):
            raise RecordError(name, f"has type {have[name].type}, expected {f.type}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise RecordError(extra[0], "is not a field of the group schema")


def _read_ipc(data) -> pa.RecordBatch:
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batches = list(reader)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise RecordError("payload", f"not a readable Arrow IPC stream ({e})") from None
    validate_batch_schema(reader.schema)
    if len(batches) != 1 or batches[0].num_rows != 1:
        raise RecordError("payload", f"expected exactly one group row, got {sum(b.num_rows for b in batches)}")
    return canonical_batch(batches[0])


def decode_group(data) -> Group:
    """Parse and validate one group from Arrow IPC bytes; ``RecordError`` if anything is off."""
    out = rows_to_groups(_read_ipc(data))[0]
    if isinstance(out, RecordError):
        raise out
    return out


def decode_groups(blobs: Sequence) -> List[Union[Group, RecordError]]:
    """Decode many payloads; each item is a ``Group`` or the ``RecordError`` of that payload
    (one bad payload never spoils the others)."""
    out: List[Union[Group, RecordError, None]] = [None] * len(blobs)
    good, idx = [], []
    for i, b in enumerate(blobs):
        try:
            good.append(_read_ipc(b))
            idx.append(i)
        except RecordError as e:
            out[i] = e
    if good:
        table = pa.Table.from_batches(good)  # all in GROUP_SCHEMA (canonical_batch)
        merged = table.combine_chunks().to_batches()
        rows = rows_to_groups(merged[0]) if merged else []
        for i, g in zip(idx, rows):
            out[i] = g
    return out  # type: ignore[return-value]


def rows_to_groups(b: pa.RecordBatch) -> List[Union[Group, RecordError]]:
    """Validate each row (schema already checked) and build Groups over zero-copy views.

    Column accessors run once for the whole batch; each row's checks run on its slices."""
    col = {name: b.column(i) for i, name in enumerate(b.schema.names)}
    rows = b.num_rows
    versions = col["schema_version"].to_numpy(zero_copy_only=False)
    outer = col["token_ids"].offsets.to_numpy()
    outer = outer - outer[0]
    ids_inner, lp_inner = col["token_ids"].flatten(), col["logprobs"].flatten()  # flatten() honours slices
    tok_off = ids_inner.offsets.to_numpy()
    lp_off = lp_inner.offsets.to_numpy()
    flat_ids = ids_inner.flatten().to_numpy(zero_copy_only=False)
    flat_lp = lp_inner.flatten().to_numpy(zero_copy_only=False)
    tok_off, lp_off = tok_off - tok_off[0], lp_off - lp_off[0]
    texts = col["texts"].flatten().to_pylist()
    rewards = col["rewards"].flatten().to_numpy(zero_copy_only=False)
    finish = col["finish_reasons"].flatten().to_pylist()
    count_of = {name: np.diff(col[name].offsets.to_numpy()) for name in ("logprobs", "texts", "rewards", "finish_reasons")}
    p_off = col["prompt_token_ids"].offsets.to_numpy()
    p_flat = col["prompt_token_ids"].flatten().to_numpy(zero_copy_only=False)
    p_off = p_off - p_off[0]
    scalars = {name: col[name].to_pylist() for name in ("group_id", "prompt_id", "prompt", "policy_version", "generator_id", "created_at", "metadata")}
    nulls = [name for name in GROUP_SCHEMA.names if col[name].null_count]
    out: List[Union[Group, RecordError]] = []
    for r in range(rows):
        try:
            if nulls:
                raise RecordError(nulls[0], "is null")
            if versions[r] != SCHEMA_VERSION:
                raise RecordError("schema_version", f"unknown schema version {int(versions[r])} (this build reads {SCHEMA_VERSION})")
            c0, c1 = int(outer[r]), int(outer[r + 1])
            n = c1 - c0
            for name, counts in count_of.items():
                if counts[r] != n:
                    raise RecordError(name, f"{counts[r]} entries for {n} completions")
            if n == 0:
                raise RecordError("completions", "a group needs at least one completion")
            offs = tok_off[c0:c1 + 1]
            lps = lp_off[c0:c1 + 1]
            if not np.array_equal(offs - offs[0], lps - lps[0]):
                i = int(np.argmax(np.diff(offs) != np.diff(lps)))
                raise RecordError(f"completions[{i}].logprobs", f"{lps[i + 1] - lps[i]} values for {offs[i + 1] - offs[i]} token_ids")
            ids = flat_ids[offs[0]:offs[-1]]
            lp = flat_lp[lps[0]:lps[-1]]
            local = offs - offs[0]
            _check_flat(local, ids, lp)
            rw = rewards[c0:c1]
            bad = ~np.isfinite(rw)
            if bad.any():
                i = int(np.argmax(bad))
                raise RecordError(f"completions[{i}].reward", f"must be finite, got {rw[i]}")
            fr = finish[c0:c1]
            for i, f in enumerate(fr):
                if not f:
                    raise RecordError(f"completions[{i}].finish_reason", "must not be empty")
            try:
                meta = json.loads(scalars["metadata"][r])
            except ValueError as e:
                raise RecordError("metadata", f"not valid JSON ({e})") from None
            if not isinstance(meta, dict):
                raise RecordError("metadata", "must be a JSON object")
            for name in ("group_id", "prompt_id", "generator_id"):
                if not scalars[name][r]:
                    raise RecordError(name, "must not be empty")
            if scalars["policy_version"][r] < 0:
                raise RecordError("policy_version", f"expected an int >= 0, got {scalars['policy_version'][r]}")
            if not math.isfinite(scalars["created_at"][r]):
                raise RecordError("created_at", f"expected a finite unix time, got {scalars['created_at'][r]}")
            comps = [
                Completion(ids[local[i]:local[i + 1]], lp[local[i]:local[i + 1]], float(rw[i]), fr[i], texts[c0 + i])
                for i in range(n)
            ]
            out.append(Group(
                prompt_id=scalars["prompt_id"][r],
                prompt=scalars["prompt"][r],
                prompt_token_ids=p_flat[p_off[r]:p_off[r + 1]],
                completions=comps,
                policy_version=scalars["policy_version"][r],
                generator_id=scalars["generator_id"][r],
                metadata=meta,
                created_at=scalars["created_at"][r],
                group_id=scalars["group_id"][r],
            ))
        except RecordError as e:
            out.append(e)
    return out
