"""Adopting the mesh (SPEC 12): read-only commands change nothing, mesh-init refuses an
orxaq-ops root, mesh-migrate re-authors a node's old events, and a mixed fleet converges
through a real bare remote. The orxaq-ops roots are the real ones in
tests/fixtures/orxaq-ops-fleet.tar.gz (written by the orxaq-ops code)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Runner, log_lines, run_process
from gitfleet import add_node, git, make_remote
from orxaq_autonomy import Mesh
from orxaq_autonomy.dispatch.dispatcher import Dispatcher
from orxaq_autonomy.envelope import parse_envelope
from orxaq_autonomy.store.keys import signature_ok

FIXTURE = Path(__file__).parent / "fixtures" / "orxaq-ops-fleet.tar.gz"
LOG = "artifacts/autonomy/event_mesh/events.ndjson"
ARCHIVE = "state/event_mesh/migrated-from-orxaq-ops"
LEDGER = "state/github_coordination/event_mesh"


def unpack(dest: Path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(dest, filter="data")
    return dest


def files(root: Path, skip_cache: bool = False) -> dict[str, str]:
    """Every file's bytes (hashed), by path; locks are allowed to appear. With
    `skip_cache`, the log index too (a read may rebuild or extend that cache)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.endswith(".lock"):
            continue
        if skip_cache and "log_index.sqlite3" in path.name:
            continue
        found[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def old_events(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (root / LOG).read_text().splitlines()]


def old_id(node: str, topic: str, event_type: str, payload: Any, ts: str, cause: str) -> str:
    """The orxaq-ops id rule, written out from its description (not from the product)."""
    body = {
        "node_id": node,
        "topic": topic,
        "event_type": event_type,
        "payload": payload,
        "event_ts": ts,
        "causation_id": cause,
    }
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    return "evt_" + digest.hexdigest()[:20]


READ_ONLY = (
    ("mesh-status",),
    ("mesh-log",),
    ("mesh-log", "--limit", "3"),
    ("mesh-verify",),
    ("mesh-dlq", "list"),
    ("mesh-dlq", "stats"),
    ("mesh-tasks", "list"),
)


# --- 1. read-only commands ---------------------------------------------------------------


def test_read_only_commands_leave_a_torn_tail_byte_identical(root: Path, cli: Runner) -> None:
    first = cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "a", "--json")
    cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "b")
    torn = b'{"v":1,"node_id":"node-a","seq":3,"pay'
    with open(root / LOG, "ab") as fh:
        fh.write(torn)
    before = files(root, skip_cache=True)
    event_id = first.json()["event_id"]
    for args in (*READ_ONLY, ("mesh-trace", event_id), ("mesh-log", "--json")):
        result = cli("--root", str(root), *args)
        assert result.code in (0, 3), (args, result.err)
        assert files(root, skip_cache=True) == before, args
    status = cli("--root", str(root), "mesh-status", "--json").json()
    assert status["log"]["events"] == 2 and status["log"]["uncommitted_bytes"] == len(torn)
    assert status["quarantined"]["incidents"] == 0
    # the first write repairs, and says what it did
    result = cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "c")
    assert result.code == 0 and "repaired" in result.err and "quarantine" in result.err
    assert [e["event_type"] for e in log_lines(root)] == ["a", "b", "c"]
    (moved,) = (root / "state/event_mesh/quarantine").iterdir()
    assert moved.read_bytes() == torn


def test_read_only_commands_on_a_lost_index_leave_the_torn_tail(root: Path, cli: Runner) -> None:
    cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "a")
    with open(root / LOG, "ab") as fh:
        fh.write(b'{"v":1,"torn')
    for suffix in ("", "-wal", "-shm"):
        (root / f"state/event_mesh/log_index.sqlite3{suffix}").unlink(missing_ok=True)
    log_before = (root / LOG).read_bytes()
    status = cli("--root", str(root), "mesh-status", "--json").json()
    assert status["log"]["events"] == 1
    assert (root / LOG).read_bytes() == log_before
    assert not list((root / "state/event_mesh/quarantine").iterdir())


