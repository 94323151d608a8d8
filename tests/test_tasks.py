"""Tasks: route.selected runs on the node it targets, once, with real processes and git."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from conftest import Result, log_lines, run_process, snapshot
from gitfleet import git, make_remote
from orxaq_autonomy import Mesh
from orxaq_autonomy.config import Config
from orxaq_autonomy.dispatch import taskrunner
from orxaq_autonomy.dispatch.tasks import CRASH_ENV, choose_task_lane
from orxaq_autonomy.gateway.metrics import NodeCollector
from serving import serving

JOB = """\
import json, os, sys, time
task = os.environ["ORXAQ_TASK_ID"]
payload = json.load(open(os.environ["ORXAQ_TASK_PAYLOAD_FILE"]))
log = payload["log"]
def note(what):
    with open(log, "a") as fh:
        fh.write(f"{what} {task} {os.environ['ORXAQ_NODE_ID']} {time.time()}\\n")
note("start")
if payload.get("pidfile"):
    open(payload["pidfile"], "w").write(str(os.getpid()))
print("working on", task, "lane", os.environ["ORXAQ_LANE_ID"], flush=True)
print("env payload:", "ORXAQ_TASK_PAYLOAD" in os.environ, flush=True)
time.sleep(payload.get("sleep", 0))
while payload.get("gate") and not os.path.exists(payload["gate"]):
    time.sleep(0.02)
