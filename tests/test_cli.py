"""The command line as users and scripts see it: output shapes, exit codes, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from conftest import Runner, log_lines, run_process, snapshot
from orxaq_autonomy import Mesh


def test_init_creates_layout_and_rerun_changes_nothing(tmp_path: Path, cli: Runner) -> None:
    root = tmp_path / "r"
    first = cli("--root", str(root), "mesh-init", "--node-id", "Build_Box", "--json")
    assert first.code == 0, first.err
    data = first.json()
    assert data["node_id"] == "build-box"
    assert data["public_key"].startswith("ed25519:") and len(data["public_key"]) == 8 + 43
    key = root / "state/event_mesh/keys/ed25519.key"
    assert key.stat().st_mode & 0o777 == 0o600
    manifest = orjson.loads(
        (root / "state/github_coordination/event_mesh/nodes/build-box.json").read_bytes()
    )
    assert manifest == {
        "node_id": "build-box",
        "capabilities": [],
        "lanes": [],
        "public_key": data["public_key"],
        "keys": [{"public_key": data["public_key"], "from_seq": 1}],
        "head": {"seq": 0},
    }
    gitignore = (root / ".gitignore").read_text()
    assert "/state/event_mesh/" in gitignore and "/artifacts/autonomy/event_mesh/" in gitignore
    assert "github_coordination" not in gitignore.replace("(the ledger stays tracked)", "")

    before = snapshot(root)
    again = cli("--root", str(root), "mesh-init", "--json")
    assert again.code == 0
    assert again.json()["created"] == [] and again.json()["updated"] == []
    assert snapshot(root) == before

    refused = cli("--root", str(root), "mesh-init", "--node-id", "other")
    assert refused.code == 2 and "already node build-box" in refused.err
    assert snapshot(root) == before

    added = cli("--root", str(root), "mesh-init", "--capability", "gpu", "--json")
    assert added.json()["public_key"] == data["public_key"]  # same keys
    assert (
        "gpu"
        in orjson.loads(
            (root / "state/github_coordination/event_mesh/nodes/build-box.json").read_bytes()
        )["capabilities"]
    )


def test_init_keeps_an_existing_gitignore(tmp_path: Path, cli: Runner) -> None:
    (tmp_path / ".gitignore").write_text("node_modules/")
    assert cli("--root", str(tmp_path), "mesh-init", "--node-id", "n").code == 0
    text = (tmp_path / ".gitignore").read_text()
    assert text.startswith("node_modules/\n")
    assert text.count("/state/event_mesh/") == 1


def test_gitignore_keeps_private_paths_out_of_git(root: Path, cli: Runner) -> None:
    cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "x")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed == [".gitignore", "state/github_coordination/event_mesh/nodes/node-a.json"]


def test_publish_with_every_option(root: Path, cli: Runner) -> None:
    first = cli(
        "--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "started", "--json"
    ).json()
    result = cli(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "routing",
        "--event-type",
        "route.requested",
        "--payload-json",
        '{"task_id": "task-17"}',
        "--causation-id",
        first["event_id"][:12],
        "--correlation-id",
        "deploy-2026-11-22",
        "--source",
        "ci-runner",
        "--target",
        "Node-B",
        "--partition-key",
        "task-17",
        "--tenant",
        "acme",
        "--idempotency-key",
        "ci-run-991",
        "--json",
    )
    assert result.code == 0, result.err
    data = result.json()
    assert data["duplicate"] is False and data["seq"] == 2
    event = data["event"]
    assert event["causation_id"] == first["event_id"]
    assert event["target"] == "node-b"
    assert event["prev"] == first["event_id"]
    assert {
        k: event[k]
        for k in ("correlation_id", "source", "partition_key", "tenant", "idempotency_key")
    } == {
        "correlation_id": "deploy-2026-11-22",
        "source": "ci-runner",
        "partition_key": "task-17",
        "tenant": "acme",
        "idempotency_key": "ci-run-991",
    }
    assert log_lines(root)[-1] == event

    repeat = cli(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "routing",
        "--event-type",
        "route.requested",
        "--tenant",
        "acme",
        "--idempotency-key",
        "ci-run-991",
        "--json",
    ).json()
    assert repeat == {"event_id": data["event_id"], "seq": 2, "duplicate": True}
    assert len(log_lines(root)) == 2


def test_payload_file_inside_root_and_stdin(root: Path, cli: Runner) -> None:
    (root / "p.json").write_text('{"from": "file"}')
    a = cli(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "t",
        "--event-type",
        "e",
        "--payload-file",
        str(root / "p.json"),
        "--json",
    )
    assert a.json()["event"]["payload"] == {"from": "file"}
    b = cli(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "t",
        "--event-type",
        "e",
        "--payload-file",
        "-",
        "--json",
        stdin='{"from": "stdin"}',
    )
    assert b.json()["event"]["payload"] == {"from": "stdin"}


def test_stdin_batch(root: Path, cli: Runner) -> None:
    lines = (
        "\n".join(
            orjson.dumps({"topic": "ci", "event_type": "job.done", "payload": {"i": i}}).decode()
            for i in range(5)
        )
        + '\n\n{"topic": "ci", "event_type": "job.done", "idempotency_key": "k"}\n'
    )
    result = cli(
        "--root",
        str(root),
        "mesh-publish",
        "--stdin",
        "--source",
        "batch",
        "--json",
        stdin=lines + '{"topic": "ci", "event_type": "job.done", "idempotency_key": "k"}',
    )
    assert result.code == 0, result.err
    data = result.json()
    assert (data["count"], data["appended"], data["duplicates"]) == (7, 6, 1)
    assert [e["seq"] for e in data["events"]] == [1, 2, 3, 4, 5, 6, 6]
    events = log_lines(root)
    assert [e["payload"].get("i") for e in events[:5]] == [0, 1, 2, 3, 4]
    assert {e["source"] for e in events} == {"batch"}


def test_log_and_status(root: Path, cli: Runner) -> None:
    for topic, etype in [
        ("routing", "route.requested"),
        ("scaling", "decision.made"),
        ("routing", "route.selected"),
    ]:
        cli("--root", str(root), "mesh-publish", "--topic", topic, "--event-type", etype)
    out = cli("--root", str(root), "mesh-log", "--match", "routing.*.*", "--json").json()
    assert [e["event_type"] for e in out["events"]] == ["route.requested", "route.selected"]
    assert (
        cli("--root", str(root), "mesh-log", "--limit", "1", "--json").json()["events"][0][
            "event_type"
        ]
        == "route.selected"
    )
    human = cli("--root", str(root), "mesh-log", "--node", "node-a")
    assert human.code == 0 and len(human.out.splitlines()) == 3
    assert "routing.route.requested" in human.out

    status = cli("--root", str(root), "mesh-status", "--json").json()
    assert status["node_id"] == "node-a"
    assert status["log"]["events"] == 3 and status["log"]["clock"] == 3
    assert status["own"]["seq"] == 3 and status["unexported"] == 3
    assert status["nodes"]["node-a"]["capabilities"] == ["routing"]
    assert status["quarantined"]["incidents"] == 0
    assert cli("--root", str(root), "--json", "mesh-status").json() == status  # global --json


def test_root_from_environment_and_env_overrides(
    tmp_path: Path, cli: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORXAQ_AUTONOMY_ROOT", str(tmp_path))
    monkeypatch.setenv("ORXAQ_AUTONOMY_NODE_ID", "Env Node")
    monkeypatch.setenv("ORXAQ_AUTONOMY_EVENT_MESH_FILE", "logs/mesh.ndjson")
    assert cli("mesh-init").code == 0
    assert cli("mesh-publish", "--topic", "t", "--event-type", "e").code == 0
    assert (tmp_path / "logs/mesh.ndjson").exists()
    assert cli("mesh-status", "--json").json()["node_id"] == "env-node"
    monkeypatch.setenv("ORXAQ_AUTONOMY_NODE_ID", "someone-else")
    mismatch = cli("mesh-status")
    assert mismatch.code == 2 and "belongs to node env-node" in mismatch.err


BAD_PUBLISHES = [
    (["--payload-json", "{not json"], "invalid JSON in --payload-json"),
    (["--payload-json", "[1, 2]"], "need a JSON object"),
    (["--payload-json", '"text"'], "need a JSON object"),
    (["--topic", "Bad.Topic"], "bad topic"),
    (["--event-type", "has space"], "bad event type"),
    (["--target", "-"], "bad node id"),
    (["--payload-json", '{"api_key": "abc123def456"}'], "secret"),
    (["--payload-json", '{"x": "ghp_' + "a" * 36 + '"}'], "credential"),
    (["--payload-json", '{"big": 9223372036854775808}'], "signed 64 bit"),
    (["--causation-id", "evt_ffff"], "unknown event id"),
    (["--causation-id", "zzz"], "bad event id"),
    (["--payload-file", "../missing-outside.json"], "cannot read --payload-file"),
    (["--payload-file", "missing.json"], "cannot read --payload-file"),
    (["--payload-json", "{}", "--payload-file", "-"], "not both"),
    (["--tenant", ""], "bad tenant"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_PUBLISHES)
def test_bad_publish_input_exits_2_and_changes_nothing(
    root: Path, cli: Runner, extra: list[str], message: str
) -> None:
    cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "seed")
    (root.parent / "outside.json").write_text("{}")
    before = snapshot(root)
    args = ["--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "x", *extra]
    result = cli(*args)
    assert result.code == 2, result.err
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert snapshot(root) == before
    as_json = cli(*args, "--json")
    assert as_json.code == 2 and message in as_json.json()["error"]["message"]


def test_oversize_event_exits_2(root: Path, cli: Runner) -> None:
    (root / "big.json").write_text(orjson.dumps({"blob": "x" * (1 << 20)}).decode())
    before = snapshot(root)
    result = cli(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "ci",
        "--event-type",
        "x",
        "--payload-file",
        "big.json",
    )
    assert result.code == 2 and "event too large" in result.err
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        ('{"topic": "ci", "event_type": "a"}\n{"topic": "ci"', "stdin line 2: invalid JSON"),
        ('{"topic": "ci", "event_type": "a"}\n[1]', "stdin line 2: need a JSON object"),
        (
            '{"topic": "ci", "event_type": "a"}\n{"topic": "CI", "event_type": "b"}',
            "item 2: bad topic",
        ),
        ('{"topic": "ci", "event_type": "a", "evnt": 1}', "unknown field 'evnt'"),
        ('{"topic": "ci"}', "missing field 'event_type'"),
        ('{"topic": "ci", "event_type": "a", "payload": {"password": "pw123456"}}', "secret"),
        ("\n\n", "no events"),
    ],
)
def test_bad_batches_append_nothing(root: Path, cli: Runner, stdin: str, message: str) -> None:
    before = snapshot(root)
    result = cli("--root", str(root), "mesh-publish", "--stdin", stdin=stdin)
    assert result.code == 2 and message in result.err, result.err
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mesh-log", "--match", "a..b"], "bad pattern"),
        (["mesh-log", "--since", "last week"], "bad since"),
        (["mesh-log", "--limit", "0"], "bad limit"),
        (["mesh-log", "--limit", "x"], "Invalid value for '--limit'"),
        (["mesh-log", "--node", "Bad Node"], "bad node id"),
        (["mesh-publish", "--topic", "ci"], "needs --topic and --event-type"),
        (["mesh-publish", "--stdin", "--payload-json", "{}"], "drop --payload-json"),
        (["mesh-nope"], "No such command"),
        (["mesh-init", "--capability", "Bad Cap!"], "bad capability"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    root: Path, cli: Runner, args: list[str], message: str
) -> None:
    before = snapshot(root)
    result = cli("--root", str(root), *args)
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1
    assert snapshot(root) == before


def test_uninitialised_root_is_a_clear_error(tmp_path: Path, cli: Runner) -> None:
    result = cli("--root", str(tmp_path), "mesh-publish", "--topic", "a", "--event-type", "b")
    assert result.code == 2 and "not initialised: run" in result.err
    assert list(tmp_path.iterdir()) == []


def test_env_path_escaping_the_root_is_refused(
    tmp_path: Path, cli: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORXAQ_AUTONOMY_EVENT_MESH_STATE_DIR", "../elsewhere")
    result = cli("--root", str(tmp_path / "r"), "mesh-init", "--node-id", "n")
    assert result.code == 2 and "escapes the root" in result.err
    assert not (tmp_path / "r").exists() and not (tmp_path / "elsewhere").exists()


def test_real_process_entry_points(root: Path) -> None:
    """`python -m orxaq_autonomy` and the console script behave the same."""
    via_module = run_process(
        "--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "x", "--json"
    )
    assert via_module.code == 0 and via_module.json()["seq"] == 1
    script = Path(sys.executable).parent / "orxaq-autonomy"
    proc = subprocess.run(
        [str(script), "--root", str(root), "mesh-status", "--json"],
        capture_output=True,
        env={**os.environ},
        check=False,
    )
    assert proc.returncode == 0 and orjson.loads(proc.stdout)["own"]["seq"] == 1
    bad = run_process("--root", str(root), "mesh-publish", "--topic", "X", "--event-type", "y")
    assert bad.code == 2 and bad.err.count("\n") == 1 and "Traceback" not in bad.err


def test_shell_completion_lists_commands(root: Path) -> None:
    script = Path(sys.executable).parent / "orxaq-autonomy"
    env = {
        **os.environ,
        "_ORXAQ_AUTONOMY_COMPLETE": "complete_bash",
        "COMP_WORDS": "orxaq-autonomy mesh-",
        "COMP_CWORD": "1",
    }
    proc = subprocess.run([str(script)], capture_output=True, text=True, env=env, check=False)
    assert {"mesh-init", "mesh-publish", "mesh-log", "mesh-status"} <= set(proc.stdout.split())
    shown = subprocess.run(
        [str(script), "--show-completion", "bash"], capture_output=True, text=True, check=False
    )
    assert shown.returncode == 0 and "_ORXAQ_AUTONOMY_COMPLETE" in shown.stdout


def test_a_payload_file_may_be_anywhere_the_user_can_read(
    tmp_path: Path, root: Path, cli: Runner
) -> None:
    outside = tmp_path / "elsewhere" / "payload.json"
    outside.parent.mkdir()
    outside.write_text('{"from": "outside"}')
    result = cli(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "ci",
        "--event-type",
        "x",
        "--payload-file",
        str(outside),
        "--json",
    )
    assert result.code == 0, result.err
    with Mesh.open(root) as mesh:
        assert mesh.get(result.json()["event_id"])["payload"] == {"from": "outside"}
