"""The log and its index through the library API: chains, batches, idempotency, recovery."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orxaq_autonomy import BadInput, Mesh
from orxaq_autonomy.envelope import parse_envelope


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    Mesh.init(tmp_path, node_id="node-a")
    return Mesh.open(tmp_path)


def check_chain(mesh: Mesh) -> list[dict[str, object]]:
    """Every line parses strictly; seq is gap-free; prev links; clock increases."""
    raw = mesh.layout.log_file.read_bytes()
    assert raw.endswith(b"\n")
    events = [parse_envelope(line) for line in raw.splitlines()]
    prev = None
    for i, env in enumerate(events, 1):
        assert env["seq"] == i
        assert env.get("prev") == prev
        assert env["clock"] == i  # a single node: the Lamport clock counts its events
        prev = env["event_id"]
    return events


def test_publish_chains_events(mesh: Mesh) -> None:
    first = mesh.publish("ci", "result", {"ok": True}, source="test")
    second = mesh.publish("ci", "result", {"ok": False}, causation_id=first.event_id)
    events = check_chain(mesh)
    assert [e["event_id"] for e in events] == [first.event_id, second.event_id]
    assert events[1]["causation_id"] == first.event_id
    assert mesh.get(second.event_id[:10]) == events[1]


def test_batch_is_all_or_none(mesh: Mesh) -> None:
    mesh.publish("ci", "result", {})
    before = mesh.layout.log_file.read_bytes()
    with pytest.raises(BadInput, match="item 3: bad topic"):
        mesh.publish_many(
            [
                {"topic": "ci", "event_type": "a"},
                {"topic": "ci", "event_type": "b"},
                {"topic": "CI", "event_type": "c"},
            ]
        )
    with pytest.raises(BadInput, match="too large"):  # fails while sealing, after validation
        mesh.publish_many(
            [
                {"topic": "ci", "event_type": "a"},
                {"topic": "ci", "event_type": "b", "payload": {"x": "y" * (1 << 20)}},
            ]
        )
    assert mesh.layout.log_file.read_bytes() == before
    results = mesh.publish_many([{"topic": "ci", "event_type": "a"}] * 3)
    assert [r.seq for r in results] == [2, 3, 4]
    check_chain(mesh)


def test_idempotency_keys_dedupe_per_tenant(mesh: Mesh) -> None:
    a = mesh.publish("ci", "run", {"n": 1}, idempotency_key="run-991")
    again = mesh.publish("ci", "run", {"n": 2}, idempotency_key="run-991")
    other_tenant = mesh.publish("ci", "run", {"n": 3}, idempotency_key="run-991", tenant="acme")
    assert again.duplicate and again.event_id == a.event_id and again.seq == a.seq
    assert not other_tenant.duplicate
    batch = mesh.publish_many(
        [{"topic": "ci", "event_type": "x", "idempotency_key": "k"}] * 2
        + [{"topic": "ci", "event_type": "x", "idempotency_key": "run-991"}]
    )
    assert [r.duplicate for r in batch] == [False, True, True]
    assert batch[1].event_id == batch[0].event_id
    assert len(check_chain(mesh)) == 3


def test_prefix_resolution(mesh: Mesh) -> None:
    ids = [mesh.publish("ci", "n", {"i": i}).event_id for i in range(40)]
    assert mesh.resolve_event_id(ids[7]) == ids[7]
    assert mesh.resolve_event_id(ids[7][4:14]) == ids[7]
    # 40 ids over 16 hex digits: some first digit is shared (pigeonhole)
    firsts = [i[4] for i in ids]
    shared = next(d for d in firsts if firsts.count(d) > 1)
    with pytest.raises(BadInput, match="ambiguous"):
        mesh.resolve_event_id("evt_" + shared)
    missing = next(d for d in "0123456789abcdef" if d + d not in {i[4:6] for i in ids})
    with pytest.raises(BadInput, match="unknown event id"):
        mesh.resolve_event_id(missing + missing)
    for bad in ("evt_", "evt_XYZ", "g00d", "evt_" + "a" * 65):
        with pytest.raises(BadInput, match="bad event id"):
            mesh.resolve_event_id(bad)


def test_events_query_filters_and_limit_takes_the_newest(mesh: Mesh) -> None:
    mesh.publish("routing", "route.requested", {"i": 0})
    mesh.publish("scaling", "decision.made", {"i": 1})
    mesh.publish("routing", "route.selected", {"i": 2}, timestamp="2030-01-01T00:00:00Z")
    assert [e["payload"]["i"] for e in mesh.events(match="routing.#")] == [0, 2]
    assert [e["payload"]["i"] for e in mesh.events(match="*.route.*", limit=1)] == [2]
    assert [e["payload"]["i"] for e in mesh.events(since="2029-12-31T21:00:00-02:00")] == [2]
    assert mesh.events(since="2029-12-31T23:00:00-02:00") == []
    assert mesh.events(node="node-b") == []
    assert [e["payload"]["i"] for e in mesh.events(limit=2)] == [1, 2]


@given(st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=30))
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_reverse_reading_matches_forward_reading(mesh: Mesh, sizes: list[int]) -> None:
    """Backward reads cross 1 MiB chunk edges; shrink the chunk to exercise them."""
    import orxaq_autonomy.store.log as logmod

    mesh.publish_many([{"topic": "t", "event_type": "e", "payload": {"s": "x" * n}} for n in sizes])
    old = logmod._READ_CHUNK
    logmod._READ_CHUNK = 97
    try:
        forward = list(mesh.log.iter_events())
        backward = list(mesh.log.iter_events_reverse())
    finally:
        logmod._READ_CHUNK = old
    assert backward == forward[::-1]


def test_torn_tail_is_quarantined_and_never_merged(mesh: Mesh) -> None:
    mesh.publish("ci", "a", {})
    log = mesh.layout.log_file
    with open(log, "ab") as fh:  # what a writer killed mid-write leaves behind
        fh.write(b'{"v":1,"event_id":"evt_12')
    mesh.close()
    mesh = Mesh.open(mesh.layout.root)
    # a read leaves the torn bytes where they are (SPEC 12); the next write moves them
    assert mesh.status()["quarantined"]["incidents"] == 0
    assert log.read_bytes().endswith(b'{"v":1,"event_id":"evt_12')
    mesh.publish("ci", "b", {})
    assert mesh.status()["quarantined"]["incidents"] == 1
    events = check_chain(mesh)
    assert [e["event_type"] for e in events] == ["a", "b"]
    (quarantined,) = mesh.layout.quarantine_dir.iterdir()
    assert quarantined.read_bytes() == b'{"v":1,"event_id":"evt_12'


def test_index_is_rebuilt_when_lost(mesh: Mesh) -> None:
    ids = [r.event_id for r in mesh.publish_many([{"topic": "t", "event_type": "e"}] * 5)]
    mesh.publish("t", "e", {}, idempotency_key="once")
    mesh.close()
    for suffix in ("", "-wal", "-shm"):
        path = Path(str(mesh.layout.index_file) + suffix)
        if path.exists():
            os.unlink(path)
    again = Mesh.open(mesh.layout.root)
    assert again.status()["log"]["events"] == 6
    assert again.resolve_event_id(ids[2][:12]) == ids[2]
    assert again.publish("t", "e", {}, idempotency_key="once").duplicate
    assert again.publish("t", "e", {}).seq == 7
    check_chain(again)


def test_a_replaced_log_is_detected_and_reindexed(mesh: Mesh, tmp_path: Path) -> None:
    mesh.publish_many([{"topic": "t", "event_type": "e"}] * 3)
    other_root = tmp_path / "other"
    Mesh.init(other_root, node_id="node-a")
    with Mesh.open(other_root) as other:
        other.publish_many(
            [{"topic": "u", "event_type": "f", "payload": {"i": i}} for i in range(5)]
        )
        replacement = other.layout.log_file.read_bytes()
    mesh.layout.log_file.write_bytes(replacement)  # e.g. a backup restored over the log
    mesh.close()
    reopened = Mesh.open(mesh.layout.root)
    assert reopened.status()["log"]["events"] == 5
    assert reopened.publish("t", "e", {}).seq == 6
    check_chain(reopened)


def test_log_lines_are_canonical_json_with_id(mesh: Mesh) -> None:
    result = mesh.publish("ci", "r", {"b": 1, "a": [1.5, "é"]})
    line = mesh.layout.log_file.read_bytes().splitlines()[0]
    assert line == orjson.dumps(result.envelope, option=orjson.OPT_SORT_KEYS)
    assert "é".encode() in line  # UTF-8, not \\u escapes


def test_a_long_index_backlog_is_stored_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lookups catch the id index up chunk by chunk (each chunk a transaction, so appends
    wait for one chunk, not the whole backlog); every chunk boundary must be exact."""
    import orxaq_autonomy.store.log as log_module

    monkeypatch.setattr(log_module, "_INDEX_CHUNK", 3)
    Mesh.init(tmp_path, node_id="node-a")
    mesh = Mesh.open(tmp_path)
    ids = [
        r.event_id
        for r in mesh.publish_many(
            {"topic": "ci", "event_type": "x", "payload": {"i": i}} for i in range(10)
        )
    ]
    assert mesh.get(ids[-1])["payload"] == {"i": 9}
    size = mesh.log.db.execute("SELECT indexed_size FROM tail").fetchone()[0]
    assert size == mesh.log.committed().log_size
    assert mesh.log.db.execute("SELECT count(*) FROM events").fetchone()[0] == 10
    for i, event_id in enumerate(ids):
        assert mesh.get(event_id[:12])["payload"] == {"i": i}
