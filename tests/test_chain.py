"""The built-in chain (SPEC 5) through a real dispatcher on a real log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orxaq_autonomy import Mesh
from orxaq_autonomy.dispatch.builtin import select_route
from orxaq_autonomy.dispatch.dispatcher import Dispatcher


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    Mesh.init(tmp_path, node_id="node-a", capabilities=["gpu", "python"])
    return Mesh.open(tmp_path)


def by_type(mesh: Mesh, routing_key: str) -> list[dict[str, Any]]:
    return [e for e in mesh.log.iter_events() if f"{e['topic']}.{e['event_type']}" == routing_key]


def dispatch(mesh: Mesh) -> Any:
    return Dispatcher(mesh).run()


def test_heartbeat_requests_a_tick_with_causation_and_correlation(mesh: Mesh) -> None:
    cause = mesh.publish("monitoring", "heartbeat.changed", {}, correlation_id="deploy-7")
    dispatch(mesh)
    (tick,) = by_type(mesh, "scheduling.tick.requested")
    assert tick["causation_id"] == cause.event_id
    assert tick["correlation_id"] == "deploy-7"
    assert tick["payload"] == {"reason": "heartbeat_changed", "origin_event_id": cause.event_id}
    assert cause.envelope is not None
    assert tick["timestamp"] == cause.envelope["timestamp"]  # derived from the cause
    assert tick["source"] == "handler:heartbeat_tick"


def test_a_cause_without_correlation_starts_one(mesh: Mesh) -> None:
    cause = mesh.publish("monitoring", "heartbeat.changed", {})
    dispatch(mesh)
    (tick,) = by_type(mesh, "scheduling.tick.requested")
    assert tick["correlation_id"] == cause.event_id


def test_task_enqueued_schedules_and_routes(mesh: Mesh) -> None:
    options = [
        {"lane_id": "l1", "node_id": "node-b", "score": 0.5},
        {"lane_id": "l2", "node_id": "node-c", "score": 0.9, "healthy": False},
        {"lane_id": "l3", "node_id": "node-d", "score": "high"},
    ]
    mesh.publish(
        "scheduling",
        "task.enqueued",
        {"task_id": "task-17", "routing_options": options},
        partition_key="task-17",
    )
    report = dispatch(mesh)
    assert report.dead_lettered == 0
    (scheduled,) = by_type(mesh, "scheduling.task.scheduled")
    assert scheduled["payload"] == {"task_id": "task-17", "state": "ready"}
    (requested,) = by_type(mesh, "routing.route.requested")
    assert requested["payload"]["options"] == options
    (selected,) = by_type(mesh, "routing.route.selected")
    assert selected["payload"]["selection"] == options[0]
    assert selected["payload"]["selected"] is True
    assert selected["target"] == "node-b"
    assert selected["partition_key"] == "task-17"  # per-aggregate ordering carries through


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"options": [{"lane_id": "b", "score": 1}, {"lane_id": "a", "score": 1}]},
            {"lane_id": "a", "score": 1},
        ),
        (
            {
                "options": [
                    {"lane_id": "a", "node_id": "n2", "score": 2},
                    {"lane_id": "z", "node_id": "n1", "score": 2},
                ]
            },
            {"lane_id": "z", "node_id": "n1", "score": 2},
        ),
        (
            {"options": [{"lane_id": "a", "score": "x"}, {"lane_id": "b", "score": -1}]},
            {"lane_id": "a", "score": "x"},
        ),
        ({"options": [{"lane_id": "a", "score": 5, "healthy": False}]}, "no_healthy_option"),
        ({"options": []}, "no_healthy_option"),
        ({"required_capabilities": ["gpu"]}, {"node_id": "node-a", "score": 0}),
        ({"options": [], "required_capabilities": ["tpu"]}, "no_capable_node"),
    ],
)
def test_route_selection_rules(mesh: Mesh, payload: dict[str, Any], expected: Any) -> None:
    result = select_route(payload, mesh.manifests())
    if isinstance(expected, str):
        assert result == {"selected": False, "reason": expected}
    else:
        assert result == {"selected": True, "selection": expected}


def test_blocked_route_is_recorded(mesh: Mesh) -> None:
    mesh.publish("routing", "route.requested", {"task_id": "t", "required_capabilities": ["x"]})
    dispatch(mesh)
    (blocked,) = by_type(mesh, "routing.route.blocked")
    assert blocked["payload"] == {"task_id": "t", "selected": False, "reason": "no_capable_node"}


@pytest.mark.parametrize(
    ("counts", "decision"),
    [
        (
            {"failed_count": 2, "parallel_groups_at_limit": 1},
            ("scale_down", "failures_present", -1),
        ),
        ({"parallel_groups_at_limit": 1}, ("scale_up", "capacity_saturated", 1)),
        ({"parallel_groups_at_limit": 1, "started_count": 1}, ("hold", "stable", 0)),
        ({"scaled_down_count": 1}, ("hold", "recent_scale_down", 0)),
        ({"scaled_up_count": 1}, ("hold", "recent_scale_up", 0)),
        ({}, ("hold", "stable", 0)),
        ({"failed_count": "3"}, ("scale_down", "failures_present", -1)),
    ],
)
def test_scaling_v1_table(
    mesh: Mesh, counts: dict[str, Any], decision: tuple[str, str, int]
) -> None:
    mesh.publish("scheduling", "lanes.ensure.summary", {**counts, "lane": "lane-1"})
    dispatch(mesh)
    (requested,) = by_type(mesh, "scaling.decision.requested")
    assert requested["payload"]["lane"] == "lane-1"
    (made,) = by_type(mesh, "scaling.decision.made")
    assert (
        made["payload"]["action"],
        made["payload"]["reason"],
        made["payload"]["target_delta"],
    ) == decision
    assert made["payload"]["table_version"] == "scaling_v1"
    commands = by_type(mesh, "scaling.command.requested")
    if decision[0] == "hold":
        assert commands == []
    else:
        (command,) = commands
        assert command["payload"]["action"] == decision[0]
        assert command["payload"]["command_id"].startswith("cmd_")
        assert command["payload"]["lane"] == "lane-1"


def write_config(mesh: Mesh, text: str) -> None:
    (mesh.layout.state_dir / "config.toml").write_text(text)


def test_decision_table_is_replaceable_by_config(mesh: Mesh) -> None:
    write_config(
        mesh,
        """
