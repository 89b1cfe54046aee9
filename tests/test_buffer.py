"""The replay buffer against a real Redis server: sampling statistics, order, eviction,
staleness, timeouts, bad input, corrupt payloads, monitoring."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pyarrow as pa
import pytest
import redis

from agro_dist.buffer import BufferTimeout, RedisServer, ReplayBuffer, replay_count
from agro_dist.core.records import RecordError, group_to_batch
from groups import make_group


def fill_history(buf, count, *, version=0):
    """Put ``count`` groups and consume them (p = 0) so that they form the replay history."""
    buf.put([make_group(i, version=version, seed=99) for i in range(count)])
    taken = 0
    while taken < count:
        b = buf.sample(min(8, count - taken), p=0.0, timeout_s=5)
        buf.ack(b)
        taken += len(b)
    return [f"g-99-{i}" for i in range(count)]


def test_fresh_groups_come_out_in_order_exactly_once(make_buffer):
    buf = make_buffer(seed=0)
    buf.put([make_group(i) for i in range(50)])
    seen = []
    while len(seen) < 50:
        b = buf.sample(7 if len(seen) <= 42 else 50 - len(seen), p=0.0, timeout_s=5)
        assert all(it.source == "fresh" for it in b.items)
        seen += [g.group_id for g in b.groups]
        buf.ack(b)
    assert seen == [f"g-0-{i}" for i in range(50)]
    with pytest.raises(BufferTimeout):
        buf.sample(1, p=0.0, timeout_s=0.2)
    s = buf.stats()
    assert s["fresh_backlog"] == 0 and s["history_groups"] == 50 and s["acked"] == 50 and s["put_groups"] == 50


def test_replay_count_is_exact_per_batch_and_over_batches():
    for p in (0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 1 / 3, 0.9, 1.0):
        for slots in (1, 3, 8, 24):
            ks = [replay_count(p, slots, i) for i in range(200)]
            assert set(ks) <= {math.floor(p * slots), math.ceil(p * slots)}, (p, slots)
            for i in range(1, 201):  # after i batches exactly round(i p slots) slots replayed
                assert sum(ks[:i]) == math.floor(i * p * slots + 0.5)
    assert [replay_count(0.3, 8, i) for i in range(5)] == [2, 3, 2, 3, 2]


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_replayed_fraction_is_p_exactly(make_buffer, p):
    buf = make_buffer(seed=1, when_empty="replay")
    fill_history(buf, 20)
    draws, slots = 300, 8
    buf.put([make_group(i, seed=1) for i in range(draws * slots)])
    replayed = 0
    for _ in range(draws):
        b = buf.sample(slots, p=p, timeout_s=5)
        assert b.num_replayed in (math.floor(p * slots), math.ceil(p * slots))
        assert [it.source for it in b.items] == ["fresh"] * (slots - b.num_replayed) + ["replay"] * b.num_replayed
        replayed += b.num_replayed
        buf.ack(b)
    assert replayed == math.floor(draws * slots * p + 0.5)
    s = buf.stats()
    assert s["fresh_substituted"] == 0 and s["replay_unavailable"] == 0


def chi_square_uniform(counts):
    """Pearson's statistic and the 0.999 quantile of chi2(k - 1) (Wilson-Hilferty, error < 1%)."""
    counts = np.asarray(counts, dtype=float)
    k, N = len(counts), counts.sum()
    stat = ((counts - N / k) ** 2 / (N / k)).sum()
    df, z = k - 1, 3.0902  # z_{0.999}
    q = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, q


def test_replayed_groups_are_uniform_over_the_history(make_buffer):
    buf = make_buffer(seed=2)
    ids = fill_history(buf, 25)
    counts = dict.fromkeys(ids, 0)
    for _ in range(500):
        b = buf.sample(10, p=1.0)
        for g in b.groups:
            counts[g.group_id] += 1
    stat, q = chi_square_uniform(list(counts.values()))
    print(f"\nchi-square over 25 history groups, 5000 draws: {stat:.1f} (0.999 quantile {q:.1f})")
    assert stat < q
    # The same test has the power to reject a mild skew (the newer half 1.5x as likely).
    rng = np.random.default_rng(0)
    w = np.r_[np.ones(13), 1.5 * np.ones(12)]
    skewed = np.bincount(rng.choice(25, 5000, p=w / w.sum()), minlength=25)
    assert chi_square_uniform(skewed)[0] > q


