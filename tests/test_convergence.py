"""Convergence as a hypothesis state machine over real git: 3 to 4 nodes publish, dispatch,
sync, go offline and come back in random orders. After a final two rounds of syncs every
node holds the same events, no log has a duplicate, every chain is whole, and the built-in
chain's follow-ups exist once mesh-wide (imported events are never re-handled)."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from gitfleet import add_node, git, make_remote
from orxaq_autonomy import Mesh
from orxaq_autonomy.dispatch.dispatcher import Dispatcher
from orxaq_autonomy.envelope import parse_envelope
from orxaq_autonomy.ledger.sync import Syncer

KINDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "heartbeat": ("monitoring", "heartbeat.changed", {}),
    "task": ("scheduling", "task.enqueued", {"routing_options": [{"lane_id": "l", "score": 1}]}),
    "summary": ("scheduling", "lanes.ensure.summary", {"failed_count": 1}),
    "noise": ("ci", "run.finished", {}),
}


class Fleet(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="fleet-"))
        self.remote = make_remote(self.base)
        self.nodes: list[Path] = []
        self.offline: set[int] = set()
        self.counter = 0

    @initialize(count=st.integers(min_value=3, max_value=4))
    def make_nodes(self, count: int) -> None:
        self.nodes = [add_node(self.base, self.remote, f"n{i}") for i in range(count)]

    def _sync(self, i: int) -> None:
        with Mesh.open(self.nodes[i]) as mesh:
            report = Syncer(mesh, backoff_seconds=0.01).run(max_retries=10)
        assert report.pushed == (i not in self.offline)
        assert report.rejected == []

    @rule(node=st.integers(0, 3), kind=st.sampled_from(sorted(KINDS)))
    def publish(self, node: int, kind: str) -> None:
        topic, event_type, payload = KINDS[kind]
        self.counter += 1
        payload = {**payload, "task_id": f"t{self.counter}"} if kind == "task" else payload
        with Mesh.open(self.nodes[node % len(self.nodes)]) as mesh:
            mesh.publish(topic, event_type, {**payload, "n": self.counter})

    @rule(node=st.integers(0, 3))
    def dispatch(self, node: int) -> None:
        with Mesh.open(self.nodes[node % len(self.nodes)]) as mesh:
            Dispatcher(mesh).run()

    @rule(node=st.integers(0, 3))
    def sync(self, node: int) -> None:
        self._sync(node % len(self.nodes))

    @rule(node=st.integers(0, 3))
    def go_offline(self, node: int) -> None:
        i = node % len(self.nodes)
        git(self.nodes[i], "remote", "set-url", "origin", str(self.base / "unreachable.git"))
        self.offline.add(i)

    @rule(node=st.integers(0, 3))
    def come_back(self, node: int) -> None:
        i = node % len(self.nodes)
        git(self.nodes[i], "remote", "set-url", "origin", str(self.remote))
        self.offline.discard(i)

    def teardown(self) -> None:
        try:
            if self.nodes:
                self._converge_and_check()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _converge_and_check(self) -> None:
        for i in sorted(self.offline):
            self.come_back(i)
        for _ in range(2):
            for i in range(len(self.nodes)):
                self._sync(i)
        logs: list[list[dict[str, Any]]] = []
        for root in self.nodes:
            raw = root / "artifacts/autonomy/event_mesh/events.ndjson"
            lines = raw.read_bytes().splitlines() if raw.exists() else []
            events = [parse_envelope(line) for line in lines]
            ids = [e["event_id"] for e in events]
            assert len(ids) == len(set(ids)), "a log holds an event twice"
            last: dict[str, tuple[int, str | None]] = {}
            for e in events:
                seq, prev = last.get(e["node_id"], (0, None))
                assert e["seq"] == seq + 1 and e.get("prev") == prev, "a chain is broken"
                last[e["node_id"]] = (e["seq"], e["event_id"])
            logs.append(events)
        sets = [frozenset(e["event_id"] for e in log) for log in logs]
        assert all(s == sets[0] for s in sets), "the nodes did not converge"
        followups = Counter(
            (e["causation_id"], e["topic"], e["event_type"]) for e in logs[0] if "causation_id" in e
        )
        assert not followups or max(followups.values()) == 1, "a follow-up exists twice"
        by_type = Counter(f"{e['topic']}.{e['event_type']}" for e in logs[0])
        assert by_type["scheduling.tick.requested"] == by_type["monitoring.heartbeat.changed"]
        assert by_type["scheduling.task.scheduled"] == by_type["scheduling.task.enqueued"]
        assert by_type["routing.route.selected"] == by_type["scheduling.task.enqueued"]
        assert by_type["scaling.decision.made"] == by_type["scheduling.lanes.ensure.summary"]


Fleet.TestCase.settings = settings(
    max_examples=10,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestConvergence = Fleet.TestCase
