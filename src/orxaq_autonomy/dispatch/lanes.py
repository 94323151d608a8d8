"""Lanes: the units of work a node runs, and the actuator that starts and stops them.

The config declares lanes (id, rank, enabled, capabilities, start and stop commands,
timeout); `state/event_mesh/lanes.json` keeps each lane's state; the manifest lists both.
The actuator handles `scaling.command.requested` on the target node (the author when there
is no target): it picks a lane, runs its command once, and records the outcome as
`lanes.lane.started`, `lanes.lane.stopped`, `scaling.command.noop` or
`scaling.command.failed` (exit code and output tail).

Running a command is an outside effect, so it is guarded twice: the outcome's key is
looked up first (already recorded: nothing to do), and an in-flight marker is made durable
before the command starts. A dispatcher that crashed mid-command finds the marker and
records the outcome from the lane state if the command finished, else
`scaling.command.failed` with reason `interrupted`, never running the command again.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

from ..config import Config, Lane
from ..envelope import Envelope, now_timestamp, payload_problem
from ..handlers import Context, FollowUp, Reject, handler
from ..store.fsutil import atomic_write_json, read_json
from ..store.manifest import update_manifest
from ..store.paths import Layout

OUTPUT_TAIL_CHARS = 2000


def lanes_file(layout: Layout) -> Any:
    return layout.state_dir / "lanes.json"


def load_states(layout: Layout) -> dict[str, dict[str, Any]]:
    try:
        data = read_json(lanes_file(layout))
    except FileNotFoundError:
        return {}
    return dict(data.get("lanes", {}))


def save_states(layout: Layout, states: dict[str, dict[str, Any]]) -> None:
    atomic_write_json(lanes_file(layout), {"lanes": states})


def manifest_lanes(config: Config, states: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": lane.id,
            "rank": lane.rank,
            "enabled": lane.enabled,
            "capabilities": list(lane.capabilities),
            "state": states.get(lane.id, {}).get("state", "stopped"),
        }
        for lane in sorted(config.lanes, key=lambda lane: (lane.rank, lane.id))
    ]


def publish_lanes(layout: Layout, node_id: str, config: Config) -> bool:
    """Bring the manifest's lane list in line with the config and the lane states."""
    return update_manifest(layout, node_id, lanes=manifest_lanes(config, load_states(layout)))


def choose_lane(
    config: Config, states: dict[str, dict[str, Any]], action: str, named: str | None
) -> tuple[Lane | None, str]:
    """The lane to act on, or None and the reason for a no-op."""

    def state(lane: Lane) -> str:
        return str(states.get(lane.id, {}).get("state", "stopped"))

    wanted = "running" if action == "scale_up" else "stopped"
    if named is not None:
        lane = config.lane(named)
        if lane is None:
            return None, "unknown_lane"
        if state(lane) == wanted:
            return None, f"lane_already_{wanted}"
        if action == "scale_up" and not lane.enabled:
            return None, "lane_disabled"
        return lane, ""
    if action == "scale_up":
        ready = [
            lane
            for lane in config.lanes
            if lane.enabled and lane.start is not None and state(lane) == "stopped"
        ]
        if not ready:
            return None, "no_stopped_lane"
        return min(ready, key=lambda lane: (lane.rank, lane.id)), ""
    running = [lane for lane in config.lanes if state(lane) == "running"]
    if not running:
        return None, "no_running_lane"
    return max(running, key=lambda lane: (lane.rank, lane.id)), ""


def run_command(
    argv: str | list[str], env: dict[str, str], timeout: float, cwd: str
) -> tuple[int, str, bool]:
    """(exit code, output tail, timed out). The command runs in its own process group so
    that a timeout kills everything it started."""
    proc = subprocess.Popen(
        argv,
        shell=isinstance(argv, str),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
        cwd=cwd,
        start_new_session=True,
    )
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    tail = out.decode("utf-8", errors="replace")[-OUTPUT_TAIL_CHARS:]
    if payload_problem({"output_tail": tail}):
        tail = "[output withheld: it looked like a credential]"
    return proc.returncode, tail, timed_out


