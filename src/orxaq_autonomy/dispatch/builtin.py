"""The built-in chain (the orxaq-ops design; payload names kept compatible with it):

    monitoring.heartbeat.changed  -> scheduling.tick.requested
    scheduling.task.enqueued      -> scheduling.task.scheduled + routing.route.requested
    routing.route.requested       -> routing.route.selected | routing.route.blocked
    scheduling.lanes.<x>.summary  -> scaling.decision.requested
    scaling.decision.requested    -> scaling.decision.made       (first-match decision table)
    scaling.decision.made         -> scaling.command.requested   (scale_up / scale_down only)
    scaling.command.requested     -> the lane actuator (lanes.py)

All are pure functions of the event and the config, so re-handling yields the same
follow-ups, which the dispatcher deduplicates.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..config import COUNT_FIELDS
from ..envelope import Envelope
from ..handlers import Context, FollowUp, Reject, handler


@handler("monitoring.heartbeat.changed", name="heartbeat_tick")
def heartbeat_tick(event: Envelope, ctx: Context) -> FollowUp:
    return FollowUp(
        "scheduling",
        "tick.requested",
        {"reason": "heartbeat_changed", "origin_event_id": event["event_id"]},
    )


@handler("scheduling.task.enqueued", name="task_schedule")
def task_schedule(event: Envelope, ctx: Context) -> list[FollowUp]:
    payload = event["payload"]
    task_id = payload.get("task_id")
    if not isinstance(task_id, str) or not task_id.strip():
        raise Reject("scheduling.task.enqueued needs a payload task_id (a non-empty string)")
    route: dict[str, Any] = {"task_id": task_id, "options": payload.get("routing_options", [])}
    if "required_capabilities" in payload:
        route["required_capabilities"] = payload["required_capabilities"]
    return [
        FollowUp("scheduling", "task.scheduled", {"task_id": task_id, "state": "ready"}),
        FollowUp("routing", "route.requested", route),
    ]


def _score(option: dict[str, Any]) -> float:
    score = option.get("score", 0)
    if isinstance(score, bool) or not isinstance(score, int | float):
        return 0.0
    return float(score)


def _tie_key(option: dict[str, Any]) -> tuple[str, str]:
    return (str(option.get("node_id", "")), str(option.get("lane_id", "")))


def select_route(payload: dict[str, Any], manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Highest score among healthy candidates; ties go to the lowest (node_id, lane_id)."""
    options = payload.get("options")
    candidates = [o for o in options if isinstance(o, dict)] if isinstance(options, list) else []
    if not candidates and "required_capabilities" in payload:
        wanted = payload["required_capabilities"]
        wanted = {c for c in wanted if isinstance(c, str)} if isinstance(wanted, list) else set()
        candidates = [
            {"node_id": node_id, "score": 0}
            for node_id, manifest in sorted(manifests.items())
            if wanted <= set(manifest.get("capabilities", []))
        ]
        if not candidates:
            return {"selected": False, "reason": "no_capable_node"}
    healthy = [o for o in candidates if o.get("healthy", True) is not False]
    if not healthy:
        return {"selected": False, "reason": "no_healthy_option"}
    best = min(healthy, key=lambda o: (-_score(o), _tie_key(o)))
    return {"selected": True, "selection": best}


@handler("routing.route.requested", name="route_select")
def route_select(event: Envelope, ctx: Context) -> FollowUp:
    result = select_route(event["payload"], ctx.manifests())
    # Capability routing reads the manifests, which change: key the decision by its cause
    # so that handling the cause again can never add a second, different decision.
    key = "route:" + event["event_id"]
    if not result["selected"]:
        return FollowUp("routing", "route.blocked", {**_task(event), **result}, key=key)
    node = result["selection"].get("node_id")
    target = node if isinstance(node, str) and node else None
    return FollowUp("routing", "route.selected", {**_task(event), **result}, target=target, key=key)


def _task(event: Envelope) -> dict[str, Any]:
    task_id = event["payload"].get("task_id")
    return {"task_id": task_id} if task_id is not None else {}


def _count(value: Any) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return max(0, value)
    try:
        return max(0, int(str(value).strip()))
    except ValueError:
        return 0


def _counts(payload: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, Any] = {name: _count(payload.get(name, 0)) for name in COUNT_FIELDS}
    if isinstance(payload.get("lane"), str):
        counts["lane"] = payload["lane"]
    return counts


@handler("scheduling.lanes.*.summary", name="lanes_summary")
def lanes_summary(event: Envelope, ctx: Context) -> FollowUp:
    return FollowUp("scaling", "decision.requested", _counts(event["payload"]))


@handler("scaling.decision.requested", name="scaling_decide")
def scaling_decide(event: Envelope, ctx: Context) -> FollowUp:
    counts = _counts(event["payload"])
    rule = ctx.config.scaling.decide(counts)
    decision: dict[str, Any] = {
        "action": rule.action,
        "reason": rule.reason,
        "target_delta": rule.target_delta,
        "table_version": ctx.config.scaling.table_version,
    }
    if "lane" in counts:
        decision["lane"] = counts["lane"]
    return FollowUp("scaling", "decision.made", decision)


@handler("scaling.decision.made", name="scaling_command")
def scaling_command(event: Envelope, ctx: Context) -> FollowUp | None:
    payload = event["payload"]
    action = payload.get("action")
    if action not in ("scale_up", "scale_down"):
        return None
    command: dict[str, Any] = {
        "command_id": "cmd_" + hashlib.sha256(event["event_id"].encode()).hexdigest()[:20],
        "action": action,
        "target_delta": payload.get("target_delta", 1 if action == "scale_up" else -1),
        "reason": payload.get("reason", ""),
    }
    if isinstance(payload.get("lane"), str):
        command["lane"] = payload["lane"]
    return FollowUp("scaling", "command.requested", command, target=event.get("target"))
