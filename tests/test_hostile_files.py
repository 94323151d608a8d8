"""Files that arrive through git may be hostile: symlinks out of the root, folders where
files belong, FIFOs, /dev/zero, huge manifests, names that are not UTF-8. Each attack is
performed for real (real files, real git where it matters, real processes where a hang or
a memory blow-up would show) and shown to fail: reported and skipped, never followed,
never fatal to the rest of the round."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import ENV_VARS, Result, Runner
from gitfleet import add_node, event_ids, git, make_remote
from orxaq_autonomy import Mesh
from orxaq_autonomy.ledger.export import export_events
from orxaq_autonomy.ledger.importer import import_events
from orxaq_autonomy.store.fsutil import UnsafeFile, read_regular

LEDGER = "state/github_coordination/event_mesh"
SECRET = "s3cr3t-marker-do-not-leak"


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Path, Path, Path]:
    remote = make_remote(tmp_path)
    return remote, add_node(tmp_path, remote, "node-a"), add_node(tmp_path, remote, "node-b")


def attacker(tmp_path: Path, remote: Path) -> Path:
    """A clone of the shared remote by someone who can push anything."""
    evil = tmp_path / "evil"
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(evil))
    git(evil, "config", "user.name", "evil")
    git(evil, "config", "user.email", "evil@example.invalid")
    return evil


def push_all(clone: Path, message: str) -> None:
    git(clone, "add", "-A")
    git(clone, "commit", "-q", "-m", message)
    git(clone, "push", "-q", "origin", "HEAD:main")


def run_limited(*args: str, timeout: float = 60) -> tuple[Result, float]:
    """The CLI as a real process with at most 2 GiB of address space, so that reading
    /dev/zero or a huge file would fail the test instead of the machine; and its time."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "orxaq_autonomy", *args],
        capture_output=True,
        env=env,
        timeout=timeout,
        preexec_fn=limit,
        check=False,
    )
    took = time.monotonic() - start
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode()), took


def publish(root: Path, n: int) -> None:
    with Mesh.open(root) as mesh:
        mesh.publish_many(
            [{"topic": "ci", "event_type": "x", "payload": {"i": i}} for i in range(n)]
        )


def manifest_of(root: Path, node: str) -> dict[str, Any]:
    path = root / LEDGER / "nodes" / f"{node}.json"
    assert not path.is_symlink() and path.is_file()
    data: dict[str, Any] = orjson.loads(path.read_bytes())
    return data


def rejected_paths(result: Result) -> list[str]:
    data = result.json()
    return [p["path"] for p in data.get("rejected", data.get("problems", []))]


def secret_file(tmp_path: Path) -> tuple[Path, bytes]:
    """A JSON file outside every root that looks like node-a's manifest."""
    secret = tmp_path / "secret.json"
    content = orjson.dumps(
        {"node_id": "node-a", "head": {"seq": 999, "event_id": "evt_" + "e" * 64}, "t": SECRET}
    )
    secret.write_bytes(content)
    return secret, content


# --- this node's own manifest and outbox ----------------------------------------------------