def test_read_only_commands_on_an_orxaq_ops_root_change_nothing(
    tmp_path: Path, cli: Runner
) -> None:
    old = unpack(tmp_path) / "ops-b"
    before = files(old)
    for args in READ_ONLY:
        result = cli("--root", str(old), *args)
        # mesh-verify checks any checkout: it reports the old files (exit 3)
        assert result.code == (3 if args[0] == "mesh-verify" else 2), (args, result.err)
        assert "mesh-migrate" in result.err and "Traceback" not in result.err
        assert files(old) == before, args
    result = run_process("--root", str(old), "mesh-status", "--json")
    assert result.code == 2 and "mesh-migrate" in result.json()["error"]["message"]
    assert files(old) == before


def test_mesh_init_refuses_an_orxaq_ops_root_before_writing(tmp_path: Path, cli: Runner) -> None:
    old = unpack(tmp_path) / "ops-a"
    before = files(old)
    result = cli("--root", str(old), "mesh-init", "--node-id", "ops-a")
    assert result.code == 2
    assert "mesh-migrate" in result.err and "orxaq-ops" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert files(old) == before
    assert not (old / "state/event_mesh/node.json").exists()


# --- 3. mesh-migrate ---------------------------------------------------------------------


def test_dry_run_reports_and_changes_nothing(tmp_path: Path, cli: Runner) -> None:
    old = unpack(tmp_path) / "ops-b"
    before = files(old)
    report = cli("--root", str(old), "mesh-migrate", "--dry-run", "--json").json()
    assert report["dry_run"] and report["migrated"] == 80
    assert report["left_out"] == {"ops-a": 120} and report["handled"] == 80
    assert "log/events.ndjson" in report["moved"]
    assert files(old) == before


def test_migrate_ops_a_re_authors_every_event_it_authored(tmp_path: Path, cli: Runner) -> None:
    old = unpack(tmp_path) / "ops-a"
    original = (old / LOG).read_bytes()
    olds = old_events(old)
    result = cli("--root", str(old), "mesh-migrate", "--json")
    assert result.code == 0, result.err
    report = result.json()
    assert report["migrated"] == 120 and report["node_id"] == "ops-a"
    assert report["handled"] == 120 and report["left_out"] == {}
    assert report["causes_mapped"] == 60 and report["causes_legacy"] == 0
    assert report["id_mismatches"] == 0
    # the old files are kept, byte for byte
    assert (old / ARCHIVE / "log/events.ndjson").read_bytes() == original
    assert not list((old / LEDGER / "outbox/ops-a").glob("evt_*.json"))
    assert len(list((old / ARCHIVE / "ledger/outbox/ops-a").iterdir())) == 120
    # the new log: every old event once, in order, signed, valid, with its old id
    raw = (old / LOG).read_bytes().splitlines()
    events = [parse_envelope(line) for line in raw]
    assert [e["legacy_id"] for e in events] == [e["event_id"] for e in olds]
    assert [e["seq"] for e in events] == list(range(1, 121))
    with Mesh.open(old) as mesh:
        key = mesh.manifests()["ops-a"]["public_key"]
        assert mesh.identity.capabilities == ("cpu", "monitoring", "routing", "scheduling")
    assert all(signature_ok(e, key) for e in events)
    by_legacy = {e["legacy_id"]: e for e in events}
    for before, after in zip(olds, events, strict=True):
        assert after["payload"] == before["payload"]
        assert after["timestamp"] == before["timestamp"].replace("+00:00", "Z")
        if before["causation_id"]:
            assert after["causation_id"] == by_legacy[before["causation_id"]]["event_id"]
        else:
            assert "causation_id" not in after
    # the old dispatcher had handled all 120: nothing runs again
    assert cli("--root", str(old), "mesh-dispatch", "--json").json()["events"] == 0
    assert len(log_lines(old)) == 120
    # a follow-up's trace reaches its migrated cause
    follow = next(e for e in events if "causation_id" in e)
    trace = cli("--root", str(old), "mesh-trace", follow["event_id"], "--json").json()
    assert trace["causes"][0]["event_id"] == follow["causation_id"]
    # running twice changes nothing
    settled = files(old, skip_cache=True)
    again = cli("--root", str(old), "mesh-migrate", "--json")
    assert again.code == 0 and again.json()["migrated"] == 120 and not again.json()["changed"]
    assert files(old, skip_cache=True) == settled
    # and mesh-init is now a no-op on the migrated node
    assert cli("--root", str(old), "mesh-init").code == 0