def test_history_eviction_keeps_the_newest_by_count_and_by_bytes(make_buffer):
    buf = make_buffer(history_max_groups=10)
    fill_history(buf, 25)
    seen = {g.group_id for _ in range(100) for g in buf.sample(10, p=1.0).groups}
    assert seen == {f"g-99-{i}" for i in range(15, 25)}
    s = buf.stats()
    assert s["history_groups"] == 10 and s["evicted"] == 15

    one = len(buf.sample(1, p=1.0).items[0].group.prompt) and buf.sample(1, p=1.0).items[0].nbytes
    buf2 = make_buffer(history_max_bytes=int(4.5 * one))
    fill_history(buf2, 12)
    seen2 = {g.group_id for _ in range(100) for g in buf2.sample(4, p=1.0).groups}
    assert seen2 == {f"g-99-{i}" for i in range(8, 12)}
    assert buf2.stats()["history_bytes"] <= 4.5 * one


def test_max_staleness_skips_old_fresh_groups_and_reports_staleness(make_buffer):
    buf = make_buffer(max_staleness=2)
    buf.put([make_group(i, version=i) for i in range(6)])  # versions 0..5
    b = buf.sample(3, p=0.0, current_version=5, timeout_s=2)
    assert [g.policy_version for g in b.groups] == [3, 4, 5]
    assert b.staleness == [2, 1, 0]
    buf.ack(b)
    s = buf.stats()
    assert s["stale_skipped"] == 3 and s["fresh_backlog"] == 0
    assert s["staleness_hist"] == {0: 1, 1: 1, 2: 1} and s["replay_age_hist"] == {}
    # Skipped groups were never trained on: they are deleted, not replayed; the history holds
    # the three that were trained, and every put group is accounted for.
    assert s["history_groups"] == 3 and s["put_groups"] == s["acked"] + s["stale_skipped"] + s["fresh_backlog"] + s["fresh_pending"]
    assert s["put_completions"] == 6 * 4
    # Replayed groups may be older than max_staleness: their age is counted apart from fresh staleness.
    r = buf.sample(3, p=1.0, current_version=9)
    assert all(it.source == "replay" and it.staleness >= 4 for it in r.items)
    assert sorted(g.group_id for g in r.groups) == ["g-0-3", "g-0-4", "g-0-5"]
    s = buf.stats()
    assert s["staleness_hist"] == {0: 1, 1: 1, 2: 1} and sum(s["replay_age_hist"].values()) == 3
    assert min(s["replay_age_hist"]) >= 4
    # Synchronous mode: max_staleness = 0 serves only the current version.
    sync = make_buffer(max_staleness=0)
    sync.put([make_group(i, version=v) for i, v in enumerate([3, 4, 4, 3, 4])])
    b = sync.sample(3, p=0.0, current_version=4, timeout_s=2)
    assert [g.policy_version for g in b.groups] == [4, 4, 4] and b.staleness == [0, 0, 0]


def test_when_empty_wait_times_out_without_losing_taken_groups(make_buffer):
    buf = make_buffer(when_empty="wait")
    buf.put([make_group(i) for i in range(3)])
    t = time.monotonic()
    with pytest.raises(BufferTimeout, match="3 of 5 fresh groups"):
        buf.sample(5, p=0.0, timeout_s=0.5)
    assert time.monotonic() - t >= 0.5
    buf.put([make_group(i) for i in range(3, 5)])
    b = buf.sample(5, p=0.0, timeout_s=2)
    assert [g.group_id for g in b.groups] == [f"g-0-{i}" for i in range(5)]
    assert buf.stats()["timeouts"] == 1


def test_when_empty_replay_serves_history_at_once(make_buffer):
    buf = make_buffer(when_empty="replay", seed=3)
    fill_history(buf, 5)
    buf.put([make_group(100)])
    t = time.monotonic()
    b = buf.sample(4, p=0.0, timeout_s=30)
    assert time.monotonic() - t < 5
    assert [it.source for it in b.items] == ["fresh", "replay", "replay", "replay"]
    assert buf.stats()["fresh_substituted"] == 3
    # With no history either, it waits like "wait" (never trains on nothing).
    empty = make_buffer(when_empty="replay")
    with pytest.raises(BufferTimeout):
        empty.sample(2, p=0.5, timeout_s=0.3)


def test_pure_replay_uses_fresh_data_until_there_is_a_history(make_buffer):
    buf = make_buffer()
    buf.put([make_group(i) for i in range(4)])
    b = buf.sample(4, p=1.0, timeout_s=2)
    assert b.num_replayed == 0 and buf.stats()["replay_unavailable"] == 4


