"""Defects found in review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from conftest import Runner, run_process, snapshot
from gitfleet import add_node, git, make_remote
from orxaq_autonomy import BadInput, Mesh
from orxaq_autonomy.dispatch.dispatcher import Dispatcher
from orxaq_autonomy.envelope import Draft, normalise_timestamp, seal
from orxaq_autonomy.errors import OperationFailed
from orxaq_autonomy.ledger.export import export_events
from orxaq_autonomy.ledger.importer import import_events
from orxaq_autonomy.store.keys import Signer, b64url

HANDLERS = """
from orxaq_autonomy.handlers import FollowUp, handler

@handler("jobs.#")
def job(event, ctx):
    if (ctx.layout.root / "failing").exists():
        raise RuntimeError("still failing")
    return FollowUp("results", "done", {"n": event["payload"]["n"]})

@handler("big.#")
def big(event, ctx):
    return FollowUp("results", "huge", {"blob": "x" * (1024 * 1024)})
"""


def configured(tmp_path: Path, extra: str = "") -> Mesh:
    Mesh.init(tmp_path, node_id="node-a")
    (tmp_path / "h.py").write_text(HANDLERS)
    (tmp_path / "state/event_mesh/config.toml").write_text(f'handlers = ["h.py"]\n{extra}')
    return Mesh.open(tmp_path)


def test_publish_with_a_lost_index_rebuilds_instead_of_blocking_on_its_own_lock(
    root: Path,
) -> None:
    for _ in range(3):
        assert (
            run_process(
                "--root", str(root), "mesh-publish", "--topic", "a", "--event-type", "b"
            ).code
            == 0
        )
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root}/state/event_mesh/log_index.sqlite3{suffix}").unlink(missing_ok=True)
    result = run_process(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "a",
        "--event-type",
        "b",
        "--json",
        timeout=20,
    )
    assert result.code == 0 and result.json()["seq"] == 4


def test_breaker_reopening_during_catch_up_skips_nothing(tmp_path: Path) -> None:
    mesh = configured(
        tmp_path, "[dispatch]\nbreaker_failures = 2\nmax_attempts = 1\nbreaker_open_seconds = 10\n"
    )
    (tmp_path / "failing").touch()
    now = [1000.0]
    mesh.publish_many(
        [{"topic": "jobs", "event_type": "run", "payload": {"n": i}} for i in range(5)]
    )
    Dispatcher(mesh, clock=lambda: now[0]).run()  # 2 failures open the breaker
    now[0] += 11
    Dispatcher(mesh, clock=lambda: now[0]).run()  # half open: fails again, pauses again
    (tmp_path / "failing").unlink()
    now[0] += 11
    Dispatcher(mesh, clock=lambda: now[0]).run()
    done = sorted(e["payload"]["n"] for e in mesh.log.iter_events() if e["event_type"] == "done")
    dead = {d["event_id"] for d in Dispatcher(mesh).dead_letters()}
    ids = [e["event_id"] for e in mesh.log.iter_events() if e["event_type"] == "run"]
    # every event either succeeded or is a dead letter: none vanished
    assert len(done) + len(dead) == 5
    assert {ids[n] for n in range(5) if n not in done} == dead


def test_an_oversize_follow_up_is_dead_lettered_and_dispatch_goes_on(tmp_path: Path) -> None:
    mesh = configured(tmp_path)
    mesh.publish("big", "one", {})
    mesh.publish("jobs", "run", {"n": 1})
    report = Dispatcher(mesh).run()
    assert report.dead_lettered == 1
    (letter,) = Dispatcher(mesh).dead_letters()
    assert "too large" in letter["error"]
    assert [e["payload"]["n"] for e in mesh.log.iter_events() if e["event_type"] == "done"] == [1]


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("0999-06-01T00:00:00Z", "0999-06-01T00:00:00.000000Z"),
        ("2026-13-45T99:99:99.000000Z", None),
        ("0001-01-01T00:00:00+01:00", None),
        ("9999-12-31T23:59:59-01:00", None),
    ],
)
def test_timestamps_are_checked_and_zero_padded(raw: str, ok: str | None) -> None:
    if ok is None:
        with pytest.raises(BadInput, match="bad timestamp"):
            normalise_timestamp(raw)
    else:
        assert normalise_timestamp(raw) == ok


def test_an_imported_clock_without_headroom_is_rejected(tmp_path: Path) -> None:
    Mesh.init(tmp_path / "b", node_id="node-b")
    b = Mesh.open(tmp_path / "b")
    key_file = tmp_path / "evil.key"
    key_file.write_text("ed25519:" + b64url(os.urandom(32)))
    signer = Signer(key_file)
    env, _ = seal(
        Draft.create("x", "y", {}),
        node_id="node-evil",
        seq=1,
        prev=None,
        clock=2**63 - 1,
        timestamp="2026-11-22T00:00:00.000000Z",
        signer=signer,
    )
    folder = b.layout.outbox_dir("node-evil") / "000000"
    folder.mkdir(parents=True)
    (folder / f"{env['event_id']}.json").write_bytes(orjson.dumps(env))
    manifest = {"node_id": "node-evil", "head": {"seq": 1}, "public_key": signer.public_key}
    (b.layout.nodes_dir / "node-evil.json").write_bytes(orjson.dumps(manifest))
    report = import_events(b)
    assert report.imported == 0 and "leaves no room" in report.rejected[0].reason
    assert b.publish("x", "y", {}).seq == 1  # the node can still publish


def test_since_cannot_smuggle_git_options(tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    a = add_node(tmp_path, remote, "node-a")
    out = tmp_path / "pwned.txt"
    result = run_process("--root", str(a), "mesh-verify", f"--since=--output={out}")
    assert result.code == 2 and "cannot start with '-'" in result.err
    assert not out.exists()


@pytest.mark.parametrize(
    "payload",
    ['{"password": 12345678}', '{"password": ["hunter2"]}', '{"api_key": {"value": "x1"}}'],
)
def test_secret_keys_holding_any_value_are_refused(root: Path, cli: Runner, payload: str) -> None:
    before = snapshot(root)
    result = cli(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "a",
        "--event-type",
        "b",
        "--payload-json",
        payload,
    )
    assert result.code == 2 and "secret-looking key" in result.err
    assert snapshot(root) == before


def test_integers_beyond_64_bit_are_refused_not_rounded(root: Path, cli: Runner) -> None:
    result = cli(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "a",
        "--event-type",
        "b",
        "--payload-json",
        '{"a": 99999999999999999999}',
    )
    assert result.code == 2 and "outside signed 64 bit" in result.err
    fine = cli(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "a",
        "--event-type",
        "b",
        "--payload-json",
        '{"a": "99999999999999999999"}',
        "--json",
    )
    assert fine.json()["event"]["payload"] == {"a": "99999999999999999999"}


def test_a_node_that_lost_its_log_refuses_to_fork_its_own_history(tmp_path: Path) -> None:
    Mesh.init(tmp_path, node_id="node-a")
    mesh = Mesh.open(tmp_path)
    mesh.publish_many([{"topic": "a", "event_type": "b"}] * 3)
    export_events(mesh)
    mesh.close()
    for name in (
        "artifacts/autonomy/event_mesh/events.ndjson",
        "state/event_mesh/log_index.sqlite3",
        "state/event_mesh/export_seen.json",
    ):
        (tmp_path / name).unlink(missing_ok=True)
    fresh = Mesh.open(tmp_path)
    fresh.publish("a", "b", {})
    with pytest.raises(OperationFailed, match="lost its log"):
        export_events(fresh)


def test_broken_files_are_clear_errors(tmp_path: Path, cli: Runner) -> None:
    mesh = configured(tmp_path)
    (tmp_path / "state/event_mesh/config.toml").write_bytes(b"handlers = [\xff]\n")
    result = cli("--root", str(tmp_path), "mesh-dispatch")
    assert result.code == 2 and "broken config" in result.err
    afile = tmp_path / "a-file"
    afile.write_text("x")
    result = cli("--root", str(afile), "mesh-status")
    assert result.code == 2 and "internal error" not in result.err
    os.environ.pop("ORXAQ_AUTONOMY_EVENT_MESH_FILE", None)
    mesh.close()


def test_a_stale_manifest_head_is_put_back_by_the_next_export(tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    a = add_node(tmp_path, remote, "node-a")
    with Mesh.open(a) as mesh:
        mesh.publish_many([{"topic": "a", "event_type": "b"}] * 2)
        export_events(mesh)
        path = mesh.layout.manifest_file("node-a")
        manifest = orjson.loads(path.read_bytes())
        path.write_bytes(orjson.dumps({**manifest, "head": {"seq": 1}}))  # a lost update
        export_events(mesh)
        assert orjson.loads(path.read_bytes())["head"]["seq"] == 2
    git(a, "status", "--porcelain")


def test_a_null_topic_is_a_missing_field_not_an_internal_error(root: Path, cli: Runner) -> None:
    """Found by the intake property test (issue 6): null means unset, and a required
    field that is unset was passed on as missing to Draft.create (TypeError, exit 1)."""
    before = snapshot(root)
    for line in ('{"topic": null, "event_type": "x"}', '{"topic": "ci", "event_type": null}'):
        result = cli("--root", str(root), "mesh-publish", "--stdin", stdin=line + "\n")
        assert result.code == 2 and "missing field" in result.err, result.err
    assert snapshot(root) == before