[scaling]
table_version = "scaling_v2"
[[scaling.rules]]
when = { started_count = ">=3" }
action = "scale_down"
reason = "too_many_starts"
target_delta = -2
""",
    )
    mesh.publish("scheduling", "lanes.start.summary", {"started_count": 3})
    mesh.publish("scheduling", "lanes.start.summary", {"failed_count": 1})
    dispatch(mesh)
    made = [e["payload"] for e in by_type(mesh, "scaling.decision.made")]
    assert made == [
        {
            "action": "scale_down",
            "reason": "too_many_starts",
            "target_delta": -2,
            "table_version": "scaling_v2",
        },
        {"action": "hold", "reason": "stable", "target_delta": 0, "table_version": "scaling_v2"},
    ]


LANES = """
[[lanes]]
id = "lane-1"
rank = 1
start = "echo starting $ORXAQ_LANE_ID for $ORXAQ_COMMAND_ID; touch {root}/lane-1.up"
stop = ["sh", "-c", "echo stopping; rm -f {root}/lane-1.up"]
timeout = 5
[[lanes]]
id = "lane-2"
rank = 2
start = "touch {root}/lane-2.up"
stop = "rm -f {root}/lane-2.up"
[[lanes]]
id = "lane-3"
rank = 3
enabled = false
start = "true"
stop = "true"
[[lanes]]
id = "broken"
rank = 9
enabled = false
start = "echo boom >&2; exit 7"
stop = "true"
[[lanes]]
id = "slow"
rank = 10
enabled = false
start = "sleep 30"
stop = "true"
timeout = 0.5
"""


def scale(mesh: Mesh, action: str, lane: str | None = None) -> None:
    payload: dict[str, Any] = {
        "action": action,
        "reason": "test",
        "target_delta": 1,
        "table_version": "t",
    }
    if lane:
        payload["lane"] = lane
    mesh.publish("scaling", "decision.made", payload)
    dispatch(mesh)


def test_lane_actuator_starts_and_stops_by_rank(mesh: Mesh) -> None:
    root = mesh.layout.root
    write_config(mesh, LANES.replace("{root}", str(root)))
    scale(mesh, "scale_up")
    scale(mesh, "scale_up")
    scale(mesh, "scale_up")  # lane-3 is disabled: nothing left to start
    started = by_type(mesh, "lanes.lane.started")
    assert [e["payload"]["lane"] for e in started] == ["lane-1", "lane-2"]
    assert "starting lane-1 for cmd_" in started[0]["payload"]["output_tail"]
    assert started[0]["payload"]["exit_code"] == 0
    (noop,) = by_type(mesh, "scaling.command.noop")
    assert noop["payload"]["noop_reason"] == "no_stopped_lane"
    assert (root / "lane-1.up").exists() and (root / "lane-2.up").exists()
    manifest = mesh.manifests()["node-a"]
    assert [(lane["id"], lane["state"]) for lane in manifest["lanes"]] == [
        ("lane-1", "running"),
        ("lane-2", "running"),
        ("lane-3", "stopped"),
        ("broken", "stopped"),
        ("slow", "stopped"),
    ]

    scale(mesh, "scale_down")  # the running lane of highest rank
    (stopped,) = by_type(mesh, "lanes.lane.stopped")
    assert stopped["payload"]["lane"] == "lane-2"
    assert not (root / "lane-2.up").exists() and (root / "lane-1.up").exists()


def test_lane_command_that_fails_and_one_that_times_out(mesh: Mesh) -> None:
    write_config(
        mesh,
        LANES.replace("{root}", str(mesh.layout.root)).replace(
            'id = "broken"\nrank = 9\nenabled = false', 'id = "broken"\nrank = 9\nenabled = true'
        ),
    )
    scale(mesh, "scale_up", lane="broken")
    scale(mesh, "scale_up", lane="slow")  # disabled lanes are not started
    write_config(
        mesh,
        LANES.replace("{root}", str(mesh.layout.root)).replace(
            'id = "slow"\nrank = 10\nenabled = false', 'id = "slow"\nrank = 10\nenabled = true'
        ),
    )
    scale(mesh, "scale_up", lane="slow")
    failed = by_type(mesh, "scaling.command.failed")
    assert failed[0]["payload"]["exit_code"] == 7
    assert failed[0]["payload"]["failure"] == "exit_code"
    assert "boom" in failed[0]["payload"]["output_tail"]
    assert failed[1]["payload"]["failure"] == "timeout"
    assert failed[1]["payload"]["exit_code"] != 0
    (noop,) = by_type(mesh, "scaling.command.noop")
    assert noop["payload"]["noop_reason"] == "lane_disabled"


def test_actuator_runs_on_the_target_node_only(mesh: Mesh, tmp_path: Path) -> None:
    write_config(mesh, LANES.replace("{root}", str(mesh.layout.root)))
    mesh.publish(
        "scaling",
        "decision.made",
        {"action": "scale_up", "reason": "r", "target_delta": 1},
        target="node-b",
    )
    dispatch(mesh)
    (command,) = by_type(mesh, "scaling.command.requested")
    assert command["target"] == "node-b"
    assert by_type(mesh, "lanes.lane.started") == []  # node-b's actuator acts, not ours


def test_broken_config_is_a_clear_error(mesh: Mesh) -> None:
    from orxaq_autonomy.errors import BadInput

    write_config(mesh, "[dispatch]\nmax_attempts = 0\n")
    with pytest.raises(BadInput, match=r"config.toml: dispatch.max_attempts: Input should be"):
        Dispatcher(mesh)
    write_config(mesh, "[[lanes]]\nid = 'x'\n")
    with pytest.raises(BadInput, match=r"lanes.0: .*lane 'x' needs start and stop commands"):
        Dispatcher(mesh)
    write_config(mesh, "not toml [")
    with pytest.raises(BadInput, match="broken config"):
        Dispatcher(mesh)