def test_bad_input_is_rejected_at_put_naming_the_field(make_buffer):
    buf = make_buffer()
    good = make_group(0)
    lengths = make_group(1)
    lengths.completions[2].logprobs = lengths.completions[2].logprobs[:-3]
    nan = make_group(2)
    nan.completions[0].reward = float("nan")
    version = make_group(3)
    version.schema_version = 2
    b = group_to_batch(make_group(4))
    wrong_schema = pa.RecordBatch.from_arrays(b.columns[:-1], schema=pa.schema(list(b.schema)[:-1]))
    cases = [
        (lengths, r"groups\[1\]\.completions\[2\]\.logprobs: 13 values for 16 token_ids"),
        (nan, r"groups\[1\]\.completions\[0\]\.reward: must be finite"),
        (version, r"groups\[1\]\.schema_version: unknown schema version 2"),
        (wrong_schema, r"groups\[1\]\.metadata: missing from the record's schema"),
    ]
    for bad, msg in cases:
        with pytest.raises(RecordError, match=msg):
            buf.put([good, bad])
    s = buf.stats()
    assert s["rejected"] == 4
    assert s["put_groups"] == 0 and s["fresh_backlog"] == 0  # nothing of a rejected call is written
    # A valid Arrow record batch from another producer is accepted.
    buf.put(group_to_batch(make_group(5)))
    assert buf.sample(1, p=0.0, timeout_s=2).groups[0].group_id == "g-0-5"


def test_corrupt_payloads_in_redis_are_skipped_logged_counted(make_buffer, caplog):
    buf = make_buffer(seed=4)
    fill_history(buf, 3)
    buf.put(make_group(10))
    buf.r.xadd(buf.k_stream, {"d": b"\xff not arrow", "v": 0})  # written by something else
    buf.put(make_group(11))
    with caplog.at_level(logging.ERROR, logger="agro_dist.buffer"):
        b = buf.sample(2, p=0.0, timeout_s=2)
        assert [g.group_id for g in b.groups] == ["g-0-10", "g-0-11"]
        buf.ack(b)
        # A damaged history entry: a broken payload that the history index points at.
        bad_id = buf.r.xadd(buf.k_stream, {"d": b"truncated", "v": 0})
        buf.r.xgroup_setid(buf.k_stream, "learners", bad_id)  # as if delivered and acked
        buf.r.zadd(buf.k_hz, {bad_id: 0})
        buf.r.hset(buf.k_hsize, bad_id, 9)
        good = {f"g-99-{i}" for i in range(3)} | {"g-0-10", "g-0-11"}
        for _ in range(30):  # replay draws run into the damaged entry
            r = buf.sample(3, p=1.0)
            assert len(r) == 3 and {g.group_id for g in r.groups} <= good
    assert "corrupt fresh group" in caplog.text and "corrupt replay group" in caplog.text
    s = buf.stats()
    assert s["corrupt"] == 2 and s["dead_letters"] == 2 and s["history_groups"] == 5 and s["fresh_backlog"] == 0
    dead = buf.r.xrange(buf.k_dead)
    assert {e[1][b"source"] for e in dead} == {b"fresh", b"replay"}
    assert b"payload" in dead[0][1][b"error"]


def test_stats_report_backlog_bytes_rates_and_fractions(make_buffer):
    buf = make_buffer(seed=5)
    buf.stats()
    ids = buf.put([make_group(i) for i in range(10)])
    assert len(ids) == 10
    b = buf.sample(4, p=0.0, timeout_s=2)
    s = buf.stats()
    assert s["fresh_backlog"] == 6 and s["fresh_pending"] == 4
    assert s["put_bytes"] == s["fresh_bytes"] > 0 and s["put_groups_per_s"] > 0
    buf.ack(b)
    s = buf.stats()
    assert s["fresh_pending"] == 0 and s["history_groups"] == 4
    assert s["history_bytes"] + s["fresh_bytes"] == s["put_bytes"]
    assert s["replay_fraction_served"] == 0.0


