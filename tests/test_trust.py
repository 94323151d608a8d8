"""Trust with real keys, real git and real processes: signatures, forgery, forks, policy,
trust on first use, key rotation, and the private key never reaching git."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import Runner, run_process
from gitfleet import add_node, event_ids, git, make_remote
from orxaq_autonomy import Mesh
from orxaq_autonomy.envelope import compute_event_id
from orxaq_autonomy.store.keys import Signer, b64url, fingerprint, signature_ok

LEDGER = "state/github_coordination/event_mesh"


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Path, Path, Path]:
    remote = make_remote(tmp_path)
    return remote, add_node(tmp_path, remote, "node-a"), add_node(tmp_path, remote, "node-b")


def sync(root: Path) -> Any:
    result = run_process("--root", str(root), "mesh-sync", "--json")
    return result


def files_of(root: Path, node: str) -> list[Path]:
    return sorted(
        (root / LEDGER / "outbox" / node).rglob("*.json"),
        key=lambda p: orjson.loads(p.read_bytes())["seq"],
    )


def rewrite(path: Path, env: dict[str, Any]) -> None:
    path.unlink()
    target = path.with_name(f"{env['event_id']}.json")
    target.write_bytes(orjson.dumps(env, option=orjson.OPT_INDENT_2) + b"\n")


def resigned(env: dict[str, Any], sign: Any, **changes: Any) -> dict[str, Any]:
    """`env` with `changes`, a recomputed id and a signature by `sign`."""
    out = {k: v for k, v in {**env, **changes}.items() if k != "sig"}
    out["event_id"] = compute_event_id(out)
    out["sig"] = sign(out["event_id"])
    return out


def stranger(tmp_path: Path) -> Signer:
    key = tmp_path / "stranger.key"
    key.write_text("ed25519:" + b64url(os.urandom(32)))
    return Signer(key)


def test_every_event_is_signed_follow_ups_included(tmp_path: Path) -> None:
    from orxaq_autonomy.dispatch.dispatcher import Dispatcher

    Mesh.init(tmp_path, node_id="node-a")
    with Mesh.open(tmp_path) as mesh:
        mesh.publish("monitoring", "heartbeat.changed", {})
        mesh.publish_many([{"topic": "ci", "event_type": "x"}] * 3)
        Dispatcher(mesh).run()
        key = mesh.manifests()["node-a"]["public_key"]
        events = list(mesh.log.iter_events())
    assert len(events) == 5
    assert all(signature_ok(e, key) for e in events)
    assert events[-1]["event_type"] == "tick.requested"


@pytest.mark.parametrize("forgery", ["other_key", "copied_sig", "no_sig"])
def test_forged_events_are_refused_by_import_and_verify(
    tmp_path: Path, fleet: tuple[Path, Path, Path], cli: Runner, forgery: str
) -> None:
    remote, a, b = fleet
    with Mesh.open(a) as mesh:
        mesh.publish_many(
            [{"topic": "ci", "event_type": "x", "payload": {"i": i}} for i in range(3)]
        )
    assert sync(a).code == 0
    git(b, "pull", "-q", "--rebase", "origin", "main")
    files = files_of(b, "node-a")
    first, last = orjson.loads(files[0].read_bytes()), orjson.loads(files[2].read_bytes())
    if forgery == "other_key":  # valid content hash, signed by someone else
        last["payload"] = {"i": 99}
        last["event_id"] = compute_event_id(last)
        last["sig"] = stranger(tmp_path)(last["event_id"])
        reason = "signature does not match node-a's key"
    elif forgery == "copied_sig":
        last["payload"] = {"i": 99}
        last["event_id"] = compute_event_id(last)
        last["sig"] = first["sig"]
        reason = "signature does not match node-a's key"
    else:
        del last["sig"]
        reason = "has no signature"
    rewrite(files[2], last)
    result = cli("--root", str(b), "mesh-import", "--json")
    assert result.code == 3
    data = result.json()
    assert data["imported"] == 2
    assert any(reason in p["reason"] for p in data["rejected"]), data["rejected"]
    git(b, "add", "-A")
    git(b, "commit", "-q", "-m", "forged")
    checkout = tmp_path / "checkout"
    git(b, "push", "-q", "origin", "HEAD:main")
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(checkout))
    verify = run_process("--root", str(checkout), "mesh-verify", "--json")
    assert verify.code == 3
    assert any(reason in p["reason"] for p in verify.json()["problems"])


def test_trust_policy_decides_which_nodes_are_believed(
    fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    _, a, b = fleet
    with Mesh.open(a) as mesh:
        mesh.publish("ci", "x", {})
        key_a = mesh.manifests()["node-a"]["public_key"]
    sync(a)
    git(b, "pull", "-q", "--rebase", "origin", "main")
    with Mesh.open(b) as mesh:  # node-b pins its own key as the policy signer
        key_b = mesh.manifests()["node-b"]["public_key"]
    (b / "state/event_mesh/config.toml").write_text(f'[trust]\npolicy_keys = ["{key_b}"]\n')
    policy = b / "policy.json"
    policy.write_text(orjson.dumps({"nodes": {"node-b": {"keys": []}}}).decode())
    assert cli("--root", str(b), "mesh-sign-policy", str(policy)).code == 0
    refused = cli("--root", str(b), "mesh-import", "--json")
    assert refused.code == 3 and "not in trust.json" in refused.json()["rejected"][0]["reason"]
    policy.write_text(orjson.dumps({"nodes": {"node-a": {"keys": [fingerprint(key_a)]}}}).decode())
    assert cli("--root", str(b), "mesh-sign-policy", str(policy)).code == 0
    allowed = cli("--root", str(b), "mesh-import", "--json")
    assert allowed.code == 0 and allowed.json()["imported"] == 1


def test_a_new_key_without_rotation_is_refused_after_first_use(
    tmp_path: Path, fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    _, a, b = fleet
    with Mesh.open(a) as mesh:
        mesh.publish("ci", "x", {"i": 1})
    sync(a)
    assert sync(b).json()["imported"] == 1  # node-a's key is now pinned on node-b
    # someone with push access swaps node-a's key in its manifest and adds an event
    evil = stranger(tmp_path)
    git(b, "pull", "-q", "--rebase", "origin", "main")
    manifest_path = b / LEDGER / "nodes/node-a.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    first = orjson.loads(files_of(b, "node-a")[0].read_bytes())
    forged = resigned(
        first, evil, seq=2, prev=first["event_id"], clock=first["clock"] + 1, payload={"i": 2}
    )
    folder = files_of(b, "node-a")[0].parent
    (folder / f"{forged['event_id']}.json").write_bytes(orjson.dumps(forged))
    manifest.update(
        public_key=evil.public_key,
        keys=[{"public_key": evil.public_key, "from_seq": 1}],
        head={"seq": 2, "event_id": forged["event_id"]},
    )
    manifest_path.write_bytes(orjson.dumps(manifest))
    result = cli("--root", str(b), "mesh-import", "--json")
    assert result.code == 3
    assert "signature does not match node-a's key" in result.json()["rejected"][0]["reason"]
    assert len(event_ids(b)) == 1


def test_forks_are_refused_recorded_and_shown(fleet: tuple[Path, Path, Path], cli: Runner) -> None:
    _, a, b = fleet
    with Mesh.open(a) as mesh:
        mesh.publish("ci", "x", {"i": 1})
        signer = mesh.current_signer()
    sync(a)
    sync(b)
    # node-a's key signs a second, different seq 1 (a node restored from an old backup)
    first = orjson.loads(files_of(b, "node-a")[0].read_bytes())
    other = resigned(first, signer, payload={"i": "fork"})
    folder = files_of(b, "node-a")[0].parent
    (folder / f"{other['event_id']}.json").write_bytes(orjson.dumps(other))
    manifest_path = b / LEDGER / "nodes/node-a.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    manifest["head"] = {"seq": 2, "event_id": "evt_" + "0" * 64}
    manifest_path.write_bytes(orjson.dumps(manifest))
    result = cli("--root", str(b), "mesh-import", "--json")
    assert result.code == 3 and result.json()["forks"] == 1
    assert "fork" in result.json()["rejected"][0]["reason"]
    with Mesh.open(b) as mesh:
        (notice,) = mesh.events(match="mesh.trust.fork_detected")
    assert notice["payload"]["refused"] == other["event_id"] and notice["payload"]["seq"] == 1
    assert cli("--root", str(b), "mesh-status", "--json").json()["forks"] == 1
    again = cli("--root", str(b), "mesh-import", "--json")
    assert again.code == 3
    with Mesh.open(b) as mesh:
        assert len(mesh.events(match="mesh.trust.fork_detected")) == 1  # recorded once


def test_key_rotation_is_followed_by_every_node(
    tmp_path: Path, fleet: tuple[Path, Path, Path], cli: Runner
) -> None:
    remote, a, b = fleet
    with Mesh.open(a) as mesh:
        mesh.publish("ci", "before", {})
    sync(a)
    sync(b)  # node-b pins node-a's first key
    rotated = cli("--root", str(a), "mesh-rotate-key", "--json")
    assert rotated.code == 0
    new_key = rotated.json()["public_key"]
    assert rotated.json()["previous_key"] != new_key
    with Mesh.open(a) as mesh:
        mesh.publish("ci", "after", {})
        events = list(mesh.log.iter_events())
        assert mesh.manifests()["node-a"]["public_key"] == new_key
    assert events[-1]["event_type"] == "after" and signature_ok(events[-1], new_key)
    assert events[-2]["event_type"] == "trust.key_rotated"
    assert not signature_ok(events[-2], new_key)  # the announcement is signed by the old key
    sync(a)
    imported = sync(b)
    assert imported.code == 0 and imported.json()["imported"] == 2
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(checkout))
    assert run_process("--root", str(checkout), "mesh-verify").code == 0
    # the old key can no longer speak for node-a
    old = next(iter(orjson.loads((a / LEDGER / "nodes/node-a.json").read_bytes())["keys"]))
    assert old["public_key"] == rotated.json()["previous_key"]


def test_the_private_key_never_reaches_git(fleet: tuple[Path, Path, Path]) -> None:
    _, a, _ = fleet
    with Mesh.open(a) as mesh:
        mesh.publish("ci", "x", {})
        key_file = mesh.layout.private_key_file
    assert key_file.stat().st_mode & 0o777 == 0o600
    seed = key_file.read_text().strip().removeprefix("ed25519:")
    sync(a)
    tracked = git(a, "ls-tree", "-r", "--name-only", "origin/main")
    assert "keys" not in tracked and "state/event_mesh" not in tracked
    every_object = git(a, "rev-list", "--all", "--objects")
    for line in every_object.splitlines():
        sha = line.split()[0]
        if git(a, "cat-file", "-t", sha).strip() == "blob":
            assert seed not in git(a, "cat-file", "-p", sha)


def test_a_symlinked_node_folder_is_refused(fleet: tuple[Path, Path, Path], cli: Runner) -> None:
    _, a, b = fleet
    with Mesh.open(a) as mesh:
        mesh.publish("ci", "x", {})
    sync(a)
    git(b, "pull", "-q", "--rebase", "origin", "main")
    real = b / LEDGER / "outbox/node-a"
    moved = b / "elsewhere"
    real.rename(moved)
    real.symlink_to(moved, target_is_directory=True)
    result = cli("--root", str(b), "mesh-import", "--json")
    assert result.code == 3 and "symlink" in result.json()["rejected"][0]["reason"]
    assert result.json()["imported"] == 0
    verify = cli("--root", str(b), "mesh-verify", "--json")
    assert verify.code == 3 and "not a plain folder" in str(verify.json()["problems"])


def test_sync_reports_rejections_with_exit_3_and_still_pushes(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    remote, a, b = fleet
    with Mesh.open(a) as mesh:
        mesh.publish("ci", "x", {})
        signer = mesh.current_signer()
    sync(a)
    git(b, "pull", "-q", "--rebase", "origin", "main")
    # a correctly signed event whose payload holds a secret, committed by someone
    first = orjson.loads(files_of(b, "node-a")[0].read_bytes())
    leaky = resigned(
        first,
        signer,
        seq=2,
        prev=first["event_id"],
        clock=first["clock"] + 1,
        payload={"note": "AKIAIOSFODNN7EXAMPLE"},
    )
    folder = files_of(b, "node-a")[0].parent
    (folder / f"{leaky['event_id']}.json").write_bytes(orjson.dumps(leaky))
    git(b, "add", "-A")
    git(b, "commit", "-q", "-m", "leak")
    git(b, "push", "-q", "origin", "HEAD:main")
    with Mesh.open(b) as mesh:
        mesh.publish("ci", "from-b", {})
    result = sync(b)
    assert result.code == 3
    data = result.json()
    assert data["pushed"] is True and data["exported"] == 1
    assert "looks like a credential" in data["rejected"][0]["reason"]
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(checkout))
    verify = run_process("--root", str(checkout), "mesh-verify", "--json")
    assert verify.code == 3 and "credential" in str(verify.json()["problems"])


def test_verify_since_checks_only_new_events_from_the_base_head(
    tmp_path: Path, fleet: tuple[Path, Path, Path]
) -> None:
    remote, a, _ = fleet
    with Mesh.open(a) as mesh:
        mesh.publish_many([{"topic": "ci", "event_type": "x"}] * 3)
    sync(a)
    base = git(a, "rev-parse", "HEAD").strip()
    with Mesh.open(a) as mesh:
        mesh.publish_many([{"topic": "ci", "event_type": "y"}] * 2)
        signer = mesh.current_signer()
    sync(a)
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(checkout))
    clean = run_process("--root", str(checkout), "mesh-verify", "--since", base, "--json")
    assert clean.code == 0 and clean.json()["checked"] == 2  # the 3 older files are not read
    # a signed event that skips a link: prev points at seq 3, not seq 5
    files = files_of(checkout, "node-a")
    third, fifth = (orjson.loads(files[i].read_bytes()) for i in (2, 4))
    bad = resigned(fifth, signer, seq=6, prev=third["event_id"], clock=fifth["clock"] + 1)
    (files[4].parent / f"{bad['event_id']}.json").write_bytes(orjson.dumps(bad))
    manifest_path = checkout / LEDGER / "nodes/node-a.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    manifest["head"] = {"seq": 6, "event_id": bad["event_id"]}
    manifest_path.write_bytes(orjson.dumps(manifest))
    git(checkout, "add", "-A")
    git(checkout, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q", "-m", "pr")
    flagged = run_process("--root", str(checkout), "mesh-verify", "--since", base, "--json")
    assert flagged.code == 3
    assert "prev does not match seq 5" in str(flagged.json()["problems"])
