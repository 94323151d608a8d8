"""Tasks: `routing.route.selected` becomes work that runs on the node it was routed to.

    routing.route.selected (scope target) -> scheduling.task.dispatch.attempted
                                          -> scheduling.task.completed | task.failed
                                          |  scheduling.task.dispatch.blocked (no lane)
    routing.route.blocked no_capable_node -> routing.route.requested again, once a
                                             capable node's manifest has arrived

The handler only notes the task (a folder under `state/event_mesh/tasks/`); the work is
done by `advance()`, which every dispatcher run calls before and after handling events
(so `mesh-dispatch`, `mesh-sync` and `mesh-serve` all move tasks on). Agent work runs for
hours, so nothing waits for it: a task is started detached (taskrunner.py) and a later
`advance()` records its outcome.

At most once per route.selected, across crashes and concurrent dispatchers:

- `task.dispatch.attempted` is appended (fsynced) before the task folder says `queued`,
  and only a `queued` task is started;
- the folder says `starting` (durably) before the runner is spawned; a `starting` or
  `running` task is never spawned again, only judged;
- the runner and a judging dispatcher race for one O_EXCL file (`claim`): a dispatcher
  that finds no live runner (its flock on `runner.lock` is free) and no result voids the
  claim, so a runner spawned by a dispatcher killed mid-start can never start late;
- outcomes carry one idempotency key per route.selected, so recording twice (a crash after
  the append) appends once, and a cancel racing a completion leaves one outcome.

Ended tasks move to `tasks/ended/<kind>+<lane>+<event_id>/`, so that counting them reads
folder names only and `advance()` looks at live tasks only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..config import Config, Lane
from ..envelope import Draft, Envelope, check_fits, now_timestamp, payload_problem, routing_key
from ..errors import BadInput
from ..handlers import Context, FollowUp, handler
from ..store.fsutil import FileLock, atomic_write_bytes, atomic_write_json, read_json
from ..store.paths import Layout
from . import taskrunner

if TYPE_CHECKING:
    from ..store.node import Node

DISPATCH_KEY = "task-dispatch:"  # attempted or dispatch.blocked
OUTCOME_KEY = "task-outcome:"  # completed or failed
REROUTE_KEY = "reroute:"
OUTPUT_TAIL_CHARS = 2000
ENV_PAYLOAD_MAX = 64 * 1024  # larger payloads go in the file only
CLAIM_WAIT_SECONDS = 30.0
CANCEL_WAIT_SECONDS = 10.0
LIVE = ("new", "queued", "starting", "running")
# Fault injection for the crash tests: the dispatcher SIGKILLs itself at this point.
CRASH_ENV = "ORXAQ_AUTONOMY_CRASH_AT"


def tasks_dir(layout: Layout) -> Path:
    return layout.state_dir / "tasks"


def ended_dir(layout: Layout) -> Path:
    return tasks_dir(layout) / "ended"


def blocked_file(layout: Layout) -> Path:
    return layout.state_dir / "blocked_routes.json"


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _read(path: Path) -> dict[str, Any]:
    return dict(read_json(path))


# --- the handlers: note the work, never do it here --------------------------------------


@handler("routing.route.selected", scope="target", name="task_runner")
def task_runner(event: Envelope, ctx: Context) -> FollowUp | None:
    task_id = event["payload"].get("task_id")
    if not isinstance(task_id, str) or not task_id or event["payload"].get("selected") is False:
        return None  # a route with no task: nothing to run
    if not any(lane.enabled and lane.run is not None for lane in ctx.config.lanes):
        # the usual node, with no lane that runs tasks: decided here, in the batch
        reason = {"task_id": task_id, "reason": "no_lane_with_run_command"}
        key = DISPATCH_KEY + event["event_id"]
        return FollowUp("scheduling", "task.dispatch.blocked", reason, key=key)
    folder = tasks_dir(ctx.layout) / event["event_id"]
    if folder.exists() or _ended(ctx.layout, event["event_id"]) is not None:
        return None  # a re-handled cause (a crash before the cursor moved): noted already
    folder.mkdir(parents=True, exist_ok=True)
    # time_ns orders the queue: dispatchers of one node never overlap (dispatch.lock)
    atomic_write_json(
        folder / "task.json",
        {
            "event_id": event["event_id"],
            "task_id": task_id,
            "state": "new",
            "order": time.time_ns(),
            "noted_at": now_timestamp(),
            **({"tenant": event["tenant"]} if "tenant" in event else {}),
        },
    )
    return None


@handler("routing.route.blocked", name="route_watch")
def route_watch(event: Envelope, ctx: Context) -> None:
    """Remember a route blocked for want of a capable node; advance() asks again for it
    once a manifest with the capabilities arrives."""
    if event["payload"].get("reason") != "no_capable_node":
        return
    blocked = _blocked(ctx.layout)
    if event["event_id"] in blocked.get("routes", {}) or event["event_id"] in blocked.get(
        "done", []
    ):
        return
    blocked.setdefault("routes", {})[event["event_id"]] = {"since": now_timestamp()}
    atomic_write_json(blocked_file(ctx.layout), blocked)


def _blocked(layout: Layout) -> dict[str, Any]:
    try:
        return _read(blocked_file(layout))
    except FileNotFoundError:
        return {"routes": {}, "done": []}


# --- advance: everything that touches processes ------------------------------------------


def advance(node: Node, config: Config) -> dict[str, int]:
    """Record the outcomes of finished tasks, ask again for blocked routes that can now be
    routed, decide the lane of noted tasks and start queued ones up to each lane's
    `max_parallel`. Returns what it did. Called by the dispatcher under its lock."""
    done = {"rerouted": _reroute(node), "recorded": 0, "started": 0, "blocked": 0}
    base = tasks_dir(node.layout)
    if not base.is_dir():
        return done
    with FileLock(node.layout.locks_dir / "tasks.lock", timeout=3600):
        live = _live(node.layout)
        for folder, task in live:
            with _guarded(folder):
                if task["state"] == "new":
                    if _decide(node, config, folder, task):
                        done["blocked"] += 1
                elif task["state"] in ("starting", "running"):
                    result = _judge(folder, task)
                    if result is not None:
                        _crash_point("before_outcome")
                        _record(node, folder, task, result)
                        done["recorded"] += 1
        busy: dict[str, int] = {}
        for _, task in live:
            if task["state"] in ("starting", "running"):
                busy[task["lane"]] = busy.get(task["lane"], 0) + 1
        for folder, task in live:
            if task["state"] != "queued":
                continue
            lane = config.lane(task["lane"])
            limit = lane.max_parallel if lane is not None else 1
            if busy.get(task["lane"], 0) >= limit:
                continue  # waits, in order, behind the running ones
            if lane is None or lane.run is None:  # the config changed since it was queued
                gone = {"failure": "interrupted", "detail": "the lane left the config; not started"}
                taskrunner.claim(folder, "void")
                _record(node, folder, task, gone)
                continue
            with _guarded(folder):
                _start(node, folder, task, lane)
                done["started"] += 1
            busy[task["lane"]] = busy.get(task["lane"], 0) + 1
    return done


@contextlib.contextmanager
def _guarded(folder: Path) -> Iterator[None]:
    """One broken task (an unreadable file, a full disk) must not stop the dispatch of
    everything else: it is reported and left as it is, for the next run to try again."""
    try:
        yield
    except (OSError, ValueError, KeyError, BadInput) as exc:
        sys.stderr.write(f"orxaq-autonomy: task {folder.name}: {type(exc).__name__}: {exc}\n")


def _live(layout: Layout) -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for folder in tasks_dir(layout).glob("evt_*"):
        try:
            found.append((folder, _read(folder / "task.json")))
        except FileNotFoundError:
            # the handler died between mkdir and the write: the cursor did not move past
            # its event, so it notes the task again
            shutil.rmtree(folder, ignore_errors=True)
        except ValueError as exc:
            sys.stderr.write(f"orxaq-autonomy: task {folder.name}: unreadable task.json: {exc}\n")
    return sorted(found, key=lambda item: (item[1]["order"], item[1]["event_id"]))


def _route_event(node: Node, event_id: str) -> Envelope:
    event = node.log.get(event_id)
    if event is None:
        raise BadInput(f"route event {event_id} is not in the log")
    return event


def _origin(node: Node, route: Envelope) -> tuple[dict[str, Any], list[str]]:
    """The payload of the task.enqueued the route descends from (or the route request's),
    and the required capabilities of the request."""
    request = node.log.get(route.get("causation_id", "")) if "causation_id" in route else None
    wanted: list[str] = []
    if request is not None:
        caps = request["payload"].get("required_capabilities")
        wanted = [c for c in caps if isinstance(c, str)] if isinstance(caps, list) else []
    cause = request
    for _ in range(16):  # up the chain: enqueued -> requested [-> blocked -> requested ...]
        if cause is None:
            break
        if routing_key(cause) == "scheduling.task.enqueued":
            return dict(cause["payload"]), wanted
        parent = cause.get("causation_id")
        cause = node.log.get(parent) if isinstance(parent, str) else None
    fallback = dict(request["payload"]) if request is not None else {}
    fallback.setdefault("task_id", route["payload"].get("task_id"))
    return fallback, wanted


def choose_task_lane(config: Config, selection: dict[str, Any], wanted: list[str]) -> Lane | None:
    """The selection's lane when this node has it (and it can run tasks), else the enabled
    lane of lowest rank that can run tasks and covers the required capabilities."""
    named = selection.get("lane_id")
    if isinstance(named, str):
        lane = config.lane(named)
        if lane is not None and lane.run is not None:
            return lane
    fit = [
        lane
        for lane in config.lanes
        if lane.enabled and lane.run is not None and set(wanted) <= set(lane.capabilities)
    ]
    return min(fit, key=lambda lane: (lane.rank, lane.id)) if fit else None


def _draft(route: Envelope, event_type: str, payload: dict[str, Any], key: str) -> Draft:
    draft = Draft(
        topic="scheduling",
        event_type=event_type,
        payload=payload,
        source="handler:task_runner",
        timestamp=now_timestamp(),
        causation_id=route["event_id"],
        correlation_id=route.get("correlation_id", route["event_id"]),
        partition_key=route.get("partition_key"),
        tenant=route.get("tenant"),
        idempotency_key=key,
    )
    check_fits(draft)
    return draft


def _decide(node: Node, config: Config, folder: Path, task: dict[str, Any]) -> bool:
    """Pick the lane of a noted task and record attempted (or dispatch.blocked)."""
    route = _route_event(node, task["event_id"])
    payload, wanted = _origin(node, route)
    selection = route["payload"].get("selection")
    lane = choose_task_lane(config, selection if isinstance(selection, dict) else {}, wanted)
    key = DISPATCH_KEY + task["event_id"]
    if lane is None:
        reason = "no_lane_with_run_command"
        node.publish_drafts(
            [
                _draft(
                    route,
                    "task.dispatch.blocked",
                    {"task_id": task["task_id"], "reason": reason},
                    key,
                )
            ],
            keep_envelopes=False,
        )
        task.update(state="blocked", lane="", reason=reason)
        _finish(node.layout, folder, task, "blocked")
        return True
    attempted = {"task_id": task["task_id"], "lane": lane.id, "attempt": 1}
    # durable in the log before the folder says queued, and only queued tasks start
    node.publish_drafts(
        [_draft(route, "task.dispatch.attempted", attempted, key)], keep_envelopes=False
    )
    atomic_write_bytes(folder / "payload.json", orjson.dumps(payload))
    task.update(state="queued", lane=lane.id, queued_at=now_timestamp())
    atomic_write_json(folder / "task.json", task)
    _crash_point("after_attempted")
    return False


def _start(node: Node, folder: Path, task: dict[str, Any], lane: Lane) -> None:
    assert lane.run is not None
    payload_file = folder / "payload.json"
    env = {
        "ORXAQ_TASK_ID": task["task_id"],
        "ORXAQ_EVENT_ID": task["event_id"],
        "ORXAQ_NODE_ID": node.node_id,
        "ORXAQ_LANE_ID": lane.id,
        "ORXAQ_TASK_PAYLOAD_FILE": str(payload_file),
    }
    if payload_file.stat().st_size < ENV_PAYLOAD_MAX:
        env["ORXAQ_TASK_PAYLOAD"] = payload_file.read_text()
    spec = {"argv": lane.run, "env": env, "timeout": lane.timeout, "cwd": str(node.layout.root)}
    atomic_write_json(folder / "spec.json", spec)
    task.update(state="starting", started_at=now_timestamp())
    atomic_write_json(folder / "task.json", task)  # durable before the spawn: never twice
    _crash_point("before_spawn")
    runner = subprocess.Popen(
        [sys.executable, taskrunner.__file__, str(folder)],
        env={k: v for k, v in os.environ.items() if k != CRASH_ENV},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # survives the dispatcher, a Ctrl-C and a kill -9 of it
        close_fds=True,
    )
    # The runner forks and its parent exits once the claim is made: waiting for that keeps
    # a following dispatcher from judging the task before its runner holds it. A slower
    # start is sorted out by the next judge, through the claim.
    with contextlib.suppress(subprocess.TimeoutExpired):
        runner.wait(timeout=CLAIM_WAIT_SECONDS)
    task["state"] = "running"
    atomic_write_json(folder / "task.json", task)
    _crash_point("after_start")


def _runner_alive(folder: Path, hold: bool = False) -> tuple[bool, int | None]:
    """Whether a runner holds the task's lock; with `hold`, a free lock is kept (the fd is
    returned) so that a runner spawned late waits until the judge has voided the claim.
    Only a judge (`hold`) creates the lock file: looking writes nothing."""
    try:
        fd = os.open(folder / "runner.lock", os.O_RDWR | (os.O_CREAT if hold else 0), 0o644)
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return True, None
    if hold:
        return False, fd
    os.close(fd)
    return False, None


def _judge(folder: Path, task: dict[str, Any]) -> dict[str, Any] | None:
    """The result of a started task, or None while its runner lives."""
    alive, fd = _runner_alive(folder, hold=True)
    if alive:
        return None
    try:
        if (folder / "result.json").exists():
            return _read(folder / "result.json")
        if taskrunner.claim(folder, "void"):
            return {"failure": "interrupted", "detail": "the runner never started; not started"}
        _kill_group(folder)
        return {"failure": "interrupted", "detail": "the runner vanished while the task ran"}
    finally:
        if fd is not None:
            os.close(fd)


def _kill_group(folder: Path) -> None:
    """Kill the command's process group, if it still holds this task's command."""
    try:
        pgid = int(_read(folder / "runner.json")["pgid"])
    except (FileNotFoundError, KeyError, ValueError):
        return
    try:  # a reused pgid would not carry this task's event id in its environment
        env = Path(f"/proc/{pgid}/environ").read_bytes()
    except OSError:
        return
    if f"ORXAQ_EVENT_ID={folder.name}".encode() in env.split(b"\0"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def _tail(folder: Path) -> str:
    try:
        with open(folder / "output.log", "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - OUTPUT_TAIL_CHARS * 4))
            text = fh.read().decode("utf-8", errors="replace")[-OUTPUT_TAIL_CHARS:]
    except FileNotFoundError:
        return ""
    if payload_problem({"output_tail": text}):
        return "[output withheld: it looked like a credential]"
    return text


def _record(node: Node, folder: Path, task: dict[str, Any], result: dict[str, Any]) -> None:
    route = _route_event(node, task["event_id"])
    payload: dict[str, Any] = {"task_id": task["task_id"], "lane": task["lane"]}
    failure = result.get("failure")
    if failure is not None:
        payload["failure"] = failure
    if "exit_code" in result:
        payload["exit_code"] = result["exit_code"]
    payload["duration_seconds"] = result.get("duration_seconds", 0.0)
    payload["output_tail"] = _tail(folder)
    if "detail" in result:
        payload["detail"] = result["detail"]
    if "timeout_seconds" in result:
        payload["timeout_seconds"] = result["timeout_seconds"]
    kind = "task.failed" if failure is not None else "task.completed"
    node.publish_drafts(
        [_draft(route, kind, payload, OUTCOME_KEY + task["event_id"])], keep_envelopes=False
    )
    task.update(state="failed" if failure else "completed", ended_at=now_timestamp())
    task.update(
        {k: payload[k] for k in ("failure", "exit_code", "duration_seconds") if k in payload}
    )
    _finish(node.layout, folder, task, task["state"])


def _finish(layout: Layout, folder: Path, task: dict[str, Any], kind: str) -> None:
    atomic_write_json(folder / "task.json", task)
    target = ended_dir(layout) / f"{kind}+{task.get('lane', '')}+{task['event_id']}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, target)


def _ended(layout: Layout, event_id: str) -> Path | None:
    found = list(ended_dir(layout).glob(f"*+{event_id}")) if ended_dir(layout).is_dir() else []
    return found[0] if found else None


# --- blocked routes ---------------------------------------------------------------------


def _reroute(node: Node) -> int:
    """A new route.requested for each blocked route that a manifest now covers."""
    blocked = _blocked(node.layout)
    if not blocked.get("routes"):
        return 0
    manifests = node.manifests()
    sent = 0
    for event_id in sorted(blocked["routes"]):
        event = node.log.get(event_id)
        request = node.log.get(event.get("causation_id", "")) if event else None
        if event is None or request is None:
            continue
        caps = request["payload"].get("required_capabilities")
        wanted = {c for c in caps if isinstance(c, str)} if isinstance(caps, list) else set()
        capable = sorted(
            node_id
            for node_id, manifest in manifests.items()
            if wanted <= set(manifest.get("capabilities", []))
        )
        if not capable:
            continue
        key = f"{REROUTE_KEY}{event_id}:{','.join(capable)}"
        draft = Draft(
            topic="routing",
            event_type="route.requested",
            payload=dict(request["payload"]),
            source="handler:route_watch",
            timestamp=now_timestamp(),
            causation_id=event_id,
            correlation_id=event.get("correlation_id", event_id),
            partition_key=event.get("partition_key"),
            tenant=event.get("tenant"),
            idempotency_key=key,
        )
        node.publish_drafts([draft], keep_envelopes=False)
        del blocked["routes"][event_id]
        blocked.setdefault("done", []).append(event_id)  # at most once per blocked route
        atomic_write_json(blocked_file(node.layout), blocked)
        sent += 1
    return sent


# --- reading and cancelling (mesh-tasks) -------------------------------------------------


def _all(layout: Layout) -> Iterator[tuple[Path, dict[str, Any]]]:
    base = tasks_dir(layout)
    for folder in sorted(base.glob("evt_*")) if base.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            yield folder, _read(folder / "task.json")
    ended = ended_dir(layout)
    for folder in sorted(ended.iterdir()) if ended.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            yield folder, _read(folder / "task.json")


def describe(folder: Path, task: dict[str, Any]) -> dict[str, Any]:
    """A task as mesh-tasks shows it; a finished but unrecorded one shows its result
    (state `finished`) without anything being written."""
    out = {k: task[k] for k in sorted(task) if k != "order"}
    if task["state"] in ("starting", "running"):
        if (folder / "result.json").exists():
            result = _read(folder / "result.json")
            out["state"] = "finished"
            out["result"] = "failed" if "failure" in result else "completed"
            out.update({k: v for k, v in result.items() if k != "detail"})
        elif not _runner_alive(folder)[0] and task["state"] == "running":
            out["state"] = "vanished"  # recorded as failed/interrupted by the next dispatch
    if (folder / "output.log").exists():
        out["output_tail"] = _tail(folder)
    return out


def list_tasks(layout: Layout) -> list[dict[str, Any]]:
    tasks = [describe(folder, task) for folder, task in _all(layout)]
    return sorted(tasks, key=lambda t: (t.get("noted_at", ""), t["event_id"]))


def find_task(layout: Layout, ref: str) -> tuple[Path, dict[str, Any]]:
    """A task by task id, route.selected event id, or unique prefix of either."""
    if not ref:
        raise BadInput("need a task id or a route.selected event id")
    found = [
        (folder, task)
        for folder, task in _all(layout)
        if task["task_id"] == ref or task["event_id"].startswith(ref)
    ]
    exact = [item for item in found if item[1]["task_id"] == ref or item[1]["event_id"] == ref]
    found = exact or found
    if not found:
        raise BadInput(f"no task {ref!r} on this node")
    if len(found) > 1:
        ids = ", ".join(task["event_id"][:16] for _, task in found[:3])
        raise BadInput(f"task {ref!r} is ambiguous ({ids}): give the route event id")
    return found[0]


def cancel(node: Node, ref: str) -> dict[str, Any]:
    """Stop a task (killing its process group) and record it failed / cancelled."""
    folder, task = find_task(node.layout, ref)
    if task["state"] not in LIVE:
        raise BadInput(f"task {task['task_id']} has ended ({task['state']}): nothing to cancel")
    with FileLock(node.layout.locks_dir / "tasks.lock", timeout=3600):
        try:
            task = _read(folder / "task.json")  # as it is now, under the lock
        except FileNotFoundError:
            raise BadInput(f"task {task['task_id']} ended meanwhile: nothing to cancel") from None
        if task["state"] == "new":
            task["lane"] = ""
        result: dict[str, Any] = {"failure": "cancelled", "duration_seconds": 0.0}
        atomic_write_bytes(folder / "cancel", b"cancelled\n")
        if task["state"] in ("starting", "running"):
            _, fd = _runner_alive(folder, hold=True)
            if fd is not None:
                started = not taskrunner.claim(folder, "void")  # False: it never will start
                os.close(fd)
                if started:
                    _kill_group(folder)
            else:
                _kill_group(folder)
                deadline = time.monotonic() + CANCEL_WAIT_SECONDS
                while _runner_alive(folder)[0] and time.monotonic() < deadline:
                    time.sleep(0.02)
            if (folder / "result.json").exists():
                ran = _read(folder / "result.json")
                result["duration_seconds"] = ran.get("duration_seconds", 0.0)
                if "exit_code" in ran:
                    result["exit_code"] = ran["exit_code"]
        else:
            taskrunner.claim(folder, "void")
        _record(node, folder, task, result)
    return {
        "task_id": task["task_id"],
        "event_id": task["event_id"],
        "state": "failed",
        "failure": "cancelled",
    }


def task_counts(layout: Layout) -> dict[str, dict[str, int]]:
    """Per lane: running, queued, completed and failed tasks (reads only names and the live
    tasks' small files)."""
    counts: dict[str, dict[str, int]] = {}

    def bump(lane: str, what: str) -> None:
        per = counts.setdefault(
            lane or "-", {"running": 0, "queued": 0, "completed": 0, "failed": 0}
        )
        per[what] += 1

    base = tasks_dir(layout)
    for folder in base.glob("evt_*") if base.is_dir() else []:
        try:
            task = _read(folder / "task.json")
        except FileNotFoundError:
            continue
        if task["state"] in ("new", "queued"):
            bump(task.get("lane", ""), "queued")
        elif (folder / "result.json").exists():
            failed = "failure" in _read(folder / "result.json")
            bump(task["lane"], "failed" if failed else "completed")
        else:
            bump(task["lane"], "running")
    ended = ended_dir(layout)
    for folder in ended.iterdir() if ended.is_dir() else []:
        kind, _, rest = folder.name.partition("+")
        lane = rest.rpartition("+")[0]
        if kind in ("completed", "failed"):
            bump(lane, kind)
    return counts