def test_own_manifest_symlinked_to_a_secret_is_replaced_never_read_or_pushed(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    remote, a, _ = fleet
    publish(a, 2)
    first, _ = run_limited("--root", str(a), "mesh-sync", "--json")
    assert first.code == 0, first.err
    secret, content = secret_file(tmp_path)
    evil = attacker(tmp_path, remote)
    target = evil / LEDGER / "nodes/node-a.json"
    target.unlink()
    target.symlink_to(secret)
    push_all(evil, "point node-a's manifest at a secret")
    # a plain `git pull` checks the symlink out (mesh-sync's own pull may refuse it: this
    # shows the ledger code holds even when the symlink is there)
    git(a, "pull", "-q", "--rebase", "origin", "main")
    assert (a / LEDGER / "nodes/node-a.json").is_symlink()

    publish(a, 1)
    synced, _ = run_limited("--root", str(a), "mesh-sync", "--json")
    assert synced.code == 0, synced.err
    assert synced.json()["pushed"] is True and synced.json()["exported"] == 1
    assert "manifest" in synced.err and "symlink" in synced.err and "replaced" in synced.err
    assert secret.read_bytes() == content  # the target was never written
    manifest = manifest_of(a, "node-a")
    assert SECRET not in orjson.dumps(manifest).decode()
    assert manifest["head"]["seq"] == 3  # from the node's own state, not the secret's 999
    with Mesh.open(a) as mesh:
        assert manifest["public_key"] == mesh.current_signer().public_key
    pushed = git(a, "show", "origin/main:" + LEDGER + "/nodes/node-a.json")
    assert SECRET not in pushed and orjson.loads(pushed)["head"]["seq"] == 3
    mode = git(a, "ls-tree", "origin/main", LEDGER + "/nodes/node-a.json").split()[0]
    assert mode == "100644"  # a regular file again, not a symlink (120000)


@pytest.mark.parametrize("kind", ["folder", "fifo", "oversized", "garbage", "other-node", "gone"])
def test_own_manifest_that_is_not_a_sound_file_is_replaced_by_export(
    root: Path, cli: Runner, kind: str
) -> None:
    publish(root, 3)
    assert cli("--root", str(root), "mesh-export").code == 0
    with Mesh.open(root) as mesh:
        mesh.rotate_key()  # the key history must survive the rebuild
    before = manifest_of(root, "node-a")
    path = root / LEDGER / "nodes/node-a.json"
    path.unlink()
    if kind == "folder":
        path.mkdir()
        (path / "inner.json").write_text("{}")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "oversized":
        path.write_bytes(b'{"node_id": "node-a", "pad": "' + b"x" * (2 << 20) + b'"}')
    elif kind == "garbage":
        path.write_bytes(b"\x00not json")
    elif kind == "other-node":
        path.write_bytes(orjson.dumps({"node_id": "node-z", "head": {"seq": 0}}))
    result = cli("--root", str(root), "mesh-export", "--json")
    assert result.code == 0, result.err
    after = manifest_of(root, "node-a")
    assert after["head"]["seq"] == 4 and after["keys"] == before["keys"]
    assert after["public_key"] == before["public_key"]
    repaired = result.json()["repaired"]
    if kind == "gone":
        assert repaired == []
    else:
        assert len(repaired) == 1 and repaired[0]["path"] == f"{LEDGER}/nodes/node-a.json"
        assert "replaced" in result.err
    assert cli("--root", str(root), "mesh-verify").code == 0


def test_rerunning_init_replaces_a_symlinked_manifest_without_touching_its_target(
    tmp_path: Path, root: Path, cli: Runner
) -> None:
    secret, content = secret_file(tmp_path)
    path = root / LEDGER / "nodes/node-a.json"
    path.unlink()
    path.symlink_to(secret)
    result = cli("--root", str(root), "mesh-init", "--json")
    assert result.code == 0, result.err
    assert f"{LEDGER}/nodes/node-a.json" in result.json()["updated"]
    assert secret.read_bytes() == content
    assert SECRET not in path.read_text() and manifest_of(root, "node-a")["head"] == {"seq": 0}


@pytest.mark.parametrize("where", ["outbox", "node", "bucket"])
def test_export_refuses_to_write_through_a_symlinked_outbox_folder(
    tmp_path: Path, root: Path, cli: Runner, where: str
) -> None:
    publish(root, 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    ledger = root / LEDGER
    link = {
        "outbox": ledger / "outbox",
        "node": ledger / "outbox/node-a",
        "bucket": ledger / "outbox/node-a/000000",
    }[where]
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    manifest = (ledger / "nodes/node-a.json").read_bytes()
    result = cli("--root", str(root), "mesh-export", "--json")
    assert result.code == 1
    message = result.json()["error"]["message"]
    assert f"{LEDGER}/{link.relative_to(ledger).as_posix()} is a symlink" in message
    assert len(result.err.strip().splitlines()) == 1
    assert list(outside.rglob("*")) == []  # nothing written outside the root
    assert (ledger / "nodes/node-a.json").read_bytes() == manifest  # the head did not move


def test_export_replaces_a_symlink_planted_at_one_of_its_own_event_files(
    tmp_path: Path, root: Path
) -> None:
    with Mesh.open(root) as mesh:
        published = mesh.publish("ci", "x", {})
        victim = tmp_path / "victim.txt"
        victim.write_text("untouched\n")
        folder = root / LEDGER / "outbox/node-a/000000"
        folder.mkdir(parents=True)
        (folder / f"{published.event_id}.json").symlink_to(victim)
        assert export_events(mesh).exported == 1
    assert victim.read_text() == "untouched\n"
    planted = folder / f"{published.event_id}.json"
    assert not planted.is_symlink()
    assert orjson.loads(planted.read_bytes())["event_id"] == published.event_id


def test_export_fsyncs_exactly_what_it_wrote_before_the_head_moves(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(root, 3)
    journal: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        journal.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        journal.append(("replace", os.fspath(dst)))
        real_replace(src, dst, **kw)

    def no_sync() -> None:
        raise AssertionError("os.sync waits for every dirty page of the machine")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "sync", no_sync)
    with Mesh.open(root) as mesh:
        report = export_events(mesh)
        assert report.exported == 3
        outbox = mesh.layout.outbox_dir("node-a")
        files = {str(p.resolve()) for p in (outbox / "000000").iterdir()}
    synced = [path for op, path in journal if op == "fsync"]
    assert files <= set(synced)
    for folder in (outbox / "000000", outbox, outbox.parent):  # all three were made
        assert str(folder.resolve()) in synced
    manifest = str(root / LEDGER / "nodes/node-a.json")
    head_moved = next(
        i for i, (op, path) in enumerate(journal) if op == "replace" and path == manifest
    )
    last_outbox_sync = max(
        i for i, (op, path) in enumerate(journal) if path.startswith(str(outbox.parent.resolve()))
    )
    assert last_outbox_sync < head_moved
    # nothing else: the outbox, the ledger folder (which got outbox/), the manifest and its
    # folder, the node's own state
    ledger = str((root / LEDGER).resolve())
    state = str((root / "state/event_mesh").resolve())
    allowed = (str(outbox.parent.resolve()), ledger + "/nodes", state)
    assert all(path == ledger or path.startswith(allowed) for path in synced), synced


# --- other nodes' files ------------------------------------------------------------------------


def peer_fleet(
    tmp_path: Path, fleet: tuple[Path, Path, Path], events: int = 2
) -> tuple[Path, Path]:
    """node-a publishes and syncs; node-b has pulled (plain git) but not imported."""
    _, a, b = fleet
    publish(a, events)
    assert run_limited("--root", str(a), "mesh-sync")[0].code == 0
    git(b, "pull", "-q", "--rebase", "origin", "main")
    return a, b


@pytest.mark.parametrize("whose", ["peer", "own"])
def test_a_manifest_symlinked_to_dev_zero_costs_nothing(
    tmp_path: Path, fleet: tuple[Path, Path, Path], whose: str
) -> None:
    _, b = peer_fleet(tmp_path, fleet)
    node = "node-a" if whose == "peer" else "node-b"
    path = b / LEDGER / f"nodes/{node}.json"
    path.unlink()
    path.symlink_to("/dev/zero")
    imported, took = run_limited("--root", str(b), "mesh-import", "--json")
    assert took < 30
    if whose == "peer":
        assert imported.code == 3
        assert imported.json()["rejected"] == [
            {
                "path": f"{LEDGER}/nodes/node-a.json",
                "reason": imported.json()["rejected"][0]["reason"],
            }
        ]
        assert "symlink" in imported.json()["rejected"][0]["reason"]
    else:
        assert imported.code == 0 and imported.json()["imported"] == 2
    status, took = run_limited("--root", str(b), "mesh-status", "--json")
    assert status.code == 0 and took < 30, status.err
    assert node not in status.json()["nodes"]
    exported, took = run_limited("--root", str(b), "mesh-export", "--json")
    assert exported.code == 0 and took < 30, exported.err
    if whose == "own":
        assert exported.json()["repaired"] and not path.is_symlink()


def test_a_folder_named_like_a_manifest_is_reported(
    tmp_path: Path, fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    _, b = peer_fleet(tmp_path, fleet)
    odd = b / LEDGER / "nodes/node-x.json"
    odd.mkdir()
    (odd / "x").write_text("{}")
    result = cli("--root", str(b), "mesh-import", "--json")
    assert result.code == 3 and result.json()["imported"] == 2
    assert result.json()["rejected"] == [
        {"path": f"{LEDGER}/nodes/node-x.json", "reason": "is a folder, not a regular file"}
    ]
    verify = cli("--root", str(b), "mesh-verify", "--json")
    assert verify.code == 3 and f"{LEDGER}/nodes/node-x.json" in rejected_paths(verify)
    assert cli("--root", str(b), "mesh-status", "--json").code == 0


def test_a_20_mb_manifest_is_refused_without_being_read(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    _, b = peer_fleet(tmp_path, fleet)
    path = b / LEDGER / "nodes/node-a.json"
    real = orjson.loads(path.read_bytes())
    path.write_bytes(orjson.dumps({**real, "pad": "x" * (20 << 20)}))
    with pytest.raises(UnsafeFile, match="the limit is 1048576"):
        read_regular(path, 1 << 20)
    with Mesh.open(b) as mesh:
        tracemalloc.start()
        try:
            report = import_events(mesh)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert "node-a" not in mesh.manifests()
    assert peak < 4 << 20, f"import allocated {peak} bytes"
    assert [(p.path, p.reason) for p in report.rejected] == [
        (f"{LEDGER}/nodes/node-a.json", f"is {path.stat().st_size} bytes; the limit is 1048576")
    ]


def test_names_that_are_not_utf8_are_reported_and_the_rest_imported(
    tmp_path: Path, fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    remote, a, b = fleet
    publish(a, 3)
    assert run_limited("--root", str(a), "mesh-sync")[0].code == 0
    evil = attacker(tmp_path, remote)
    ledger = os.fsencode(evil / LEDGER)
    bad = [
        (b"nodes/\xff.json", r"nodes/\xff.json"),
        (b"outbox/node-a/\xfe.json", r"outbox/node-a/\xfe.json"),
        (b"outbox/node-a/000000/evt_\xfd.json", r"outbox/node-a/000000/evt_\xfd.json"),
    ]
    for raw, _ in bad:
        with open(os.path.join(ledger, raw), "wb") as fh:
            fh.write(b"{}\n")
    push_all(evil, "names that are not UTF-8")
    git(b, "pull", "-q", "--rebase", "origin", "main")

    imported = cli("--root", str(b), "mesh-import", "--json")
    assert imported.code == 3, imported.err
    assert imported.json()["imported"] == 3
    assert sorted(rejected_paths(imported)) == sorted(f"{LEDGER}/{shown}" for _, shown in bad)
    assert all("not valid UTF-8" in p["reason"] for p in imported.json()["rejected"])
    assert event_ids(b)[:3] == event_ids(a)[:3]

    synced, _ = run_limited("--root", str(b), "mesh-sync", "--json")
    assert synced.code == 3 and synced.json()["pushed"] is True, synced.err
    assert rf"{LEDGER}/nodes/\xff.json" in synced.err

    verify = cli("--root", str(b), "mesh-verify", "--json")
    assert verify.code == 3
    assert len([line for line in verify.out.splitlines() if line.strip()]) == 1
    assert sorted(rejected_paths(verify)) == sorted(f"{LEDGER}/{shown}" for _, shown in bad)


def test_a_fifo_named_like_an_event_file_does_not_hang_import(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    _, b = peer_fleet(tmp_path, fleet)
    fifo = b / LEDGER / "outbox/node-a/000000" / ("evt_" + "f" * 64 + ".json")
    os.mkfifo(fifo)
    result, took = run_limited("--root", str(b), "mesh-import", "--json", timeout=60)
    assert took < 30 and result.code == 3, result.err
    assert result.json()["imported"] == 2
    assert result.json()["rejected"] == [
        {
            "path": f"{LEDGER}/outbox/node-a/000000/{fifo.name}",
            "reason": "is a FIFO, not a regular file",
        }
    ]
    verify, took = run_limited("--root", str(b), "mesh-verify", "--json", timeout=60)
    assert (
        took < 30
        and verify.code == 3
        and verify.json()["problems"][0]["reason"].startswith("is a FIFO")
    )


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("notes.txt", "is not named evt_"),
        ("evt_abc.json", "is not named evt_"),
        ("000001", "is a regular file, not a plain folder"),
    ],
)
def test_oddly_named_outbox_entries_are_reported_not_read(
    tmp_path: Path, fleet: tuple[Path, Path, Path], cli: Runner, name: str, reason: str
) -> None:
    _, b = peer_fleet(tmp_path, fleet)
    (b / LEDGER / "outbox/node-a" / name).write_text("{}")
    result = cli("--root", str(b), "mesh-import", "--json")
    assert result.code == 3 and result.json()["imported"] == 2
    [problem] = result.json()["rejected"]
    assert problem["path"] == f"{LEDGER}/outbox/node-a/{name}"
    assert problem["reason"].startswith(reason)


def test_a_symlinked_outbox_root_is_not_followed(
    tmp_path: Path, fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    _, b = peer_fleet(tmp_path, fleet)
    outbox = b / LEDGER / "outbox"
    moved = tmp_path / "moved-outbox"
    outbox.rename(moved)
    outbox.symlink_to(moved, target_is_directory=True)
    result = cli("--root", str(b), "mesh-import", "--json")
    assert result.code == 3 and result.json()["imported"] == 0
    assert result.json()["rejected"][0]["path"] == f"{LEDGER}/outbox"
    verify = cli("--root", str(b), "mesh-verify", "--json")
    assert verify.code == 3 and f"{LEDGER}/outbox" in rejected_paths(verify)
