"""A hostile remote, tried for real: an attacker who can push to the shared repository
(or publish an event) attacks the nodes that sync from it. Real git, real bare remotes,
real processes. Each test performs an attack and shows that it fails."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import run_process
from gitfleet import add_node, event_ids, git, make_remote
from orxaq_autonomy import Mesh
from orxaq_autonomy.envelope import compute_event_id
from orxaq_autonomy.ledger.keyring import policy_bytes
from orxaq_autonomy.store.keys import Signer, b64url

LEDGER = "state/github_coordination/event_mesh"


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Path, Path, Path]:
    remote = make_remote(tmp_path)
    return remote, add_node(tmp_path, remote, "node-a"), add_node(tmp_path, remote, "node-b")


def publish(root: Path, event_type: str = "run.finished", **payload: object) -> str:
    with Mesh.open(root) as mesh:
        return mesh.publish("ci", event_type, dict(payload)).event_id


def sync(root: Path) -> tuple[int, Any, str]:
    result = run_process("--root", str(root), "mesh-sync", "--json")
    return result.code, result.json() if result.out.strip() else {}, result.err


def private_files(root: Path) -> dict[str, str]:
    """Every node-private file (state, log) by path, with a hash of its bytes."""
    found = {}
    for top in (root / "state" / "event_mesh", root / "artifacts"):
        for path in sorted(top.rglob("*")):
            if path.is_file() and "locks" not in path.parts and path.suffix != ".sqlite3-wal":
                found[path.relative_to(root).as_posix()] = hashlib.sha256(
                    path.read_bytes()
                ).hexdigest()
    return found


def attacker_clone(tmp_path: Path, remote: Path) -> Path:
    evil = tmp_path / "evil"
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(evil))
    git(evil, "config", "user.name", "mallory")
    git(evil, "config", "user.email", "mallory@example.invalid")
    return evil


def push_raw(evil: Path, entries: list[tuple[bytes, str, bytes]], message: str) -> None:
    """Commit `entries` (path bytes, mode, content) as they are, whatever git's porcelain
    would think of them (names that are not UTF-8, symlinks, private paths), and push."""
    for path, mode, content in entries:
        sha = subprocess.run(
            ["git", "hash-object", "-w", "--stdin"],
            cwd=evil,
            input=content,
            capture_output=True,
            check=True,
        ).stdout.strip()
        subprocess.run(
            [
                "git",
                "update-index",
                "--add",
                "--cacheinfo",
                f"{mode},{sha.decode()},".encode() + path,
            ],
            cwd=evil,
            check=True,
        )
    git(evil, "commit", "-q", "-m", message)
    git(evil, "push", "-q", "origin", "HEAD:main")


# --- code execution through git -----------------------------------------------------------


def test_a_pushed_config_and_handler_never_run_and_private_files_stay_identical(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    remote, a, b = fleet
    publish(a)
    assert sync(a)[0] == 0
    before = private_files(a)
    marker = tmp_path / "pwned"
    evil = attacker_clone(tmp_path, remote)
    push_raw(
        evil,
        [
            (b"state/event_mesh/config.toml", "100644", b'handlers = ["pwn.py"]\n'),
            (b"pwn.py", "100644", f"open({str(marker)!r}, 'w').write('x')\n".encode()),
            (b"state/event_mesh/keys/ed25519.key", "100644", b"ed25519:AAAA\n"),
            (b"state/event_mesh/trust_pins.json", "100644", b'{"nodes": {}}\n'),
            (
                b"artifacts/autonomy/event_mesh/events.ndjson",
                "100644",
                b'{"forged": true}\n',
            ),
        ],
        "helpful config",
    )
    publish(b)  # everyone else's events must still arrive
    assert sync(b)[0] == 3  # node-b is refused the same paths, and says so
    code, report, err = sync(a)
    assert code == 3, err
    refused = {item["path"] for item in report["refused_paths"]}
    assert {
        "state/event_mesh/config.toml",
        "state/event_mesh/keys/ed25519.key",
        "state/event_mesh/trust_pins.json",
        "artifacts/autonomy/event_mesh/events.ndjson",
    } <= refused
    assert "state/event_mesh/config.toml" in err
    assert not marker.exists()
    after = private_files(a)
    for name in ("state/event_mesh/config.toml", "state/event_mesh/keys/ed25519.key"):
        assert after[name] == before[name], name
    log = (a / "artifacts/autonomy/event_mesh/events.ndjson").read_bytes()
    assert b"forged" not in log and orjson.loads(log.splitlines()[0])["node_id"] == "node-a"
    pins = orjson.loads((a / "state/event_mesh/trust_pins.json").read_bytes())
    assert "node-b" in pins["nodes"]  # the node's own pins, not the attacker's empty ones
    # node-b's event arrived, node-a dispatched without the attacker's handler, and git is quiet
    assert len(set(event_ids(a)) & set(event_ids(b))) >= 2
    assert not marker.exists()
    assert git(a, "status", "--porcelain", "--untracked-files=no") == ""
    # and the next rounds go on normally: the poisoned commit is not refused again
    publish(b)
    sync(b)
    code, report, _ = sync(a)
    assert code == 0 and report["refused_paths"] == []
    assert set(event_ids(b)) <= set(event_ids(a))


def test_a_pull_reports_a_changed_handler_module(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    remote, a, _ = fleet
    (a / "mesh").mkdir()
    module = (
        "from orxaq_autonomy.handlers import handler\n\n\n"
        "@handler('ci.#')\ndef seen(event, ctx):\n    return None\n"
    )
    (a / "mesh" / "handlers.py").write_text(module)
    git(a, "add", "mesh/handlers.py")
    git(a, "commit", "-q", "-m", "handlers")
    git(a, "push", "-q", "origin", "HEAD:main")
    config = a / "state" / "event_mesh" / "config.toml"
    config.write_text('handlers = ["mesh/handlers.py"]\n')
    evil = attacker_clone(tmp_path, remote)
    (evil / "mesh" / "handlers.py").write_text(module + "# changed\n")
    git(evil, "commit", "-qam", "tweak")
    git(evil, "push", "-q", "origin", "HEAD:main")
    result = run_process("--root", str(a), "mesh-sync", "--json")
    assert result.code == 0, result.err
    assert result.json()["handler_files_changed"] == ["mesh/handlers.py"]
    assert "mesh/handlers.py" in result.err and "review" in result.err


# --- files that git can carry ----------------------------------------------------------


def test_symlinks_submodules_odd_names_and_huge_blobs_are_never_checked_out(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    remote, a, b = fleet
    publish(b)
    assert sync(b)[0] == 0
    secret = tmp_path / "secret.json"
    secret.write_text('{"node_id": "node-x", "password": "hunter2"}')
    evil = attacker_clone(tmp_path, remote)
    nodes = f"{LEDGER}/nodes".encode()
    outbox = f"{LEDGER}/outbox".encode()
    push_raw(
        evil,
        [
            (nodes + b"/node-x.json", "120000", str(secret).encode()),
            (outbox + b"/node-x", "120000", b"/etc"),
            (outbox + b"/node-b/\xff\xfe.json", "100644", b"{}"),
            (nodes + b"/\xff\xfe.json", "100644", b"{}"),
            (nodes + b"/tab\there.json", "100644", b"{}"),
            (outbox + b"/node-y/000000/big.json", "100644", b" " * (17 * 1024 * 1024)),
        ],
        "odd files",
    )
    publish(b)
    assert sync(b)[0] == 3  # node-b is refused the same files, yet exports and pushes
    # and node-b takes back its own folder: the file planted there is gone from the remote
    assert "\\377" not in git(
        b, "ls-tree", "-r", "--name-only", "origin/main", f"{LEDGER}/outbox/node-b"
    )
    for path in (a / LEDGER / "nodes").iterdir():
        assert not path.is_symlink()
    code, report, err = sync(a)
    assert code == 3, err
    reasons = {item["path"]: item["reason"] for item in report["refused_paths"]}
    assert "symlink" in reasons[f"{LEDGER}/nodes/node-x.json"]
    assert "symlink" in reasons[f"{LEDGER}/outbox/node-x"]
    assert "UTF-8" in reasons[f"{LEDGER}/nodes/\\xff\\xfe.json"]
    assert "control" in reasons[f"{LEDGER}/nodes/tab\\there.json"]
    assert "bytes" in reasons[f"{LEDGER}/outbox/node-y/000000/big.json"]
    assert not (a / LEDGER / "nodes" / "node-x.json").exists()
    assert not (a / LEDGER / "outbox" / "node-x").exists()
    assert not (a / LEDGER / "outbox" / "node-y" / "000000" / "big.json").exists()
    assert set(event_ids(b)) <= set(event_ids(a))  # the rest of the round went through
    assert git(a, "status", "--porcelain", "--untracked-files=no") == ""


def test_a_push_that_rewrites_a_nodes_own_folder_is_undone_by_that_node(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    remote, a, b = fleet
    first = publish(a)
    assert sync(a)[0] == 0
    evil = attacker_clone(tmp_path, remote)
    mine = next((evil / LEDGER / "outbox" / "node-a").rglob("*.json"))
    original = mine.read_bytes()
    mine.write_text("{}\n")
    (evil / LEDGER / "nodes" / "node-a.json").write_text('{"node_id": "node-a"}\n')
    git(evil, "commit", "-qam", "rewrite node-a")
    git(evil, "push", "-q", "origin", "HEAD:main")
    publish(a)
    code, _, err = sync(a)
    assert code == 0, err
    assert (a / mine.relative_to(evil)).read_bytes() == original
    pushed = git(a, "show", f"origin/main:{mine.relative_to(evil).as_posix()}")
    assert pushed.encode() == original
    assert (
        orjson.loads(git(a, "show", f"origin/main:{LEDGER}/nodes/node-a.json"))["head"]["seq"] == 2
    )
    assert sync(b)[0] == 0
    assert first in event_ids(b)
    verify = run_process("--root", str(b), "mesh-verify", "--json")
    assert verify.code == 0, verify.out


# --- a killed sync ---------------------------------------------------------------------------


def test_a_rebase_left_by_a_killed_sync_is_repaired_by_the_next_one(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    _, a, b = fleet
    publish(b)
    assert sync(b)[0] == 0
    # what a kill -9 of an older mesh-sync mid-rebase left: .git/rebase-merge
    (a / "x.txt").write_text("one\n")
    git(a, "add", "x.txt")
    git(a, "commit", "-qm", "x")
    subprocess.run(
        ["git", "rebase", "-i", "origin/main"],
        cwd=a,
        env={**os.environ, "GIT_SEQUENCE_EDITOR": "sed -i '1i break'"},
        capture_output=True,
        check=True,
    )
    assert (a / ".git" / "rebase-merge").exists()
    publish(a)
    code, report, err = sync(a)
    assert code == 0, err
    assert "aborted an interrupted rebase" in report["repaired"]
    assert not (a / ".git" / "rebase-merge").exists()
    assert set(event_ids(b)) <= set(event_ids(a))


def test_kill_9_at_any_moment_of_a_sync_never_strands_the_node(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    _, a, b = fleet
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for round_number in range(8):
        for _ in range(30):
            publish(b, n=round_number)
        assert sync(b)[0] == 0
        publish(a, n=round_number)
        proc = subprocess.Popen(
            [sys.executable, "-m", "orxaq_autonomy", "--root", str(a), "mesh-sync"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.05 + 0.08 * round_number)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    code, _, err = sync(a)
    assert code == 0, err
    assert sync(b)[0] == 0
    assert sync(a)[0] == 0
    assert set(event_ids(a)) == set(event_ids(b))
    ids = event_ids(a)
    assert len(ids) == len(set(ids))
    assert git(a, "status", "--porcelain", "--untracked-files=no") == ""
    assert not (a / ".git" / "rebase-merge").exists()


# --- whose key is believed ---------------------------------------------------------------


def _stranger(tmp_path: Path) -> Signer:
    key = tmp_path / "stranger.key"
    key.write_text("ed25519:" + b64url(os.urandom(32)))
    return Signer(key)


def _forge_next(root: Path, node: str, sign: Signer) -> dict[str, object]:
    """The next event of `node` in `root`'s outbox, signed by `sign`: what a pusher can make."""
    files = sorted(
        (root / LEDGER / "outbox" / node).rglob("evt_*.json"),
        key=lambda p: orjson.loads(p.read_bytes())["seq"],
    )
    last = orjson.loads(files[-1].read_bytes())
    forged = {
        **{k: v for k, v in last.items() if k not in ("sig", "event_id")},
        "seq": last["seq"] + 1,
        "prev": last["event_id"],
        "clock": last["clock"] + 1,
        "payload": {"forged": True},
    }
    forged["event_id"] = compute_event_id(forged)
    forged["sig"] = sign(forged["event_id"])
    target = files[-1].parent / f"{forged['event_id']}.json"
    target.write_bytes(orjson.dumps(forged, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return forged


def test_a_lost_pin_never_lets_a_pushed_manifest_choose_the_key(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    remote, a, b = fleet
    publish(a)
    publish(a)
    assert sync(a)[0] == 0
    assert sync(b)[0] == 0  # node-b holds node-a's events and pins its key
    (b / "state/event_mesh/trust_pins.json").unlink()  # lost (or stale after a crash)
    mallory = _stranger(tmp_path)
    evil = attacker_clone(tmp_path, remote)
    forged = _forge_next(evil, "node-a", mallory)
    manifest = evil / LEDGER / "nodes" / "node-a.json"
    data = orjson.loads(manifest.read_bytes())
    data.update(
        public_key=mallory.public_key,
        keys=[{"public_key": mallory.public_key, "from_seq": 1}],
        head={"seq": forged["seq"], "event_id": forged["event_id"]},
    )
    manifest.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))
    git(evil, "add", "-A")
    git(evil, "commit", "-qm", "node-a has a new key")
    git(evil, "push", "-q", "origin", "HEAD:main")
    code, report, err = sync(b)
    assert code == 3, err
    assert forged["event_id"] not in event_ids(b)
    assert any(
        "node-a" in item["reason"] or "signature" in item["reason"] for item in report["rejected"]
    )
    # node-a's real events still pass once node-a syncs (it restores its own manifest)
    real = publish(a)
    assert sync(a)[0] == 0
    assert sync(b)[0] in (0, 3)
    assert real in event_ids(b)


def test_a_rotation_the_new_key_did_not_sign_is_refused(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    _, a, b = fleet
    publish(a)
    assert sync(a)[0] == 0 and sync(b)[0] == 0
    mallory = _stranger(tmp_path)
    with Mesh.open(a) as mesh:  # what any publisher could make the node sign before
        mesh.publish(
            "mesh",
            "trust.key_rotated",
            {"public_key": mallory.public_key, "previous_key": mesh.current_signer().public_key},
            system=True,
        )
    assert sync(a)[0] == 0
    code, report, _ = sync(b)
    assert code == 3
    assert any("without a valid proof" in item["reason"] for item in report["rejected"])
    verify = run_process("--root", str(b), "mesh-verify", "--json")
    assert verify.code == 3 and "without a valid proof" in verify.out


def test_a_pushed_trust_policy_counts_only_when_signed_by_a_pinned_key(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    remote, a, b = fleet
    publish(a)
    assert sync(a)[0] == 0
    with Mesh.open(b) as mesh:
        key_b = mesh.current_signer().public_key
    (b / "state/event_mesh/config.toml").write_text(f'[trust]\npolicy_keys = ["{key_b}"]\n')
    mallory = _stranger(tmp_path)
    evil = attacker_clone(tmp_path, remote)
    policy = {"nodes": {"node-a": {"keys": [mallory.public_key]}}}
    for signed in (False, True):  # unsigned, then signed by the attacker's own key
        body: dict[str, Any] = dict(policy)
        if signed:
            body["signed_by"] = mallory.public_key
            body["sig"] = mallory.sign_bytes(policy_bytes(body))
        git(evil, "pull", "-q", "--rebase", "origin", "main")
        (evil / LEDGER / "trust.json").write_bytes(orjson.dumps(body))
        git(evil, "add", "-A")
        git(evil, "commit", "-qm", "policy")
        git(evil, "push", "-q", "origin", "HEAD:main")
        code, report, _ = sync(b)
        assert code == 3
        reasons = [i["reason"] for i in report["rejected"]]
        assert any("not signed by a key pinned" in r for r in reasons), reasons
        assert set(event_ids(a)) <= set(event_ids(b))  # node-a is still believed
    # the policy signed by the pinned key counts
    own = b / "policy.json"
    own.write_bytes(orjson.dumps({"nodes": {"node-b": {"keys": [key_b]}}}))
    assert run_process("--root", str(b), "mesh-sign-policy", str(own)).code == 0
    publish(a)
    assert sync(a)[0] == 3  # node-a pins no policy key: it reports the policy and ignores it
    code, report, _ = sync(b)
    assert code == 3 and any("not in trust.json" in i["reason"] for i in report["rejected"])


def test_a_new_node_never_adopts_private_files_from_a_poisoned_clone(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    remote, _, _ = fleet
    evil = attacker_clone(tmp_path, remote)
    push_raw(evil, [(b"state/event_mesh/config.toml", "100644", b'handlers = ["pwn.py"]\n')], "x")
    joiner = tmp_path / "node-c"
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(joiner))
    result = run_process("--root", str(joiner), "mesh-init", "--node-id", "node-c")
    assert result.code == 2
    assert "state/event_mesh/config.toml" in result.err and "git rm" in result.err
    assert not (joiner / "state/event_mesh/node.json").exists()
    assert not (joiner / "state/event_mesh/keys").exists()