def test_only_events_the_old_dispatcher_handled_are_skipped(tmp_path: Path, cli: Runner) -> None:
    old = unpack(tmp_path) / "ops-a"
    cursor = old / "state/event_mesh/dispatch_cursor.json"
    cursor.write_text(json.dumps({"offset": 50, "updated_at": "2026-12-02T13:08:59+00:00"}))
    seen = old / "state/event_mesh/dispatch_seen.json"
    first_50 = [e["event_id"] for e in old_events(old)[:50]]
    seen.write_text(json.dumps({"event_ids": sorted(first_50), "updated_at": "x"}))
    report = cli("--root", str(old), "mesh-migrate", "--json").json()
    assert report["handled"] == 50
    state = json.loads((old / "state/event_mesh/dispatch_cursor.json").read_text())
    assert state["dispatched"] == 50
    with Mesh.open(old) as mesh:
        loaded = Dispatcher(mesh).load_state()  # the dispatcher reads what migrate wrote
        assert loaded.check is not None
        last_handled = mesh.log.get(loaded.check["event_id"])
        assert last_handled is not None and last_handled["legacy_id"] == first_50[-1]
    dispatched = cli("--root", str(old), "mesh-dispatch", "--json").json()
    assert dispatched["events"] >= 70  # the 70 not handled (and their new follow-ups)


def test_a_migration_stopped_after_moving_the_files_resumes(tmp_path: Path, cli: Runner) -> None:
    clean = unpack(tmp_path / "clean") / "ops-b"
    crashed = unpack(tmp_path / "crashed") / "ops-b"
    # what a run killed after step 2 leaves: the record, and the old log moved aside
    archive = crashed / ARCHIVE
    (archive / "log").mkdir(parents=True)
    (archive / "migration.json").write_text(
        json.dumps({"status": "started", "node_id": "ops-b", "started_at": "x"})
    )
    (crashed / LOG).rename(archive / "log/events.ndjson")
    resumed = cli("--root", str(crashed), "mesh-migrate", "--json")
    assert resumed.code == 0, resumed.err
    assert resumed.json()["migrated"] == 80 and resumed.json()["handled"] == 80
    assert cli("--root", str(clean), "mesh-migrate", "--json").json()["migrated"] == 80
    # the same events, ids and all (ids do not cover the key's signature)
    assert [e["event_id"] for e in log_lines(crashed)] == [e["event_id"] for e in log_lines(clean)]
    assert cli("--root", str(crashed), "mesh-dispatch", "--json").json()["events"] == 0


