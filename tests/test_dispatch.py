"""Dispatch guarantees: scopes, exactly once, retries, dead letters, breaker, partitions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import Runner, run_process, snapshot
from orxaq_autonomy import Mesh
from orxaq_autonomy.dispatch.dispatcher import Dispatcher
from orxaq_autonomy.envelope import Draft

USER_HANDLERS = textwrap.dedent(
    """
    from orxaq_autonomy.handlers import FollowUp, handler

    @handler("jobs.#")
    def job(event, ctx):
        payload = event["payload"]
        if payload.get("fail") and (ctx.layout.root / "failing").exists():
            raise RuntimeError(f"job {payload.get('n')} failed")
        return FollowUp("results", "job.done", {"n": payload.get("n")})

    @handler("audit.#", scope="every")
    def audit(event, ctx):
        return FollowUp("results", "audited", {"of": event["event_id"]})

    @handler("work.#", scope="target")
    def work(event, ctx):
        return FollowUp("results", "worked", {"of": event["event_id"]})
    """
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    Mesh.init(tmp_path, node_id="node-a")
    (tmp_path / "user_handlers.py").write_text(USER_HANDLERS)
    (tmp_path / "state/event_mesh/config.toml").write_text(
        'handlers = ["user_handlers.py"]\n[dispatch]\nbackoff_seconds = 10\n'
    )
    return Mesh.open(tmp_path)


def results(mesh: Mesh, event_type: str) -> list[dict[str, Any]]:
    return [
        e
        for e in mesh.log.iter_events()
        if e["topic"] == "results" and e["event_type"] == event_type
    ]


def foreign(mesh: Mesh, node: str, topic: str, event_type: str, **fields: Any) -> str:
    """An event authored by another node, as import will append it."""
    draft = Draft.create(topic, event_type, {}, **fields)
    return mesh.log.append([draft], node)[0].event_id


def test_scopes_origin_target_every(mesh: Mesh) -> None:
    mesh.publish("jobs", "run", {"n": 1})
    foreign(mesh, "node-b", "jobs", "run")  # origin scope: not ours, never handled here
    foreign(mesh, "node-b", "audit", "x")  # every: handled on every node
    mine = foreign(mesh, "node-b", "work", "x", target="node-a")
    foreign(mesh, "node-b", "work", "x", target="node-c")  # someone else's
    foreign(mesh, "node-b", "work", "x")  # no target: its author's
    own = mesh.publish("work", "x", {}).event_id  # no target, authored here
    Dispatcher(mesh).run()
    assert [e["payload"]["n"] for e in results(mesh, "job.done")] == [1]
    assert len(results(mesh, "audited")) == 1
    assert sorted(e["payload"]["of"] for e in results(mesh, "worked")) == sorted([mine, own])


def test_rehandling_appends_nothing_twice(mesh: Mesh) -> None:
    mesh.publish_many(
        [{"topic": "jobs", "event_type": "run", "payload": {"n": i}} for i in range(50)]
    )
    first = Dispatcher(mesh).run()
    assert first.followups == 50
    # lose the cursor, as a crash between append and cursor save would
    (mesh.layout.state_dir / "dispatch_cursor.json").unlink()
    again = Dispatcher(mesh).run()
    assert again.followups == 0 and again.duplicates == 50
    assert len(results(mesh, "job.done")) == 50


def test_retry_backoff_dead_letter_and_dlq_retry(mesh: Mesh, cli: Runner) -> None:
    root = mesh.layout.root
    (root / "failing").touch()
    clock = Clock()
    bad = mesh.publish("jobs", "run", {"n": 1, "fail": True}).event_id
    mesh.publish("jobs", "run", {"n": 2})
    report = Dispatcher(mesh, clock=clock).run()
    assert (report.failed, report.pending, report.handled) == (1, 1, 1)
    state = orjson.loads((root / "state/event_mesh/dispatch_cursor.json").read_bytes())
    (entry,) = state["pending"]
    # backoff 10 s, less up to half of it as jitter
    assert entry["attempts"] == 1 and clock.now + 5 <= entry["due"] <= clock.now + 10
    assert "RuntimeError: job 1 failed" in entry["error"]

    assert Dispatcher(mesh, clock=clock).run().failed == 0  # not due yet: no attempt burned
    clock.now += 10
    assert Dispatcher(mesh, clock=clock).run().failed == 1
    state = orjson.loads((root / "state/event_mesh/dispatch_cursor.json").read_bytes())
    assert clock.now + 10 <= state["pending"][0]["due"] <= clock.now + 20  # doubled
    clock.now += 20
    third = Dispatcher(mesh, clock=clock).run()
    assert third.dead_lettered == 1 and third.pending == 0
    (notice,) = [e for e in mesh.log.iter_events() if e["event_type"] == "dispatch.dead_lettered"]
    assert notice["causation_id"] == bad
    assert notice["payload"]["handler"] == "job" and notice["payload"]["attempts"] == 3

    listed = cli("--root", str(root), "mesh-dlq", "list", "--json").json()["dead_letters"]
    assert [(d["event_id"], d["handler"], d["attempts"]) for d in listed] == [(bad, "job", 3)]
    assert "job 1 failed" in listed[0]["traceback"]
    assert cli("--root", str(root), "mesh-dlq", "stats", "--json").json() == {
        "count": 1,
        "by_handler": {"job": 1},
    }
    assert cli("--root", str(root), "mesh-status", "--json").json()["dispatch"]["dead_letters"] == 1

    (root / "failing").unlink()  # the cause is fixed
    retried = cli("--root", str(root), "mesh-dlq", "retry", bad[:12], "--json")
    assert retried.code == 0 and retried.json() == {"retry": [{"event_id": bad, "handler": "job"}]}
    Dispatcher(mesh, clock=clock).run()
    assert sorted(e["payload"]["n"] for e in results(mesh, "job.done")) == [1, 2]
    assert cli("--root", str(root), "mesh-dlq", "list", "--json").json() == {"dead_letters": []}


def test_dlq_bad_input(mesh: Mesh, cli: Runner) -> None:
    root = str(mesh.layout.root)
    before = snapshot(mesh.layout.root)
    for args, message in [
        (["mesh-dlq", "retry"], "needs an event id"),
        (["mesh-dlq", "purge"], "bad mesh-dlq action"),
        (["mesh-dlq", "drop", "evt_0000"], "unknown event id"),
    ]:
        result = cli("--root", root, *args)
        assert result.code == 2 and message in result.err, result.err
    assert snapshot(mesh.layout.root) == before


def test_partition_waits_behind_a_failing_event(mesh: Mesh) -> None:
    root = mesh.layout.root
    (root / "failing").touch()
    clock = Clock()
    mesh.publish("jobs", "run", {"n": 1, "fail": True}, partition_key="order-1")
    mesh.publish("jobs", "run", {"n": 2}, partition_key="order-1")  # waits behind n=1
    mesh.publish("jobs", "run", {"n": 3}, partition_key="order-2")  # goes on
    mesh.publish("jobs", "run", {"n": 4})  # no key: goes on
    report = Dispatcher(mesh, clock=clock).run()
    assert sorted(e["payload"]["n"] for e in results(mesh, "job.done")) == [3, 4]
    assert report.pending == 2
    (root / "failing").unlink()
    clock.now += 10
    Dispatcher(mesh, clock=clock).run()
    assert [e["payload"]["n"] for e in results(mesh, "job.done")] == [3, 4, 1, 2]


def test_breaker_pauses_a_handler_without_burning_attempts(mesh: Mesh) -> None:
    root = mesh.layout.root
    (root / "failing").touch()
    (root / "state/event_mesh/config.toml").write_text(
        'handlers = ["user_handlers.py"]\n[dispatch]\nbackoff_seconds = 1000\n'
        "max_attempts = 9\nbreaker_failures = 3\nbreaker_open_seconds = 60\n"
    )
    clock = Clock()
    mesh.publish_many(
        [
            {"topic": "jobs", "event_type": "run", "payload": {"n": i, "fail": True}}
            for i in range(5)
        ]
    )
    mesh.publish("audit", "x", {})  # another handler keeps going
    report = Dispatcher(mesh, clock=clock).run()
    assert report.failed == 3  # then the breaker opened: events 3 and 4 were not tried
    assert report.paused == ["job"]
    assert len(results(mesh, "audited")) == 1
    mesh.publish("jobs", "run", {"n": 9})
    assert Dispatcher(mesh, clock=clock).run().failed == 0  # still open: it waits
    state = orjson.loads((root / "state/event_mesh/dispatch_cursor.json").read_bytes())
    assert "job" in state["lagging"]
    assert all(p["attempts"] == 1 for p in state["pending"])

    (root / "failing").unlink()
    clock.now += 61  # half open; the waiting events run, in order
    report = Dispatcher(mesh, clock=clock).run()
    assert report.paused == []
    clock.now += 1000  # and the three retries come due
    Dispatcher(mesh, clock=clock).run()
    assert sorted(e["payload"]["n"] for e in results(mesh, "job.done")) == [0, 1, 2, 3, 4, 9]
    state = orjson.loads((root / "state/event_mesh/dispatch_cursor.json").read_bytes())
    assert state["pending"] == [] and state["lagging"] == {}


def test_replay_changes_nothing_unless_logic_changed(mesh: Mesh, cli: Runner) -> None:
    root = str(mesh.layout.root)
    for counts in ({"failed_count": 1}, {"started_count": 4}, {}):
        mesh.publish("scaling", "decision.requested", counts)
    Dispatcher(mesh).run()
    same = cli("--root", root, "mesh-replay", "--handler", "scaling_decide", "--json").json()
    assert (same["handled"], same["followups"], same["duplicates"]) == (3, 0, 3)
    (mesh.layout.state_dir / "config.toml").write_text("""
