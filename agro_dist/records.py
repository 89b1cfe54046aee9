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
from typing import Any, Dict, List, Sequence

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


def _int_array(x, where: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise RecordError(where, f"expected a 1-D sequence of ints, got {_describe(x)}")
    if a.size and (a.min() < 0 or a.max() > np.iinfo(np.int32).max):
        raise RecordError(where, "token ids must be in [0, 2**31)")
    return a.astype(np.int32, copy=False)


def _describe(x) -> str:
    a = np.asarray(x) if not isinstance(x, (str, bytes)) else None
    return type(x).__name__ if a is None else f"{type(x).__name__} of dtype {a.dtype} and shape {a.shape}"


def _check_str(value, where: str, *, empty_ok: bool = True) -> None:
    if not isinstance(value, str):
        raise RecordError(where, f"expected a string, got {type(value).__name__}")
    if not empty_ok and not value:
        raise RecordError(where, "must not be empty")


def validate_group(g: Group) -> None:
    """Raise ``RecordError`` naming the first field that breaks the contract."""
    if not isinstance(g, Group):
        raise RecordError("group", f"expected agro_dist.records.Group, got {type(g).__name__}")
    if g.schema_version != SCHEMA_VERSION:
        raise RecordError("schema_version", f"unknown schema version {g.schema_version!r} (this build reads {SCHEMA_VERSION})")
    for name in ("group_id", "prompt_id", "generator_id"):
        _check_str(getattr(g, name), name, empty_ok=False)
    _check_str(g.prompt, "prompt")
    _int_array(g.prompt_token_ids, "prompt_token_ids")
    if isinstance(g.policy_version, bool) or not isinstance(g.policy_version, (int, np.integer)) or g.policy_version < 0:
        raise RecordError("policy_version", f"expected an int >= 0, got {g.policy_version!r}")
    if not isinstance(g.created_at, (int, float)) or not math.isfinite(g.created_at):
        raise RecordError("created_at", f"expected a finite unix time, got {g.created_at!r}")
    if not isinstance(g.metadata, dict):
        raise RecordError("metadata", f"expected a dict, got {type(g.metadata).__name__}")
    if not isinstance(g.completions, (list, tuple)) or not g.completions:
        raise RecordError("completions", "a group needs at least one completion")
    for i, c in enumerate(g.completions):
        where = f"completions[{i}]"
        if not isinstance(c, Completion):
            raise RecordError(where, f"expected Completion, got {type(c).__name__}")
        ids = _int_array(c.token_ids, f"{where}.token_ids")
        lp = np.asarray(c.logprobs, dtype=np.float64) if len(c.logprobs) else np.zeros(0)
        if lp.ndim != 1:
            raise RecordError(f"{where}.logprobs", f"expected a 1-D sequence, got shape {lp.shape}")
        if len(lp) != len(ids):
            raise RecordError(f"{where}.logprobs", f"{len(lp)} values for {len(ids)} token_ids")
        if not np.isfinite(lp).all() or (lp > 1e-4).any():
            raise RecordError(f"{where}.logprobs", "log-probs must be finite and <= 0")
        if isinstance(c.reward, bool) or not isinstance(c.reward, (int, float, np.floating, np.integer)):
            raise RecordError(f"{where}.reward", f"expected a number, got {type(c.reward).__name__}")
        if not math.isfinite(float(c.reward)):
            raise RecordError(f"{where}.reward", f"must be finite, got {c.reward}")
        _check_str(c.finish_reason, f"{where}.finish_reason", empty_ok=False)
        _check_str(c.text, f"{where}.text")


# --------------------------------------------------------------------------- encode / decode


def _list_of_lists(arrays: List[np.ndarray], typ: pa.DataType, np_dtype) -> pa.Array:
    """list<list<typ>> with one outer element, built from numpy without Python loops over tokens."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(a, dtype=np_dtype) for a in arrays]) if arrays else np.zeros(0, np_dtype)
    inner = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=typ))
    return pa.ListArray.from_arrays(pa.array([0, len(arrays)], type=pa.int32()), inner)


def group_to_batch(g: Group) -> pa.RecordBatch:
    validate_group(g)
    try:
        meta = json.dumps(g.metadata, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise RecordError("metadata", f"not JSON-serialisable: {e}") from None
    cs = g.completions
    cols = [
        pa.array([SCHEMA_VERSION], pa.int32()),
        pa.array([g.group_id]),
        pa.array([g.prompt_id]),
        pa.array([g.prompt]),
        pa.ListArray.from_arrays(pa.array([0, len(g.prompt_token_ids)], pa.int32()), pa.array(np.asarray(g.prompt_token_ids, np.int32), pa.int32())),
        _list_of_lists([c.token_ids for c in cs], pa.int32(), np.int32),
        _list_of_lists([c.logprobs for c in cs], pa.float32(), np.float32),
        pa.array([[c.text for c in cs]], pa.list_(pa.string())),
        pa.array([[float(c.reward) for c in cs]], pa.list_(pa.float64())),
        pa.array([[c.finish_reason for c in cs]], pa.list_(pa.string())),
        pa.array([int(g.policy_version)], pa.int64()),
        pa.array([g.generator_id]),
        pa.array([float(g.created_at)], pa.float64()),
        pa.array([meta]),
    ]
    return pa.RecordBatch.from_arrays(cols, schema=GROUP_SCHEMA)


def encode_group(g: Group) -> bytes:
    """Validate and serialise one group as Arrow IPC stream bytes."""
    return batch_to_ipc(group_to_batch(g))


def batch_to_ipc(batch: pa.RecordBatch) -> bytes:
    validate_batch_schema(batch.schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return sink.getvalue().to_pybytes()


def validate_batch_schema(schema: pa.Schema) -> None:
    """Check an Arrow schema against ``GROUP_SCHEMA``; name the first field that differs."""
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


def decode_group(data: bytes) -> Group:
    """Parse and validate one group from Arrow IPC bytes; ``RecordError`` if anything is off."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batches = list(reader)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise RecordError("payload", f"not a readable Arrow IPC stream ({e})") from None
    validate_batch_schema(reader.schema)
    if len(batches) != 1 or batches[0].num_rows != 1:
        raise RecordError("payload", f"expected exactly one group row, got {sum(b.num_rows for b in batches)}")
    return _row_to_group(batches[0])


def _row_to_group(b: pa.RecordBatch) -> Group:
    col = {name: b.column(i) for i, name in enumerate(b.schema.names)}
    version = col["schema_version"][0].as_py()
    if version != SCHEMA_VERSION:
        raise RecordError("schema_version", f"unknown schema version {version!r} (this build reads {SCHEMA_VERSION})")

    def nested(name, np_dtype):
        outer = col[name]
        inner = outer.values  # list<T> of the completions
        flat = inner.values.to_numpy(zero_copy_only=False).astype(np_dtype, copy=False)
        offs = inner.offsets.to_numpy()
        return [flat[offs[i]:offs[i + 1]] for i in range(len(inner))]

    ids, lps = nested("token_ids", np.int32), nested("logprobs", np.float32)
    texts = col["texts"][0].as_py()
    rewards = col["rewards"][0].as_py()
    finish = col["finish_reasons"][0].as_py()
    n = len(ids)
    for name, vals in (("logprobs", lps), ("texts", texts), ("rewards", rewards), ("finish_reasons", finish)):
        if len(vals) != n:
            raise RecordError(name, f"{len(vals)} entries for {n} completions")
    try:
        meta = json.loads(col["metadata"][0].as_py())
    except ValueError as e:
        raise RecordError("metadata", f"not valid JSON ({e})") from None
    g = Group(
        prompt_id=col["prompt_id"][0].as_py(),
        prompt=col["prompt"][0].as_py(),
        prompt_token_ids=col["prompt_token_ids"].values.to_numpy(zero_copy_only=False),
        completions=[Completion(ids[i], lps[i], rewards[i], finish[i], texts[i]) for i in range(n)],
        policy_version=col["policy_version"][0].as_py(),
        generator_id=col["generator_id"][0].as_py(),
        metadata=meta,
        created_at=col["created_at"][0].as_py(),
        group_id=col["group_id"][0].as_py(),
    )
    validate_group(g)
    return g