def test_migrate_refuses_bad_input_and_changes_nothing(tmp_path: Path, cli: Runner) -> None:
    old = unpack(tmp_path) / "ops-a"
    lines = (old / LOG).read_text().splitlines()
    bad = json.loads(lines[3])
    bad["payload"] = {"password": "hunter2-hunter2"}
    lines[3] = json.dumps(bad, sort_keys=True)
    (old / LOG).write_text("\n".join(lines) + "\n")
    before = files(old)
    result = cli("--root", str(old), "mesh-migrate")
    assert result.code == 2 and "line 4" in result.err and "hunter2" not in result.err
    assert files(old) == before
    # nothing to migrate, or the wrong node
    fresh = tmp_path / "fresh"
    assert cli("--root", str(fresh), "mesh-migrate").code == 2
    assert not fresh.exists()
    good = unpack(tmp_path / "again") / "ops-a"
    assert cli("--root", str(good), "mesh-migrate").code == 0
    wrong = cli("--root", str(good), "mesh-migrate", "--node-id", "ops-z")
    assert wrong.code == 2 and "ops-a" in wrong.err


# A generated orxaq-ops log: two nodes interleaved, random causes (own earlier, own later,
# the other node's, unknown), written with the old id rule.
_payloads = st.dictionaries(
    st.sampled_from(["task_id", "n", "lane", "note"]),
    st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=8)),
    max_size=3,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["me", "other"]),
            st.sampled_from(["sched", "routing"]),
            _payloads,
            st.integers(-1, 40),  # cause: -1 none, else an index (maybe later, maybe missing)
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(0, 45),
)
def test_migration_of_any_old_log_keeps_every_event_and_link(
    rows: list[tuple[str, str, dict[str, Any], int]], cursor: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "old"
        (root / LOG).parent.mkdir(parents=True)
        olds: list[dict[str, Any]] = []
        ids = [f"evt_{i:020x}" for i in range(len(rows))]  # placeholders for later causes
        for i, (node, topic, payload, cause_at) in enumerate(rows):
            cause = ids[cause_at] if 0 <= cause_at < len(rows) else ""
            cause = "evt_" + "f" * 20 if cause_at == 40 else cause
            ts = f"2026-12-02T13:08:{i % 60:02d}.{i:06d}+00:00"
            event: dict[str, Any] = {
                "causation_id": cause,
                "event_type": "item.done",
                "node_id": node,
                "payload": payload,
                "source": "runtime",
                "timestamp": ts,
                "topic": topic,
            }
            event["event_id"] = old_id(node, topic, "item.done", payload, ts, cause)
            ids[i] = event["event_id"]
            olds.append(event)
        (root / LOG).write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in olds))
        state = root / "state/event_mesh"
        state.mkdir(parents=True)
        (state / "dispatch_cursor.json").write_text(json.dumps({"offset": cursor}))
        report = Mesh.migrate(root, node_id="me")
        mine = list(dict.fromkeys(e["event_id"] for e in olds if e["node_id"] == "me"))
        assert report.migrated == len(mine) and report.id_mismatches == 0
        assert report.left_out == (
            {"other": len(rows) - sum(1 for r in rows if r[0] == "me")}
            if any(r[0] == "other" for r in rows)
            else {}
        )
        raw = (root / LOG).read_bytes() if (root / LOG).exists() else b""
        events = [parse_envelope(line) for line in raw.splitlines()]
        assert [e["legacy_id"] for e in events] == mine
        new_of = {e["legacy_id"]: e["event_id"] for e in events}
        position = {e["event_id"]: i for i, e in enumerate(events)}
        first: dict[str, dict[str, Any]] = {}
        for e in olds:
            first.setdefault(e["event_id"], e)
        for event in events:
            cause = first[event["legacy_id"]]["causation_id"]
            if not cause:
                assert "causation_id" not in event and "legacy_causation_id" not in event
            elif "causation_id" in event:
                assert event["causation_id"] == new_of[cause]
                assert position[event["causation_id"]] < position[event["event_id"]]
            else:
                assert event["legacy_causation_id"] == cause
                assert cause not in new_of or position[new_of[cause]] > position[event["event_id"]]
        # the handled prefix: events whose old line index is below the cursor
        index = {e["event_id"]: i for i, e in reversed(list(enumerate(olds)))}
        handled = 0
        for legacy in mine:
            if index[legacy] >= cursor:
                break
            handled += 1
        assert report.handled == handled
        again = Mesh.migrate(root, node_id="me")
        assert not again.changed and again.migrated == report.migrated