[scaling]
table_version = "scaling_v2"
[[scaling.rules]]
when = { started_count = ">3" }
action = "scale_down"
reason = "too_many_starts"
target_delta = -1
""")
    changed = cli("--root", root, "mesh-replay", "--handler", "scaling_decide", "--json").json()
    assert changed["followups"] == 3  # a new table version: three new decisions
    made = [e["payload"] for e in mesh.log.iter_events() if e["event_type"] == "decision.made"]
    assert [m["table_version"] for m in made] == ["scaling_v1"] * 3 + ["scaling_v2"] * 3
    bad = cli("--root", root, "mesh-replay", "--handler", "nope")
    assert bad.code == 2 and "unknown handler 'nope'" in bad.err


def test_trace_shows_causes_and_followups(mesh: Mesh, cli: Runner) -> None:
    task = mesh.publish(
        "scheduling",
        "task.enqueued",
        {"task_id": "t", "routing_options": [{"lane_id": "l", "score": 1}]},
    )
    Dispatcher(mesh).run()
    trace = cli("--root", str(mesh.layout.root), "mesh-trace", task.event_id[:10], "--json").json()
    assert trace["causes"] == []
    kinds = [n["event"]["event_type"] for n in trace["followups"]]
    assert kinds == ["task.scheduled", "route.requested"]
    assert trace["followups"][1]["followups"][0]["event"]["event_type"] == "route.selected"
    leaf = trace["followups"][1]["followups"][0]["event"]["event_id"]
    up = cli("--root", str(mesh.layout.root), "mesh-trace", leaf, "--json").json()
    assert [c["event_type"] for c in up["causes"]] == ["route.requested", "task.enqueued"]
    human = cli("--root", str(mesh.layout.root), "mesh-trace", leaf)
    assert human.code == 0 and "route.selected" in human.out


def test_cursor_from_another_log_is_refused(mesh: Mesh, tmp_path: Path) -> None:
    mesh.publish("jobs", "run", {"n": 1})
    Dispatcher(mesh).run()
    cursor = (mesh.layout.state_dir / "dispatch_cursor.json").read_bytes()
    other = tmp_path / "other"
    Mesh.init(other, node_id="node-a")
    with Mesh.open(other) as o:
        o.publish("x", "y", {"pad": "p" * 500})
        (o.layout.state_dir / "dispatch_cursor.json").write_bytes(cursor)
        result = run_process("--root", str(other), "mesh-dispatch")
    assert result.code == 1 and "belongs to another log" in result.err


def test_max_events_bad_input(mesh: Mesh, cli: Runner) -> None:
    result = cli("--root", str(mesh.layout.root), "mesh-dispatch", "--max-events", "0")
    assert result.code == 2 and "bad --max-events" in result.err


DRAIN = [
    sys.executable,
    "-m",
    "orxaq_autonomy",
    "mesh-dispatch",
    "--wait",
    "--max-events",
    "400",
    "--json",
]


def count_followups(root: Path) -> tuple[Counter[tuple[str, str]], int]:
    """(cause, follow-up kind) -> how many; and the number of events in the log."""
    seen: Counter[tuple[str, str]] = Counter()
    lines = (root / "artifacts/autonomy/event_mesh/events.ndjson").read_bytes().splitlines()
    for line in lines:
        event = orjson.loads(line)
        if "causation_id" in event:
            seen[(event["causation_id"], f"{event['topic']}.{event['event_type']}")] += 1
    return seen, len(lines)


def mixed_workload(n: int) -> bytes:
    kinds: list[dict[str, Any]] = [
        {"topic": "monitoring", "event_type": "heartbeat.changed"},
        {"topic": "scheduling", "event_type": "task.enqueued"},
        {
            "topic": "scheduling",
            "event_type": "lanes.ensure.summary",
            "payload": {"parallel_groups_at_limit": 1},
        },
        {"topic": "ci", "event_type": "noise"},
    ]
    out = []
    for i in range(n):
        item = dict(kinds[i % 4])
        if item["event_type"] == "task.enqueued":
            item["payload"] = {
                "task_id": f"t{i}",
                "routing_options": [{"lane_id": "l", "score": i % 7}],
            }
        out.append(orjson.dumps(item))
    return b"\n".join(out) + b"\n"


def test_sigkill_during_a_drain_never_duplicates_or_loses(tmp_path: Path) -> None:
    root = tmp_path / "r"
    assert run_process("--root", str(root), "mesh-init", "--node-id", "node-a").code == 0
    assert (
        run_process("--root", str(root), "mesh-publish", "--stdin", stdin=mixed_workload(3000)).code
        == 0
    )
    kills = 0
    for round_ in range(40):
        proc = subprocess.Popen(
            [*DRAIN[:3], "--root", str(root), *DRAIN[3:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if kills < 8:
            time.sleep(0.25 + 0.1 * (round_ % 4))
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        out, _ = proc.communicate()
        if proc.returncode == 0 and orjson.loads(out)["lag_events"] == 0:
            break
    else:
        pytest.fail("the drain never finished")
    seen, total = count_followups(root)
    assert kills == 8
    assert max(seen.values()) == 1  # no follow-up twice
    kinds = Counter(kind for _, kind in seen)
    # every cause got its follow-ups: 750 of each input kind
    assert kinds["scheduling.tick.requested"] == 750
    assert kinds["scheduling.task.scheduled"] == 750
    assert kinds["routing.route.requested"] == 750
    assert kinds["routing.route.selected"] == 750
    assert kinds["scaling.decision.requested"] == 750
    assert kinds["scaling.decision.made"] == 750
    assert kinds["scaling.command.requested"] == 750
    assert kinds["scaling.command.noop"] == 750  # no lanes configured
    assert kinds["scheduling.task.dispatch.blocked"] == 750  # no lane runs tasks
    assert total == 3000 + 750 * 9


def test_three_concurrent_dispatchers_handle_each_event_once(tmp_path: Path) -> None:
    root = tmp_path / "r"
    assert run_process("--root", str(root), "mesh-init", "--node-id", "node-a").code == 0
    assert (
        run_process("--root", str(root), "mesh-publish", "--stdin", stdin=mixed_workload(600)).code
        == 0
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orxaq_autonomy",
                "--root",
                str(root),
                "mesh-dispatch",
                *extra,
                "--json",
            ],
            stdout=subprocess.PIPE,
        )
        for extra in ([], ["--wait"], [])
    ]
    reports = [orjson.loads(p.communicate()[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(r["followups"] for r in reports) == 150 * 9  # 8 + task.dispatch.blocked
    seen, total = count_followups(root)
    assert max(seen.values()) == 1 and total == 600 + 150 * 9
    # the non-waiting ones either ran first or said they skipped
    assert any(r["skipped"] for r in reports) or sum(r["events"] for r in reports) >= 600
