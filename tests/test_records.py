"""The group record contract: Arrow IPC round trip, validation on write and on read."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from agro_dist.core.records import (
    GROUP_SCHEMA,
    SCHEMA_VERSION,
    Completion,
    RecordError,
    batch_to_ipc,
    decode_group,
    encode_group,
    group_to_batch,
)
from groups import make_group


def test_round_trip_keeps_every_field():
    g = make_group(3, version=7, n=5, tokens=33)
    back = decode_group(encode_group(g))
    for name in ("group_id", "prompt_id", "prompt", "policy_version", "generator_id", "created_at", "metadata", "schema_version"):
        assert getattr(back, name) == getattr(g, name), name
    assert list(back.prompt_token_ids) == list(g.prompt_token_ids)
    assert back.n == 5
    for a, b in zip(g.completions, back.completions):
        assert np.array_equal(a.token_ids, b.token_ids) and b.token_ids.dtype == np.int32
        assert np.array_equal(np.asarray(a.logprobs, np.float32), b.logprobs) and b.logprobs.dtype == np.float32
        assert (a.reward, a.finish_reason, a.text) == (b.reward, b.finish_reason, b.text)


def test_plain_python_lists_and_empty_completions_encode():
    g = make_group(0, n=2)
    g.completions[0] = Completion([5, 6, 7], [-0.1, -0.2, -0.3], 1, "stop")
    g.completions[1] = Completion([], [], 0.0, "length")  # a zero-token completion is legal
    back = decode_group(encode_group(g))
    assert back.completions[0].token_ids.tolist() == [5, 6, 7]
    assert back.completions[1].token_ids.size == 0
    assert back.rewards.tolist() == [1.0, 0.0]


def test_payload_is_plain_arrow_ipc_with_the_versioned_schema():
    blob = encode_group(make_group(1))
    table = pa.ipc.open_stream(blob).read_all()
    assert table.schema.equals(GROUP_SCHEMA, check_metadata=True)
    assert table.column("schema_version").to_pylist() == [SCHEMA_VERSION]
    assert table.schema.metadata[b"agro_dist.schema_version"] == str(SCHEMA_VERSION).encode()


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda g: setattr(g.completions[2], "logprobs", g.completions[2].logprobs[:-1]), "completions[2].logprobs"),
        (lambda g: setattr(g.completions[1], "reward", math.nan), "completions[1].reward"),
        (lambda g: setattr(g.completions[1], "reward", math.inf), "completions[1].reward"),
        (lambda g: setattr(g.completions[1], "reward", "1"), "completions[1].reward"),
        (lambda g: setattr(g.completions[0], "logprobs", np.full(16, np.nan)), "completions[0].logprobs"),
        (lambda g: setattr(g.completions[0], "logprobs", np.full(16, 0.5)), "completions[0].logprobs"),
        (lambda g: setattr(g.completions[0], "token_ids", np.full(16, -1)), "completions[0].token_ids"),
        (lambda g: setattr(g.completions[0], "token_ids", np.zeros(16, np.float32)), "completions[0].token_ids"),
        (lambda g: setattr(g.completions[3], "finish_reason", ""), "completions[3].finish_reason"),
        (lambda g: setattr(g, "schema_version", 2), "schema_version"),
        (lambda g: setattr(g, "policy_version", -1), "policy_version"),
        (lambda g: setattr(g, "policy_version", 1.5), "policy_version"),
        (lambda g: setattr(g, "completions", []), "completions"),
        (lambda g: setattr(g, "prompt_id", ""), "prompt_id"),
        (lambda g: setattr(g, "metadata", {"answer": object()}), "metadata"),
        (lambda g: setattr(g, "created_at", math.nan), "created_at"),
    ],
)
def test_bad_groups_are_rejected_naming_the_field(mutate, field):
    g = make_group(2)
    mutate(g)
    with pytest.raises(RecordError) as e:
        encode_group(g)
    assert e.value.field == field
    assert str(e.value).startswith(field + ": ")


def _batch_with(**changes) -> pa.RecordBatch:
    b = group_to_batch(make_group(4))
    cols = {name: b.column(i) for i, name in enumerate(b.schema.names)}
    fields = {f.name: f for f in b.schema}
    for name, value in changes.items():
        if value is None:
            del cols[name], fields[name]
        else:
            cols[name] = value
            fields[name] = pa.field(name, value.type)
    return pa.RecordBatch.from_arrays(list(cols.values()), schema=pa.schema(list(fields.values())))


def test_wrong_arrow_schemas_are_rejected_naming_the_field():
    with pytest.raises(RecordError, match=r"^rewards: missing from the record's schema"):
        batch_to_ipc(_batch_with(rewards=None))
    with pytest.raises(RecordError, match=r"^policy_version: has type string, expected int64"):
        batch_to_ipc(_batch_with(policy_version=pa.array(["3"])))
    with pytest.raises(RecordError, match=r"^extra: is not a field of the group schema"):
        batch_to_ipc(_batch_with(extra=pa.array([1])))
    b = group_to_batch(make_group(5)).replace_schema_metadata({b"agro_dist.schema_version": b"9"})
    with pytest.raises(RecordError, match=r"^schema_version: unknown schema version '9'"):
        batch_to_ipc(b)


def test_decode_rejects_corrupt_and_inconsistent_payloads():
    blob = encode_group(make_group(6))
    with pytest.raises(RecordError, match=r"^payload: not a readable Arrow IPC stream"):
        decode_group(b"\x00garbage" * 10)
    with pytest.raises(RecordError, match=r"^payload"):
        decode_group(blob[: len(blob) // 2])
    # A row whose schema_version column says 2, written by some other producer.
    bad = _batch_with(schema_version=pa.array([2], pa.int32()))
    with pytest.raises(RecordError, match=r"^schema_version: unknown schema version 2"):
        decode_group(batch_to_ipc(bad))
    # Per-completion columns that disagree on n.
    with pytest.raises(RecordError, match=r"^rewards: 3 entries for 4 completions"):
        decode_group(batch_to_ipc(_batch_with(rewards=pa.array([[1.0, 0.0, 1.0]], pa.list_(pa.float64())))))
    # NaN reward written by a foreign producer is caught on read too.
    with pytest.raises(RecordError, match=r"^completions\[0\]\.reward: must be finite"):
        decode_group(batch_to_ipc(_batch_with(rewards=pa.array([[math.nan, 0.0, 1.0, 0.0]], pa.list_(pa.float64())))))