def test_embedded_server_is_loopback_only_and_stops_on_close(tmp_path):
    buf = ReplayBuffer(run_dir=str(tmp_path / "run"), name="emb")
    try:
        server = buf.server
        assert server.port != 6379
        c = server.client()

        def config_get(key):  # CONFIG is renamed to a name of this server's own
            r = c.execute_command(server.config_command, "GET", key)  # redis-py: {b"key": b"value"}
            return r[key.encode()].decode()

        assert config_get("bind") == "127.0.0.1" and config_get("protected-mode") == "yes" and config_get("appendonly") == "yes"
        assert (tmp_path / "run" / "redis.conf").exists() and oct((tmp_path / "run" / "redis.conf").stat().st_mode & 0o777) == "0o600"
        buf.put(make_group(0))
        assert buf.sample(1, timeout_s=2).groups[0].group_id == "g-0-0"
    finally:
        buf.close()
    assert not server.alive()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=1, retry=None).ping()


def test_a_private_redis_refuses_clients_without_its_password_and_has_no_config_command(tmp_path):
    """Another local user can reach 127.0.0.1 and the socket's folder; without the password every
    command is refused, over TCP and the unix socket, and even with it CONFIG, DEBUG and MODULE
    are unknown commands (CONFIG SET dir would write files as the run's user)."""
    with RedisServer(str(tmp_path)) as server:
        assert server.password and len(server.password) >= 32
        for anon in (redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2, retry=None),
                     redis.Redis(unix_socket_path=server.unix_socket, socket_timeout=2, retry=None)):
            with pytest.raises(redis.AuthenticationError):
                anon.set("x", 1)
            with pytest.raises(redis.AuthenticationError):
                anon.flushall()
        c = server.client()
        assert c.ping()
        for cmd in (("CONFIG", "SET", "dir", "/tmp"), ("DEBUG", "SLEEP", "0"), ("MODULE", "LIST")):
            with pytest.raises(redis.ResponseError, match="unknown command"):
                c.execute_command(*cmd)
        assert RedisServer(str(tmp_path / "b")).password != server.password  # one per server


def test_redis_url_with_password(tmp_path):
    with RedisServer(str(tmp_path), password="s3cret", unix_socket=False) as server:
        with pytest.raises(redis.AuthenticationError):
            ReplayBuffer(f"redis://127.0.0.1:{server.port}/0", name="pw")
        with ReplayBuffer(server.url, name="pw") as buf:
            buf.put(make_group(0))
            assert buf.sample(1, timeout_s=2).groups[0].group_id == "g-0-0"
        with ReplayBuffer(f"redis://127.0.0.1:{server.port}/0", name="pw", redis_kwargs={"password": "s3cret"}) as other:
            assert other.stats()["put_groups"] == 1


def test_config_errors():
    for kw, msg in ((dict(replay_prob=1.5), "replay_prob"), (dict(when_empty="drop"), "when_empty"), (dict(max_staleness=-1), "max_staleness")):
        with pytest.raises(ValueError, match=msg):
            ReplayBuffer("redis://127.0.0.1:1/0", **kw)


def test_groups_kept_after_a_timeout_are_rechecked_for_staleness(make_buffer):
    buf = make_buffer(max_staleness=1)
    buf.put([make_group(i, version=3) for i in range(2)])
    with pytest.raises(BufferTimeout):
        buf.sample(4, p=0.0, current_version=3, timeout_s=0.2)  # takes the two, keeps them
    buf.put([make_group(i, version=5) for i in range(2, 4)])
    b = buf.sample(2, p=0.0, current_version=5, timeout_s=2)  # version moved on: 3 is too old now
    assert [g.group_id for g in b.groups] == ["g-0-2", "g-0-3"] and b.staleness == [0, 0]
    s = buf.stats()
    assert s["stale_skipped"] == 2 and s["history_groups"] == 0 and s["fresh_pending"] == 2


def test_a_foreign_batch_with_fields_in_another_order_round_trips(make_buffer):
    """Validation matches fields by name, so another producer's column order is legal; it must
    not break decoding (it once crashed sample() with a ValueError from a schema cast)."""
    b = group_to_batch(make_group(7))
    names = list(reversed(b.schema.names))
    reordered = pa.RecordBatch.from_arrays([b.column(n) for n in names], names=names)
    buf = make_buffer()
    buf.put([make_group(6), reordered])
    got = buf.sample(2, p=0.0, timeout_s=2)
    assert [g.group_id for g in got.groups] == ["g-0-6", "g-0-7"] and buf.stats()["corrupt"] == 0


def train_versions(buf, versions, *, seed=7):
    """Groups of these policy versions put, sampled fresh and acked: the history, in order."""
    buf.put([make_group(i, version=v, seed=seed) for i, v in enumerate(versions)])
    b = buf.sample(len(versions), p=0.0, timeout_s=5)
    buf.ack(b)
    return [g.group_id for g in b.groups]