# --- 4. a mixed fleet through a real bare remote ------------------------------------------


def _old_node_clone(base: Path, remote: Path, fixture: Path, name: str) -> Path:
    """A clone holding an orxaq-ops root as that node left it; its ledger pushed as the
    old code's git workflow would have."""
    root = base / name
    git(base, "clone", "-q", "-b", "main", str(remote), str(root))
    git(root, "config", "user.name", name)
    git(root, "config", "user.email", f"{name}@example.invalid")
    old = fixture / name
    shutil.copytree(old / "artifacts", root / "artifacts")
    shutil.copytree(old / "state/event_mesh", root / "state/event_mesh")
    for sub in (f"outbox/{name}", "nodes"):
        shutil.copytree(old / LEDGER / sub, root / LEDGER / sub, dirs_exist_ok=True)
    # ops-b had pulled ops-a's outbox: the clone brought the same files
    for path in (old / LEDGER / "outbox").rglob("*.json"):
        assert (root / LEDGER / path.relative_to(old / LEDGER)).read_bytes() == path.read_bytes()
    git(root, "add", LEDGER)
    git(root, "commit", "-q", "-m", f"orxaq-ops {name} ledger")
    git(root, "push", "-q", "origin", "HEAD:main")
    return root


def test_a_mixed_fleet_migrates_node_by_node_and_converges(tmp_path: Path, cli: Runner) -> None:
    fixture = unpack(tmp_path / "fixture")
    remote = make_remote(tmp_path)
    ops_a = _old_node_clone(tmp_path, remote, fixture, "ops-a")
    ops_b = _old_node_clone(tmp_path, remote, fixture, "ops-b")
    new = add_node(tmp_path, remote, "node-c")
    cli("--root", str(new), "mesh-publish", "--topic", "ci", "--event-type", "built")

    def sync(root: Path) -> dict[str, Any]:
        result = cli("--root", str(root), "mesh-sync", "--json")
        assert result.code == 0, result.err
        return dict(result.json())

    # both old nodes' files are reported, not skipped silently
    first = sync(new)
    assert first["legacy"] == {"ops-a": 120, "ops-b": 80} and first["imported"] == 0
    status = cli("--root", str(new), "mesh-status", "--json").json()
    assert status["awaiting_migration"] == {"ops-a": 120, "ops-b": 80}
    human = cli("--root", str(new), "mesh-status").out
    assert "ops-a waits for its mesh-migrate" in human
    imported = cli("--root", str(new), "mesh-import")
    assert imported.code == 0 and "waiting for ops-a's mesh-migrate" in imported.out

    # ops-a migrates and syncs: its events arrive with their legacy ids
    assert cli("--root", str(ops_a), "mesh-migrate").code == 0
    sync(ops_a)
    second = sync(new)
    assert second["imported"] == 120 and second["legacy"] == {"ops-b": 80}
    # ops-b migrates (leaving out ops-a's events it had imported) and syncs
    report = cli("--root", str(ops_b), "mesh-migrate", "--json").json()
    assert report["left_out"] == {"ops-a": 120} and report["migrated"] == 80
    sync(ops_b)
    for root in (new, ops_a, ops_b, new, ops_a):
        sync(root)

    expected = 120 + 80 + 1
    logs = {root.name: log_lines(root) for root in (ops_a, ops_b, new)}
    for name, events in logs.items():
        ids = [e["event_id"] for e in events]
        assert len(ids) == len(set(ids)) == expected, name
        legacy = Counter(e["legacy_id"] for e in events if "legacy_id" in e)
        assert len(legacy) == 200 and set(legacy.values()) == {1}, name
        held = set(ids)
        # every causation link resolves in the log; none stayed a dangling legacy link
        assert all(e["causation_id"] in held for e in events if "causation_id" in e)
        assert not [e for e in events if "legacy_causation_id" in e]
    assert {e["event_id"] for e in logs["ops-a"]} == {e["event_id"] for e in logs["node-c"]}
    assert {e["event_id"] for e in logs["ops-b"]} == {e["event_id"] for e in logs["node-c"]}
    # the fixture's old ids, all of them, each once
    old_ids = {e["event_id"] for n in ("ops-a", "ops-b") for e in old_events(fixture / n)}
    assert {e["legacy_id"] for e in logs["node-c"] if "legacy_id" in e} == old_ids
    status = cli("--root", str(new), "mesh-status", "--json").json()
    assert status["awaiting_migration"] == {}
    verify = cli("--root", str(new), "mesh-verify", "--json")
    assert verify.code == 0, verify.out
    # ops-b's follow-ups of its own events trace back to their migrated causes
    follow = next(e for e in logs["node-c"] if e["node_id"] == "ops-b" and "causation_id" in e)
    trace = cli("--root", str(new), "mesh-trace", follow["event_id"], "--json").json()
    assert trace["causes"][0]["event_id"] == follow["causation_id"]


