"""Export, import, mesh-sync and mesh-verify with real git: a bare remote, real clones,
real processes."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from conftest import Runner, run_process
from gitfleet import add_node, event_ids, git, make_remote
from orxaq_autonomy import Mesh
from orxaq_autonomy.ledger.files import bucket_of
from orxaq_autonomy.ledger.sync import Syncer

LEDGER = "state/github_coordination/event_mesh"


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Path, Path, Path]:
    remote = make_remote(tmp_path)
    return remote, add_node(tmp_path, remote, "node-a"), add_node(tmp_path, remote, "node-b")


def publish(root: Path, topic: str, event_type: str, **payload: object) -> str:
    with Mesh.open(root) as mesh:
        return mesh.publish(topic, event_type, dict(payload)).event_id


def test_two_nodes_converge_without_rehandling(fleet: tuple[Path, Path, Path]) -> None:
    _, a, b = fleet
    publish(a, "scheduling", "task.enqueued", task_id="t1")
    publish(b, "monitoring", "heartbeat.changed")
    for root in (a, b, a):
        result = run_process("--root", str(root), "mesh-sync", "--json")
        assert result.code == 0, result.err
        assert result.json()["pushed"] is True
    assert sorted(event_ids(a)) == sorted(event_ids(b))
    with Mesh.open(b) as mesh:
        kinds = Counter(f"{e['node_id']}:{e['event_type']}" for e in mesh.log.iter_events())
    # node-a's chain ran on node-a only; node-b's heartbeat tick ran on node-b only
    assert kinds == Counter(
        {
            "node-a:task.enqueued": 1,
            "node-a:task.scheduled": 1,
            "node-a:route.requested": 1,
            "node-a:route.blocked": 1,
            "node-b:heartbeat.changed": 1,
            "node-b:tick.requested": 1,
        }
    )
    log = git(a, "log", "--format=%s", "origin/main")
    assert "mesh: node-a exported seq 1-4 (4 events)" in log
    # one pretty file per event, in its node's bucket
    files = sorted((a / LEDGER / "outbox/node-a" / bucket_of(1)).iterdir())
    assert len(files) == 4
    text = files[0].read_text()
    assert text.endswith("}\n") and '\n  "event_id": "evt_' in text
    head = orjson.loads((a / LEDGER / "nodes/node-a.json").read_bytes())["head"]
    assert head["seq"] == 4


def test_offline_sync_commits_locally_and_pushes_later(
    fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    remote, a, b = fleet
    publish(a, "ci", "run.finished", ok=True)
    hidden = remote.with_name("away.git")
    remote.rename(hidden)  # the remote is unreachable
    offline = run_process("--root", str(a), "mesh-sync", "--json")
    assert offline.code == 0, offline.err
    data = offline.json()
    assert (data["pushed"], data["push_pending"], data["committed"]) == (False, True, True)
    assert data["offline_reason"]
    status = cli("--root", str(a), "mesh-status", "--json").json()
    assert status["last_sync"]["push_pending"] is True
    hidden.rename(remote)
    back = run_process("--root", str(a), "mesh-sync", "--json").json()
    assert back["pushed"] is True and back["push_pending"] is False
    run_process("--root", str(b), "mesh-sync")
    assert sorted(event_ids(b)) == sorted(event_ids(a))


def test_sync_without_any_remote_and_outside_git(tmp_path: Path, cli: Runner) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    git(lone, "init", "-q", "-b", "main")
    Mesh.init(lone, node_id="lone")
    publish(lone, "ci", "x")
    result = run_process("--root", str(lone), "mesh-sync", "--json")
    assert result.code == 0 and result.json()["committed"] is True
    assert result.json()["remote"] is None and result.json()["pushed"] is False

    plain = tmp_path / "plain"
    Mesh.init(plain, node_id="plain")
    refused = run_process("--root", str(plain), "mesh-sync")
    assert refused.code == 2 and "not in a git work tree" in refused.err
    local = run_process("--root", str(plain), "mesh-sync", "--no-push", "--json")
    assert local.code == 0 and local.json()["exported"] == 0
    never = run_process("--root", str(tmp_path / "nothing"), "mesh-sync")
    assert never.code == 2 and "not initialised" in never.err


def test_unrelated_work_is_never_committed(fleet: tuple[Path, Path, Path]) -> None:
    _, a, b = fleet
    (a / "README.md").write_text("my edit in progress\n")  # tracked, modified
    (a / "notes.txt").write_text("untracked\n")
    (a / "staged.txt").write_text("staged\n")
    git(a, "add", "staged.txt")
    publish(b, "ci", "run.finished")
    run_process("--root", str(b), "mesh-sync")  # the remote moves on
    publish(a, "ci", "run.finished")
    result = run_process("--root", str(a), "mesh-sync", "--json")
    assert result.code == 0, result.err
    committed = git(a, "show", "--name-only", "--format=", "HEAD").split()
    assert all(p.startswith(LEDGER + "/") for p in committed) and committed
    assert (a / "README.md").read_text() == "my edit in progress\n"
    assert (a / "notes.txt").read_text() == "untracked\n"
    status = git(a, "status", "--porcelain")
    assert " M README.md" in status and "A  staged.txt" in status and "?? notes.txt" in status
    # the remote got the ledger and nothing else of ours
    remote_files = git(a, "ls-tree", "-r", "--name-only", "origin/main").split()
    assert "notes.txt" not in remote_files and "staged.txt" not in remote_files


def test_a_conflict_outside_the_ledger_changes_nothing(fleet: tuple[Path, Path, Path]) -> None:
    _, a, b = fleet
    (b / "README.md").write_text("their change\n")
    git(b, "commit", "-q", "-am", "edit readme")
    git(b, "push", "-q", "origin", "HEAD:main")
    (a / "README.md").write_text("my change\n")
    publish(a, "ci", "x")
    head = git(a, "rev-parse", "HEAD")
    result = run_process("--root", str(a), "mesh-sync")
    assert result.code == 1 and "README.md" in result.err
    assert git(a, "rev-parse", "HEAD") == head
    assert (a / "README.md").read_text() == "my change\n"
    assert git(a, "stash", "list") == ""


def test_tampered_and_truncated_files_are_rejected_and_flagged(
    tmp_path: Path, fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    remote, a, b = fleet
    c = add_node(tmp_path, remote, "node-c")
    for i in range(3):
        publish(a, "ci", "a", i=i)
    for i in range(2):
        publish(c, "ci", "c", i=i)
    run_process("--root", str(a), "mesh-sync")
    run_process("--root", str(c), "mesh-sync")
    # node-a's third event is tampered with, node-c's second is cut short, in the remote
    git(b, "pull", "-q", "--rebase", "origin", "main")
    a_files = sorted(
        (b / LEDGER / "outbox/node-a").rglob("*.json"),
        key=lambda p: orjson.loads(p.read_bytes())["seq"],
    )
    tampered = a_files[2]
    env = orjson.loads(tampered.read_bytes())
    env["payload"]["i"] = 99
    tampered.write_bytes(orjson.dumps(env, option=orjson.OPT_INDENT_2) + b"\n")
    c_files = sorted(
        (b / LEDGER / "outbox/node-c").rglob("*.json"),
        key=lambda p: orjson.loads(p.read_bytes())["seq"],
    )
    truncated = c_files[1]
    truncated.write_bytes(truncated.read_bytes()[:90])
    imported = cli("--root", str(b), "mesh-import", "--json")
    assert imported.code == 3
    data = imported.json()
    assert data["imported"] == 3  # a1, a2 and c1
    reasons = {Path(p["path"]).name: p["reason"] for p in data["rejected"]}
    assert "event_id does not match content" in reasons[tampered.name]
    assert "not valid JSON" in reasons[truncated.name]
    assert "rejected" in imported.err and tampered.name in imported.err
    assert cli("--root", str(b), "mesh-status", "--json").json()["import_rejected"] == 2

    verify = cli("--root", str(b), "mesh-verify", "--json")
    assert verify.code == 3
    flagged = {Path(p["path"]).name for p in verify.json()["problems"]}
    assert {tampered.name, truncated.name} <= flagged


def test_verify_on_a_fresh_checkout_and_since(
    tmp_path: Path, fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    remote, a, _ = fleet
    for i in range(3):
        publish(a, "ci", "a", i=i)
    run_process("--root", str(a), "mesh-sync")
    checkout = tmp_path / "ci-checkout"
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(checkout))
    clean = run_process("--root", str(checkout), "mesh-verify", "--json")  # never ran mesh-init
    assert clean.code == 0 and clean.json()["checked"] == 3 and clean.json()["ok"]
    base = git(checkout, "rev-parse", "HEAD").strip()
    # a pull request that edits history and forges a file into another node's folder
    files = sorted((checkout / LEDGER / "outbox/node-a").rglob("*.json"))
    edited = orjson.loads(files[0].read_bytes())
    edited["payload"]["i"] = 7
    files[0].write_bytes(orjson.dumps(edited, option=orjson.OPT_INDENT_2) + b"\n")
    forged = checkout / LEDGER / "outbox/node-z/000000" / files[1].name
    forged.parent.mkdir(parents=True)
    forged.write_bytes(files[1].read_bytes())
    git(checkout, "add", "-A")
    git(checkout, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q", "-m", "pr")
    result = run_process("--root", str(checkout), "mesh-verify", "--since", base, "--json")
    assert result.code == 3
    problems = [(Path(p["path"]).parts[-2:], p["reason"]) for p in result.json()["problems"]]
    text = str(problems)
    assert "published events are immutable" in text
    assert "does not match its folder 'node-z'" in text
    assert "event_id does not match content" in text
    bad = run_process("--root", str(checkout), "mesh-verify", "--since", "no-such-rev")
    assert bad.code == 2 and "bad --since" in bad.err


def test_noop_import_reads_no_file_of_a_node_it_is_current_with(
    fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    _, a, b = fleet
    for i in range(5):
        publish(a, "ci", "a", i=i)
    run_process("--root", str(a), "mesh-sync")
    run_process("--root", str(b), "mesh-sync")
    assert len(event_ids(b)) == 5
    # spoil an old file in b's checkout: an import that read it would reject it
    old = next((b / LEDGER / "outbox/node-a").rglob("*.json"))
    old.write_text("{ not json")
    again = cli("--root", str(b), "mesh-import", "--json")
    assert again.code == 0 and again.json() == {
        "imported": 0,
        "nodes": {},
        "waiting": 0,
        "rejected": [],
        "forks": 0,
        "legacy": {},
    }


def test_an_event_waits_for_its_missing_predecessor(
    fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    _, a, b = fleet
    for i in range(3):
        publish(a, "ci", "a", i=i)
    run_process("--root", str(a), "mesh-sync")
    git(b, "pull", "-q", "--rebase", "origin", "main")
    files = sorted(
        (b / LEDGER / "outbox/node-a").rglob("*.json"),
        key=lambda p: orjson.loads(p.read_bytes())["seq"],
    )
    moved = files[1].read_bytes()
    files[1].unlink()  # seq 2 has not arrived yet
    first = cli("--root", str(b), "mesh-import", "--json").json()
    assert (first["imported"], first["waiting"]) == (1, 1)
    files[1].write_bytes(moved)
    second = cli("--root", str(b), "mesh-import", "--json").json()
    assert (second["imported"], second["waiting"]) == (2, 0)
    with Mesh.open(b) as mesh:
        assert [e["seq"] for e in mesh.log.iter_events()] == [1, 2, 3]


def test_four_nodes_syncing_at_once_all_land(tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    roots = [add_node(tmp_path, remote, f"node-{i}") for i in range(4)]
    for i, root in enumerate(roots):
        publish(root, "ci", "hello", n=i)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orxaq_autonomy",
                "--root",
                str(root),
                "mesh-sync",
                "--max-retries",
                "10",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for root in roots
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err.decode()
        assert orjson.loads(out)["pushed"] is True
    assert sum(orjson.loads(out)["retries"] for out, _ in outs) >= 1  # they raced
    for root in roots:
        assert run_process("--root", str(root), "mesh-sync").code == 0
    ids = {frozenset(event_ids(root)) for root in roots}
    assert len(ids) == 1 and len(next(iter(ids))) == 4


def test_two_syncs_on_one_node_never_overlap(fleet: tuple[Path, Path, Path]) -> None:
    _, a, _ = fleet
    with Mesh.open(a) as mesh:
        from orxaq_autonomy.store.fsutil import FileLock

        with FileLock(mesh.layout.locks_dir / "sync.lock"):
            result = run_process("--root", str(a), "mesh-sync", "--json")
    assert result.code == 0 and result.json()["skipped"] is True
    assert "another mesh-sync is running" in result.err


def test_library_sync_matches_cli(fleet: tuple[Path, Path, Path]) -> None:
    _, a, b = fleet
    publish(a, "ci", "x")
    with Mesh.open(a) as mesh:
        report = Syncer(mesh).run()
    assert report.pushed and report.exported == 1
    with Mesh.open(b) as mesh:
        assert Syncer(mesh).run().imported == 1


def test_a_ledger_in_another_checkout_named_by_an_absolute_override(tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    checkout = tmp_path / "coordination"
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(checkout))
    git(checkout, "config", "user.name", "n")
    git(checkout, "config", "user.email", "n@example.invalid")
    root = tmp_path / "node"  # the node's own root is no git work tree at all
    env = {"ORXAQ_AUTONOMY_GITHUB_COORDINATION_DIR": str(checkout / "ledger")}
    assert run_process("--root", str(root), "mesh-init", "--node-id", "far", env=env).code == 0
    published = run_process(
        "--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "x", "--json", env=env
    )
    result = run_process("--root", str(root), "mesh-sync", "--json", env=env)
    assert result.code == 0, result.err
    assert result.json()["pushed"] is True
    pushed = git(checkout, "ls-tree", "-r", "--name-only", "origin/main").split()
    assert f"ledger/outbox/far/000000/{published.json()['event_id']}.json" in pushed