note("end")
sys.exit(payload.get("exit", 0))
"""


def lane_toml(job: Path, lane: str = "gpu-1", **extra: Any) -> str:
    lines = [
        "\n[[lanes]]",
        f'id = "{lane}"',
        'capabilities = ["gpu"]',
        f"run = {json.dumps([sys.executable, str(job)])}",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def configure(root: Path, text: str) -> None:
    with open(root / "state/event_mesh/config.toml", "a") as fh:
        fh.write(text)


def cli(root: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return run_process("--root", str(root), *args, env=env)


def ok(result: Result) -> Result:
    assert result.code == 0, result.err
    return result


def enqueue(root: Path, task_id: str, **payload: Any) -> None:
    body = {"task_id": task_id, "required_capabilities": ["gpu"], **payload}
    ok(
        cli(
            root,
            "mesh-publish",
            "--topic",
            "scheduling",
            "--event-type",
            "task.enqueued",
            "--payload-json",
            json.dumps(body),
        )
    )


def of_type(root: Path, *types: str) -> list[dict[str, Any]]:
    return [e for e in log_lines(root) if f"{e['topic']}.{e['event_type']}" in types]


def outcomes(root: Path) -> list[dict[str, Any]]:
    return of_type(root, "scheduling.task.completed", "scheduling.task.failed")


def settle(root: Path, count: int, timeout: float = 30) -> list[dict[str, Any]]:
    """Dispatch until `count` outcomes are in the log."""
    deadline = time.monotonic() + timeout
    while True:
        ok(cli(root, "mesh-dispatch"))
        found = outcomes(root)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def wait_for(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def runs(log: Path) -> list[list[str]]:
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, Path, Path]:
    """One node with the gpu capability and a lane that runs `job.py`."""
    root = tmp_path / "node"
    Mesh.init(root, node_id="node-a", capabilities=["gpu"])
    job = tmp_path / "job.py"
    job.write_text(JOB)
    configure(root, lane_toml(job, timeout=20))
    return root, job, tmp_path / "runs.log"


# --- two nodes through a real bare remote ----------------------------------------------------


def clone_node(base: Path, remote: Path, name: str, caps: list[str]) -> Path:
    root = base / name
    git(base, "clone", "-q", "-b", "main", str(remote), str(root))
    git(root, "config", "user.name", name)
    git(root, "config", "user.email", f"{name}@example.invalid")
    Mesh.init(root, node_id=name, capabilities=caps)
    return root


def test_task_runs_once_on_the_capable_node_and_its_outcome_reaches_the_router(
    tmp_path: Path,
) -> None:
    remote = make_remote(tmp_path)
    a = clone_node(tmp_path, remote, "node-a", ["routing"])
    b = clone_node(tmp_path, remote, "node-b", ["gpu"])
    job = tmp_path / "job.py"
    job.write_text(JOB)
    configure(b, lane_toml(job))
    log = tmp_path / "runs.log"
    ok(cli(b, "mesh-sync"))
    ok(cli(a, "mesh-sync"))  # node-a now knows node-b's manifest
    enqueue(a, "task-17", log=str(log), sleep=0.2)
    ok(cli(a, "mesh-sync"))
    [selected] = of_type(a, "routing.route.selected")
    assert selected["target"] == "node-b"
    assert of_type(a, "scheduling.task.dispatch.attempted") == []  # not node-a's to run

    ok(cli(b, "mesh-sync"))  # imports the route, starts the task, does not wait for it
    [attempted] = of_type(b, "scheduling.task.dispatch.attempted")
    assert attempted["payload"] == {"task_id": "task-17", "lane": "gpu-1", "attempt": 1}
    assert attempted["causation_id"] == selected["event_id"]
    wait_for(lambda: len(runs(log)) == 2)
    ok(cli(b, "mesh-sync"))  # records the outcome and pushes it
    ok(cli(a, "mesh-sync"))
    [done] = outcomes(a)
    assert done["event_type"] == "task.completed"
    assert done["node_id"] == "node-b"
    assert done["causation_id"] == selected["event_id"]
    assert done["payload"]["exit_code"] == 0
    assert "working on task-17 lane gpu-1" in done["payload"]["output_tail"]
    assert [r[:3] for r in runs(log)] == [
        ["start", "task-17", "node-b"],
        ["end", "task-17", "node-b"],
    ]
    for root in (a, b):  # more rounds change nothing: it ran once
        ok(cli(root, "mesh-sync"))
    assert len(runs(log)) == 2
    assert len(outcomes(b)) == 1


def test_blocked_route_is_requested_again_when_a_capable_manifest_arrives(tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    a = clone_node(tmp_path, remote, "node-a", ["routing"])
    b = clone_node(tmp_path, remote, "node-b", ["gpu"])
    c = clone_node(tmp_path, remote, "node-c", ["gpu"])
    job = tmp_path / "job.py"
    job.write_text(JOB)
    configure(b, lane_toml(job))
    log = tmp_path / "runs.log"
    enqueue(a, "task-9", log=str(log))
    ok(cli(a, "mesh-sync"))  # node-a knows no gpu node yet
    [blocked] = of_type(a, "routing.route.blocked")
    assert blocked["payload"]["reason"] == "no_capable_node"
    ok(cli(a, "mesh-sync"))
    assert len(of_type(a, "routing.route.requested")) == 1  # nothing new arrived: no retry

    ok(cli(b, "mesh-sync"))  # node-b's manifest arrives in the ledger
    ok(cli(a, "mesh-sync"))
    requests = of_type(a, "routing.route.requested")
    assert len(requests) == 2
    assert requests[1]["causation_id"] == blocked["event_id"]
    selected = of_type(a, "routing.route.selected")
    assert [s["target"] for s in selected] == ["node-b"]

    ok(cli(c, "mesh-sync"))  # another capable node: the blocked route was served already
    ok(cli(a, "mesh-sync"))
    assert len(of_type(a, "routing.route.requested")) == 2

    ok(cli(b, "mesh-sync"))
    wait_for(lambda: len(runs(log)) == 2)
    ok(cli(b, "mesh-sync"))
    ok(cli(a, "mesh-sync"))
    [done] = outcomes(a)
    assert done["event_type"] == "task.completed"
    assert done["causation_id"] == selected[0]["event_id"]
    # the task's payload came from the enqueued event, through the blocked route
    assert "env payload: True" in done["payload"]["output_tail"]


# --- one node: outcomes ----------------------------------------------------------------------


def test_failure_records_exit_code_and_output(node: tuple[Path, Path, Path]) -> None:
    root, _, log = node
    enqueue(root, "t-fail", log=str(log), exit=3)
    [failed] = settle(root, 1)
    assert failed["event_type"] == "task.failed"
    assert failed["payload"]["failure"] == "exit_code"
    assert failed["payload"]["exit_code"] == 3
    assert failed["payload"]["lane"] == "gpu-1"
    assert "working on t-fail" in failed["payload"]["output_tail"]
    assert failed["payload"]["duration_seconds"] >= 0


def test_timeout_kills_the_group(node: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, job, log = node
    configure(root, lane_toml(job, lane="gpu-0", rank=-1, timeout=0.5))
    pidfile = tmp_path / "pid"
    enqueue(root, "t-slow", log=str(log), sleep=60, pidfile=str(pidfile))
    [failed] = settle(root, 1)
    assert failed["payload"]["failure"] == "timeout"
    assert failed["payload"]["lane"] == "gpu-0"
    assert "exit_code" not in failed["payload"]
    assert not alive(int(pidfile.read_text()))
    assert [r[0] for r in runs(log)] == ["start"]


def test_cancel_kills_and_records_cancelled(node: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, _, log = node
    pidfile = tmp_path / "pid"
    enqueue(root, "t-long", log=str(log), sleep=60, pidfile=str(pidfile))
    ok(cli(root, "mesh-dispatch"))
    wait_for(pidfile.exists)
    wait_for(lambda: pidfile.read_text() != "")
    pid = int(pidfile.read_text())
    assert ok(cli(root, "mesh-tasks", "show", "t-long", "--json")).json()["state"] == "running"
    done = ok(cli(root, "mesh-tasks", "cancel", "t-long", "--json")).json()
    assert done["failure"] == "cancelled"
    wait_for(lambda: not alive(pid))
    [failed] = outcomes(root)
    assert failed["payload"]["failure"] == "cancelled"
    assert len(settle(root, 2, timeout=1)) == 1  # later dispatches add nothing
    again = cli(root, "mesh-tasks", "cancel", "t-long")
    assert again.code == 2
    assert "has ended" in again.err
    assert len(again.err.strip().splitlines()) == 1


def test_cancel_of_a_queued_task_never_starts_it(node: tuple[Path, Path, Path]) -> None:
    root, _, log = node
    enqueue(root, "t-first", log=str(log), sleep=60)
    enqueue(root, "t-second", log=str(log))
    ok(cli(root, "mesh-dispatch"))
    listed = {
        t["task_id"]: t for t in ok(cli(root, "mesh-tasks", "list", "--json")).json()["tasks"]
    }
    assert listed["t-second"]["state"] == "queued"  # max_parallel 1: waits
    ok(cli(root, "mesh-tasks", "cancel", listed["t-second"]["event_id"][:20]))
    ok(cli(root, "mesh-tasks", "cancel", "t-first"))
    settle(root, 2, timeout=1)
    time.sleep(0.3)
    assert [r[1] for r in runs(log) if r[0] == "start"] == ["t-first"]
    assert sorted(e["payload"]["failure"] for e in outcomes(root)) == ["cancelled", "cancelled"]


def test_no_lane_that_can_run_it_is_dispatch_blocked(tmp_path: Path) -> None:
    root = tmp_path / "node"
    Mesh.init(root, node_id="node-a", capabilities=["gpu"])
    enqueue(root, "t-nowhere")
    ok(cli(root, "mesh-dispatch"))
    [blocked] = of_type(root, "scheduling.task.dispatch.blocked")
    [selected] = of_type(root, "routing.route.selected")
    assert blocked["causation_id"] == selected["event_id"]
    assert blocked["payload"]["task_id"] == "t-nowhere"
    assert of_type(root, "scheduling.task.dispatch.attempted") == []


def test_large_payload_goes_in_the_file_only(node: tuple[Path, Path, Path]) -> None:
    root, _, log = node
    enqueue(root, "t-big", log=str(log), blob="x" * 100_000)
    [done] = settle(root, 1)
    assert "env payload: False" in done["payload"]["output_tail"]
    assert done["event_type"] == "task.completed"


# --- at most once: kill -9 at each step, racing dispatchers -------------------------------


def crash_dispatch(root: Path, point: str) -> None:
    assert cli(root, "mesh-dispatch", env={CRASH_ENV: point}).code == -signal.SIGKILL


def test_kill_between_attempted_and_start(node: tuple[Path, Path, Path]) -> None:
    root, _, log = node
    enqueue(root, "t1", log=str(log))
    crash_dispatch(root, "after_attempted")
    assert len(of_type(root, "scheduling.task.dispatch.attempted")) == 1
    assert runs(log) == []
    [done] = settle(root, 1)
    assert done["event_type"] == "task.completed"
    assert [r[0] for r in runs(log)] == ["start", "end"]
    assert len(of_type(root, "scheduling.task.dispatch.attempted")) == 1


def test_kill_after_starting_was_recorded_but_before_the_spawn(
    node: tuple[Path, Path, Path],
) -> None:
    root, _, log = node
    enqueue(root, "t1", log=str(log))
    crash_dispatch(root, "before_spawn")
    [failed] = settle(root, 1)
    assert failed["payload"]["failure"] == "interrupted"
    time.sleep(0.5)
    assert runs(log) == []  # never started, and never will be
    assert len(settle(root, 2, timeout=1)) == 1
    # a runner spawned by a dispatcher killed mid-start, arriving late, finds the claim void
    [folder] = (root / "state/event_mesh/tasks/ended").iterdir()
    late = subprocess.run([sys.executable, taskrunner.__file__, str(folder)], timeout=30)
    assert late.returncode == taskrunner.VOIDED
    assert runs(log) == []


def test_kill_during_the_run(node: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, _, log = node
    gate = tmp_path / "gate"
    enqueue(root, "t1", log=str(log), gate=str(gate))
    crash_dispatch(root, "after_start")  # the dispatcher dies; the task goes on
    wait_for(lambda: len(runs(log)) == 1)
    ok(cli(root, "mesh-dispatch"))  # still running: nothing to record, nothing to start
    assert outcomes(root) == []
    gate.touch()
    [done] = settle(root, 1)
    assert done["event_type"] == "task.completed"
    assert [r[0] for r in runs(log)] == ["start", "end"]


def test_kill_after_exit_before_the_outcome(node: tuple[Path, Path, Path]) -> None:
    root, _, log = node
    enqueue(root, "t1", log=str(log))
    ok(cli(root, "mesh-dispatch"))
    wait_for(
        lambda: ok(cli(root, "mesh-tasks", "show", "t1", "--json")).json()["state"] == "finished"
    )
    crash_dispatch(root, "before_outcome")
    assert outcomes(root) == []
    [done] = settle(root, 1)
    assert done["event_type"] == "task.completed"
    assert [r[0] for r in runs(log)] == ["start", "end"]


def test_runner_that_vanished_is_interrupted(node: tuple[Path, Path, Path], tmp_path: Path) -> None:
    root, _, log = node
    pidfile = tmp_path / "pid"
    enqueue(root, "t1", log=str(log), sleep=60, pidfile=str(pidfile))
    ok(cli(root, "mesh-dispatch"))
    wait_for(lambda: pidfile.exists() and pidfile.read_text() != "")
    folder = next((root / "state/event_mesh/tasks").glob("evt_*"))
    runner = json.loads((folder / "runner.json").read_text())["runner_pid"]
    os.kill(runner, signal.SIGKILL)
    wait_for(lambda: not alive(runner))
    [failed] = settle(root, 1)
    assert failed["payload"]["failure"] == "interrupted"
    wait_for(lambda: not alive(int(pidfile.read_text())))  # its command went with it


def test_three_racing_dispatchers_never_start_a_task_twice(tmp_path: Path) -> None:
    root = tmp_path / "node"
    Mesh.init(root, node_id="node-a", capabilities=["gpu"])
    job = tmp_path / "job.py"
    job.write_text(JOB)
    configure(root, lane_toml(job, max_parallel=2))
    log = tmp_path / "runs.log"
    names = [f"t{i}" for i in range(6)]
    for name in names:
        enqueue(root, name, log=str(log), sleep=0.2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORXAQ_AUTONOMY")}
    deadline = time.monotonic() + 60
    while len(outcomes(root)) < len(names) and time.monotonic() < deadline:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "orxaq_autonomy", "--root", str(root), "mesh-dispatch"]
                + (["--wait"] if i else []),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(3)
        ]
        assert [p.wait(60) for p in procs] == [0, 0, 0]
    starts = [r[1] for r in runs(log) if r[0] == "start"]
    assert sorted(starts) == names
    assert sorted(e["payload"]["task_id"] for e in outcomes(root)) == names
    assert {e["event_type"] for e in outcomes(root)} == {"task.completed"}


def test_max_parallel_runs_in_order(node: tuple[Path, Path, Path]) -> None:
    root, _, log = node
    for name in ("t1", "t2", "t3"):
        enqueue(root, name, log=str(log), sleep=0.2)
    settle(root, 3)
    assert [r[:2] for r in runs(log)] == [
        ["start", "t1"],
        ["end", "t1"],
        ["start", "t2"],
        ["end", "t2"],
        ["start", "t3"],
        ["end", "t3"],
    ]


def test_max_parallel_two_overlaps_at_most_two(tmp_path: Path) -> None:
    root = tmp_path / "node"
    Mesh.init(root, node_id="node-a", capabilities=["gpu"])
    job = tmp_path / "job.py"
    job.write_text(JOB)
    configure(root, lane_toml(job, max_parallel=2))
    log = tmp_path / "runs.log"
    names = ["t1", "t2", "t3", "t4"]
    gate = tmp_path / "gate"
    for name in names:
        enqueue(root, name, log=str(log), sleep=0.1, gate=str(gate))
    ok(cli(root, "mesh-dispatch"))  # the first two run until the gate opens
    tasks = ok(cli(root, "mesh-tasks", "--json")).json()["tasks"]
    assert [t["state"] for t in tasks] == ["running", "running", "queued", "queued"]
    status = ok(cli(root, "mesh-status", "--json")).json()
    assert status["tasks"]["gpu-1"] == {"running": 2, "queued": 2, "completed": 0, "failed": 0}
    gate.touch()
    settle(root, 4)
    running, peak = 0, 0
    for what, *_ in runs(log):
        running += 1 if what == "start" else -1
        peak = max(peak, running)
    assert peak == 2
    assert [r[1] for r in runs(log) if r[0] == "start"] == names


# --- reading: list and show write nothing; status and metrics count ---------------------------


def test_list_and_show_are_read_only(node: tuple[Path, Path, Path]) -> None:
    root, _, log = node
    enqueue(root, "t1", log=str(log), exit=1)
    ok(cli(root, "mesh-dispatch"))
    with Mesh.open(root) as mesh:
        wait_for(lambda: mesh.task("t1")["state"] == "finished")
    before = snapshot(root)
    [listed] = ok(cli(root, "mesh-tasks", "list", "--json")).json()["tasks"]
    shown = ok(cli(root, "mesh-tasks", "show", "t1", "--json")).json()
    human = ok(cli(root, "mesh-tasks", "show", "t1")).out
    assert snapshot(root) == before
    assert listed["state"] == shown["state"] == "finished"  # finished, not yet recorded
    assert shown["result"] == "failed"
    assert "t1" in human
    assert outcomes(root) == []
    assert cli(root, "mesh-tasks", "show", "nope").code == 2
    assert cli(root, "mesh-tasks", "frobnicate").code == 2
    assert cli(root, "mesh-tasks", "cancel").code == 2


def test_status_and_metrics_count_tasks_per_lane(node: tuple[Path, Path, Path]) -> None:
    root, _, log = node
    enqueue(root, "t-ok", log=str(log))
    enqueue(root, "t-bad", log=str(log), exit=2)
    settle(root, 2)
    status = ok(cli(root, "mesh-status", "--json")).json()
    assert status["tasks"]["gpu-1"] == {"running": 0, "queued": 0, "completed": 1, "failed": 1}
    assert (
        "tasks       lane gpu-1: 0 running, 0 queued, 1 completed, 1 failed"
        in ok(cli(root, "mesh-status")).out
    )
    registry = CollectorRegistry()
    with Mesh.open(root) as mesh:
        registry.register(NodeCollector(mesh))
        text = generate_latest(registry).decode()
    assert 'orxaq_tasks{lane="gpu-1",state="completed"} 1.0' in text
    assert 'orxaq_tasks{lane="gpu-1",state="failed"} 1.0' in text


def test_lane_needs_something_to_run(tmp_path: Path) -> None:
    root = tmp_path / "node"
    Mesh.init(root, node_id="node-a")
    configure(root, '\n[[lanes]]\nid = "idle"\n')
    result = cli(root, "mesh-dispatch")
    assert result.code == 2
    assert "lanes.0" in result.err and "run" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert "Traceback" not in result.err


def test_outcome_events_are_valid_envelopes(node: tuple[Path, Path, Path]) -> None:
    root, _, log = node
    enqueue(root, "t1", log=str(log))
    settle(root, 1)
    ok(cli(root, "mesh-export"))
    outbox = root / "state/github_coordination/event_mesh/outbox/node-a"
    files = {p.stem: orjson.loads(p.read_bytes()) for p in outbox.rglob("*.json")}
    [done] = outcomes(root)
    assert files[done["event_id"]]["event_type"] == "task.completed"


# --- lane choice, as a property ---------------------------------------------------------------

CAPS = st.lists(st.sampled_from(["gpu", "cpu", "big", "fast"]), max_size=3, unique=True)


@settings(max_examples=200, deadline=None)
@given(
    lanes=st.lists(st.tuples(st.integers(-3, 3), st.booleans(), CAPS, st.booleans()), max_size=5),
    wanted=CAPS,
    named=st.one_of(st.none(), st.integers(0, 6)),
)
def test_lane_choice_matches_the_rule(
    lanes: list[tuple[int, bool, list[str], bool]], wanted: list[str], named: int | None
) -> None:
    config = Config.model_validate(
        {
            "lanes": [
                {
                    "id": f"l{i}",
                    "rank": rank,
                    "enabled": enabled,
                    "capabilities": caps,
                    **({"run": "true"} if runs else {"start": "true", "stop": "true"}),
                }
                for i, (rank, enabled, caps, runs) in enumerate(lanes)
            ]
        }
    )
    selection = {} if named is None else {"lane_id": f"l{named}"}
    chosen = choose_task_lane(config, selection, wanted)
    by_id = {f"l{i}": lane for i, lane in enumerate(lanes)}
    if named is not None and f"l{named}" in by_id and by_id[f"l{named}"][3]:
        assert chosen is not None and chosen.id == f"l{named}"  # the selection's lane wins
        return
    fit = sorted(
        (rank, lane_id)
        for lane_id, (rank, enabled, caps, runs) in by_id.items()
        if enabled and runs and set(wanted) <= set(caps)
    )
    assert (chosen.id if chosen else None) == (fit[0][1] if fit else None)


def test_mesh_serve_starts_tasks_and_records_their_outcomes(
    node: tuple[Path, Path, Path],
) -> None:
    root, _, log = node
    body = {
        "topic": "scheduling",
        "event_type": "task.enqueued",
        "payload": {"task_id": "t-http", "required_capabilities": ["gpu"], "log": str(log)},
    }
    with serving(root, "--dispatch-every", "0.1") as server, server.client() as http:
        assert http.post("/events", json=body).status_code in (200, 201, 202)
        wait_for(lambda: len(outcomes(root)) == 1)
        metrics = http.get("/metrics").text
    [done] = outcomes(root)
    assert done["event_type"] == "task.completed"
    assert [r[:2] for r in runs(log)] == [["start", "t-http"], ["end", "t-http"]]
    assert 'orxaq_tasks{lane="gpu-1",state="completed"} 1.0' in metrics