def test_trace_follows_a_cross_node_legacy_link_once_its_cause_arrives(
    tmp_path: Path, cli: Runner
) -> None:
    # ops-b's old dispatcher handled an event of ops-a: its follow-up's cause is ops-a's
    fixture = unpack(tmp_path / "fixture")
    ops_b = fixture / "ops-b"
    olds = old_events(ops_b)
    cause = next(e for e in olds if e["node_id"] == "ops-a")
    ts = "2026-12-02T13:09:59.000001+00:00"
    follow = {
        "causation_id": cause["event_id"],
        "event_type": "tick.requested",
        "node_id": "ops-b",
        "payload": {},
        "source": "mesh-dispatch",
        "timestamp": ts,
        "topic": "scheduling",
    }
    follow["event_id"] = old_id("ops-b", "scheduling", "tick.requested", {}, ts, cause["event_id"])
    with open(ops_b / LOG, "a") as fh:
        fh.write(json.dumps(follow, sort_keys=True) + "\n")
    remote = make_remote(tmp_path)
    a = _old_node_clone(tmp_path, remote, fixture, "ops-a")
    b = _old_node_clone(tmp_path, remote, fixture, "ops-b")
    report = cli("--root", str(b), "mesh-migrate", "--json").json()
    assert report["causes_legacy"] == 1
    migrated = next(e for e in log_lines(b) if e.get("legacy_id") == follow["event_id"])
    assert migrated["legacy_causation_id"] == cause["event_id"]
    trace = cli("--root", str(b), "mesh-trace", migrated["event_id"], "--json").json()
    assert trace["causes"] == []  # ops-a has not migrated yet
    assert cli("--root", str(a), "mesh-migrate").code == 0
    for root in (a, b):
        cli("--root", str(root), "mesh-sync")
    trace = cli("--root", str(b), "mesh-trace", migrated["event_id"], "--json").json()
    assert trace["causes"][0]["legacy_id"] == cause["event_id"]
    assert trace["causes"][0]["node_id"] == "ops-a"


def test_migrate_json_prints_migrated(tmp_path: Path) -> None:
    old = unpack(tmp_path) / "ops-a"
    result = run_process("--root", str(old), "mesh-migrate", "--json")
    assert result.code == 0, result.err
    assert orjson.loads(result.out)["migrated"] == 120


@pytest.mark.parametrize("name", ["ops-a", "ops-b"])
def test_fixture_ids_follow_the_old_rule(tmp_path: Path, name: str) -> None:
    for e in old_events(unpack(tmp_path) / name):
        rule = old_id(
            e["node_id"],
            e["topic"],
            e["event_type"],
            e["payload"],
            e["timestamp"],
            e["causation_id"],
        )
        assert rule == e["event_id"]
