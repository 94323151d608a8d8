"""A handler module that fails to load pauses its own handlers; everything else, and the
sync (pull, import, export, push), goes on. Once fixed, its handlers catch up on the events
that waited, each once."""

from __future__ import annotations

import textwrap
from pathlib import Path

from conftest import Runner, log_lines
from gitfleet import add_node, make_remote

GOOD = textwrap.dedent(
    """
    from orxaq_autonomy.handlers import FollowUp, handler

    @handler("jobs.#")
    def job(event, ctx):
        return FollowUp("results", "job.done", {"n": event["payload"].get("n")})
    """
)
BROKEN = GOOD.replace("def job(event, ctx):", "def job(event, ctx)  # a syntax error")


def done(root: Path) -> list[int]:
    return sorted(e["payload"]["n"] for e in log_lines(root) if e["event_type"] == "job.done")


def test_a_broken_module_pauses_its_handlers_and_the_fleet_syncs_on(
    tmp_path: Path, cli: Runner
) -> None:
    remote = make_remote(tmp_path)
    a = add_node(tmp_path, remote, "node-a")
    b = add_node(tmp_path, remote, "node-b")
    (a / "user_handlers.py").write_text(BROKEN)
    (a / "state/event_mesh/config.toml").write_text('handlers = ["user_handlers.py"]\n')
    for n in range(3):
        payload = f'{{"n": {n}}}'
        cli(
            "--root",
            str(a),
            "mesh-publish",
            "--topic",
            "jobs",
            "--event-type",
            "run",
            "--payload-json",
            payload,
        )
    # the sync goes on: a's events reach b although a's handler module cannot load
    result = cli("--root", str(a), "mesh-sync", "--json")
    assert result.code == 0, result.err
    assert "user_handlers.py" in result.err and "paused" in result.err
    assert result.json()["exported"] == 3 and result.json()["pushed"]
    assert cli("--root", str(b), "mesh-sync", "--json").json()["imported"] == 3
    assert done(a) == []
    status = cli("--root", str(a), "mesh-status", "--json").json()
    assert "user_handlers.py" in status["dispatch"]["broken_modules"]
    why = status["dispatch"]["broken_modules"]["user_handlers.py"]
    assert why.startswith("cannot load handler module user_handlers.py") and "line" in why
    assert "user_handlers.py paused" in cli("--root", str(a), "mesh-status").out
    # more events while it is broken; the built-in chain still runs meanwhile
    cli(
        "--root",
        str(a),
        "mesh-publish",
        "--topic",
        "jobs",
        "--event-type",
        "run",
        "--payload-json",
        '{"n": 3}',
    )
    cli(
        "--root",
        str(a),
        "mesh-publish",
        "--topic",
        "monitoring",
        "--event-type",
        "heartbeat.changed",
    )
    dispatched = cli("--root", str(a), "mesh-dispatch", "--json").json()
    assert "module:user_handlers.py" in dispatched["paused"]
    assert any(e["event_type"] == "tick.requested" for e in log_lines(a))
    # fixed: every event that waited is handled, once
    (a / "user_handlers.py").write_text(GOOD)
    assert cli("--root", str(a), "mesh-sync").code == 0
    assert done(a) == [0, 1, 2, 3]
    cli("--root", str(a), "mesh-dispatch")
    cli("--root", str(a), "mesh-sync")
    assert done(a) == [0, 1, 2, 3]
    status = cli("--root", str(a), "mesh-status", "--json").json()
    assert status["dispatch"]["broken_modules"] == {}
    cli("--root", str(b), "mesh-sync")
    assert done(b) == [0, 1, 2, 3]  # the follow-ups reached the fleet too


def test_a_module_without_handlers_is_paused_too(tmp_path: Path, cli: Runner) -> None:
    root = tmp_path / "root"
    cli("--root", str(root), "mesh-init", "--node-id", "node-a")
    (root / "empty.py").write_text("X = 1\n")
    (root / "state/event_mesh/config.toml").write_text('handlers = ["empty.py"]\n')
    cli("--root", str(root), "mesh-publish", "--topic", "jobs", "--event-type", "run")
    result = cli("--root", str(root), "mesh-dispatch", "--json")
    assert result.code == 0 and "defines no @handler" in result.err
    assert result.json()["events"] == 1