def _outcome(base: dict[str, Any], lane: str, result: dict[str, Any], key: str) -> FollowUp:
    payload = {**base, "lane": lane, **result}
    if result.get("exit_code") == 0:
        kind = "lane.started" if base["action"] == "scale_up" else "lane.stopped"
        return FollowUp("lanes", kind, payload, key=key)
    return FollowUp("scaling", "command.failed", payload, key=key)


@handler("scaling.command.requested", scope="target", name="lane_actuator")
def lane_actuator(event: Envelope, ctx: Context) -> FollowUp | None:
    key = "lane-command:" + event["event_id"]
    if ctx.recorded(key):
        return None
    payload = event["payload"]
    action = payload.get("action")
    if action not in ("scale_up", "scale_down"):
        raise Reject(f"scaling.command.requested has action {action!r}: need scale_up/down")
    base: dict[str, Any] = {
        "command_id": payload.get("command_id", ""),
        "action": action,
        "reason": payload.get("reason", ""),
    }
    layout = ctx.layout
    states = load_states(layout)
    named = payload.get("lane") if isinstance(payload.get("lane"), str) else None
    lane, why = choose_lane(ctx.config, states, action, named)
    if lane is None:
        return FollowUp(
            "scaling",
            "command.noop",
            {**base, "noop_reason": why, **({"lane": named} if named else {})},
            key=key,
        )

    if not ctx.begin_effect(key, event, "lane_actuator"):
        last = states.get(lane.id, {}).get("last_command", {})
        if last.get("command_id") == base["command_id"] and "exit_code" in last:
            return _outcome(base, lane.id, last["result"], key)  # it finished before the crash
        return FollowUp(
            "scaling",
            "command.failed",
            {
                **base,
                "lane": lane.id,
                "failure": "interrupted",
                "detail": "the dispatcher stopped while the command ran; not run again",
            },
            key=key,
        )

    env = {
        "ORXAQ_LANE_ID": lane.id,
        "ORXAQ_LANE_ACTION": "start" if action == "scale_up" else "stop",
        "ORXAQ_COMMAND_ID": str(base["command_id"]),
        "ORXAQ_EVENT_ID": event["event_id"],
        "ORXAQ_NODE_ID": ctx.node_id,
        "ORXAQ_TARGET_DELTA": str(payload.get("target_delta", "")),
        "ORXAQ_REASON": str(base["reason"]),
    }
    command = lane.start if action == "scale_up" else lane.stop
    if command is None:  # a lane that only runs tasks has nothing to start or stop
        why = "lane_has_no_" + ("start" if action == "scale_up" else "stop") + "_command"
        noop = {**base, "noop_reason": why, "lane": lane.id}
        return FollowUp("scaling", "command.noop", noop, key=key)
    try:
        code, tail, timed_out = run_command(command, env, lane.timeout, str(layout.root))
    except OSError as exc:
        code, tail, timed_out = 127, f"could not run the command: {exc}", False
    result: dict[str, Any] = {"exit_code": code, "output_tail": tail}
    if timed_out:
        result["failure"] = "timeout"
        result["timeout_seconds"] = lane.timeout
    elif code != 0:
        result["failure"] = "exit_code"
    entry = dict(states.get(lane.id, {"state": "stopped"}))
    if code == 0 and not timed_out:
        entry["state"] = "running" if action == "scale_up" else "stopped"
        entry["since"] = now_timestamp()
    entry["last_command"] = {"command_id": base["command_id"], "exit_code": code, "result": result}
    states[lane.id] = entry
    save_states(layout, states)
    publish_lanes(layout, ctx.node_id, ctx.config)
    return _outcome(base, lane.id, result, key)