def test_replay_window_serves_only_recent_versions_and_evicts_the_rest(make_buffer):
    buf = make_buffer(seed=4, replay_window=3)
    ids = train_versions(buf, [v for v in range(10) for _ in range(2)])  # 2 groups of each version 0..9
    assert buf.replayable(current_version=9) == 8  # versions 6..9
    assert buf.replayable() == 20  # no version given: the whole history
    seen = set()
    for t in range(50):
        b = buf.sample(4, p=1.0, current_version=9, timeout_s=1)
        assert all(it.source == "replay" and it.staleness <= 3 for it in b.items)
        seen |= {g.group_id for g in b.groups}
    assert seen == set(ids[12:])
    s = buf.stats()
    assert s["evicted_window"] == 12 and s["history_groups"] == 8
    assert set(s["replay_age_hist"]) == {0, 1, 2, 3} and sum(s["replay_age_hist"].values()) == 200
    # The window is short of what a batch asks: fresh groups stand in, counted.
    buf.put([make_group(100 + i, version=12, seed=7) for i in range(3)])
    b = buf.sample(4, p=1.0, current_version=12, timeout_s=2)  # window 9..12: 2 groups of version 9
    assert [it.source for it in b.items] == ["fresh", "fresh", "replay", "replay"]
    assert buf.stats()["replay_unavailable"] == 2


def test_recency_weighting_draws_newer_groups_in_proportion_to_position(make_buffer):
    buf = make_buffer(seed=5, replay_weighting="recency")
    ids = train_versions(buf, list(range(10)))
    counts = dict.fromkeys(ids, 0)
    draws = 4000
    for _ in range(draws // 4):  # one group per batch: no without-replacement effect
        for _ in range(4):
            counts[buf.sample(1, p=1.0, current_version=10).groups[0].group_id] += 1
    obs = np.array([counts[i] for i in ids], dtype=float)
    expect = draws * (2 * np.arange(10) + 1) / 100.0  # P(position k) = ((k+1)^2 - k^2) / n^2
    stat = ((obs - expect) ** 2 / expect).sum()
    _, q = chi_square_uniform(np.ones(10))
    print(f"\nrecency draws by position {obs.astype(int).tolist()}, chi-square against linear weights {stat:.1f} (0.999 quantile {q:.1f})")
    assert stat < q
    # Uniform draws are far from it (the test has the power to tell them apart).
    flat = ((draws / 10 - expect) ** 2 / expect).sum()
    assert flat > 10 * q


def test_replay_cap_retires_a_group_after_max_uses(make_buffer):
    buf = make_buffer(seed=6, replay_max_uses=2)
    ids = train_versions(buf, [0] * 5)
    counts = dict.fromkeys(ids, 0)
    for _ in range(10):
        counts[buf.sample(1, p=1.0, timeout_s=1).groups[0].group_id] += 1
    assert set(counts.values()) == {2}
    s = buf.stats()
    assert s["retired"] == 5 and s["history_groups"] == 0 and s["history_bytes"] == 0
    buf.put([make_group(50, seed=7)])
    assert buf.sample(1, p=1.0, timeout_s=2).items[0].source == "fresh"  # nothing left to replay


def test_ranks_draw_disjoint_groups_and_a_restart_continues_the_stream(make_buffer):
    name = "ranks"
    a = make_buffer(name, seed=0, consumer="learner-0")
    train_versions(a, [0] * 12)
    b = make_buffer(name, seed=0, consumer="learner-1")
    for step in range(20):  # two ranks of one learner step: disjoint draws, 6 + 6 of 12
        ga = {g.group_id for g in a.sample(6, p=1.0, batch_index=step, timeout_s=1).groups}
        gb = {g.group_id for g in b.sample(6, p=1.0, batch_index=step, timeout_s=1).groups}
        assert len(ga) == 6 and len(gb) == 6 and not ga & gb
    # A consumer's draws are seeded by (seed, consumer, batch): a restarted rank at step k draws
    # what the uninterrupted one drew at step k (same history), not its step-0 draws again.
    runs = {}
    for label, steps in (("whole", range(4)), ("restarted", [3])):
        buf = make_buffer(f"{name}-{label}", seed=0, consumer="learner-0")
        train_versions(buf, [0] * 12)
        runs[label] = {k: sorted(g.group_id for g in buf.sample(3, p=1.0, batch_index=k, timeout_s=1).groups) for k in steps}
    assert runs["restarted"][3] == runs["whole"][3]
    assert len({tuple(v) for v in runs["whole"].values()}) == 4
