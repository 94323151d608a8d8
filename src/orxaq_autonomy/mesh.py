"""The library API: one `Mesh` per root, and the CLI a thin layer over its methods.

from orxaq_autonomy import Mesh
mesh = Mesh.open("/srv/fleet")               # a root that ran `mesh-init`
result = mesh.publish("routing", "route.requested", {"task_id": "task-17"})
for event in mesh.events(match="routing.#", limit=10):
    print(event["seq"], event["event_type"])

`Mesh` is a `store.node.Node` (publish, read, trace, rotate keys) with the wings on top:
dispatch, the ledger (export, import, verify, sync) and the node's figures (status).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .dispatch.dispatcher import Dispatcher, DispatchReport, dispatch_status
from .dispatch.forward import forwarding_status
from .dispatch.tasks import cancel as cancel_task
from .dispatch.tasks import describe as describe_task
from .dispatch.tasks import find_task, list_tasks, task_counts
from .errors import BadInput
from .exchange.status import exchange_status
from .ledger.export import ExportReport, export_events
from .ledger.files import legacy_outboxes
from .ledger.importer import ImportReport, import_events
from .ledger.keyring import sign_policy
from .ledger.sync import Syncer, SyncReport, sync_state, tracked_private_files
from .store.fsutil import read_json
from .store.init import InitResult, init_node
from .store.migrate import MigrateReport, migrate
from .store.node import Node
from .store.paths import resolve_layout


class Mesh(Node):
    """A node and everything it does: the facade the CLI and the gateway use."""

    @staticmethod
    def init(
        root: str | os.PathLike[str] | None = None,
        node_id: str | None = None,
        capabilities: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> InitResult:
        """Create the layout, identity, keys, manifest and .gitignore (idempotent). Refuses a
        clone whose branch tracks node-private files: they came from the remote."""
        layout = resolve_layout(root, env)
        tracked = tracked_private_files(layout)
        if tracked:
            raise BadInput(
                f"the git repository tracks node-private files ({', '.join(tracked[:3])}"
                f"{', ...' if len(tracked) > 3 else ''}): they came from the remote and "
                "would be this node's config, keys or log; remove them from the branch "
                "(git rm -r --cached) and clone again"
            )
        return init_node(layout, node_id, capabilities, env)

    @staticmethod
    def migrate(
        root: str | os.PathLike[str] | None = None,
        node_id: str | None = None,
        dry_run: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> MigrateReport:
        """Make an orxaq-ops root a node of this mesh (`mesh-migrate`; idempotent, resumable;
        docs/migration.md)."""
        return migrate(resolve_layout(root, env), node_id, dry_run, env)

    def dispatch(self, max_events: int | None = None, wait: bool = False) -> DispatchReport:
        """Run the handlers over new events in the local log (`mesh-dispatch`)."""
        return Dispatcher(self).run(max_events=max_events, wait=wait)

    def export_events(self, max_events: int | None = None) -> ExportReport:
        """This node's new events into its outbox folder (`mesh-export`)."""
        return export_events(self, max_events)

    def import_events(self, max_events: int | None = None) -> ImportReport:
        """Other nodes' new, verified events into the log (`mesh-import`)."""
        return import_events(self, max_events)

    def sync(self, push: bool = True, max_retries: int = 5, wait: bool = False) -> SyncReport:
        """Pull, import, dispatch, export, commit and push (`mesh-sync`)."""
        return Syncer(self).run(push=push, max_retries=max_retries, wait=wait)

    def listen(
        self,
        seconds: float | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Exchange events over NATS JetStream until `seconds` pass (`mesh-listen`)."""
        from .exchange.listener import listen

        return listen(self.layout, self.identity, seconds, progress)

    def tasks(self) -> list[dict[str, Any]]:
        """The tasks this node runs or ran (`mesh-tasks list`); writes nothing."""
        return list_tasks(self.layout)

    def task(self, ref: str) -> dict[str, Any]:
        """One task by task id or route.selected event id (or prefix); writes nothing."""
        return describe_task(*find_task(self.layout, ref))

    def cancel_task(self, ref: str) -> dict[str, Any]:
        """Kill a task's process group and record it failed / cancelled (`mesh-tasks cancel`)."""
        return cancel_task(self, ref)

    def sign_policy(self, policy: Any) -> dict[str, Any]:
        """Sign a trust policy with this node's key and write it as the ledger's trust.json."""
        return sign_policy(self, policy)

    def status(self) -> dict[str, Any]:
        """Counts and heads from the index and the ledger's manifests; never scans the log."""
        tail = self.log.committed()
        heads = self.log.node_heads()
        own = heads.get(self.node_id, {"seq": 0})
        manifests = self.manifests()
        exported = manifests.get(self.node_id, {}).get("head", {}).get("seq", 0)
        quarantine = sorted(p.name for p in self.layout.quarantine_dir.glob("*.ndjson"))
        dispatch = dispatch_status(self.layout, tail.count)
        rejected = self._read_state("import_rejected.json")
        return {
            "node_id": self.node_id,
            "root": str(self.layout.root),
            "capabilities": list(self.identity.capabilities),
            "log": {
                "path": str(self.layout.log_file),
                "bytes": tail.log_size,
                "events": tail.count,
                "clock": tail.clock,
                # bytes a writer left past its commit; the next write quarantines them
                "uncommitted_bytes": max(0, self.log._file_size() - tail.log_size),
            },
            "own": {"seq": own["seq"], "event_id": own.get("event_id")},
            "unexported": max(0, own["seq"] - int(exported)),
            "authors": heads,
            "nodes": {
                node_id: {
                    "capabilities": m.get("capabilities", []),
                    "head": m.get("head", {}),
                }
                for node_id, m in sorted(manifests.items())
            },
            "dispatch": dispatch,
            "forwarding": forwarding_status(dispatch),
            "tasks": task_counts(self.layout),
            "quarantined": {
                "incidents": tail.quarantined,
                "files": quarantine,
                "dir": str(self.layout.quarantine_dir),
            },
            "import_rejected": len(rejected.get("rejected", [])),
            # nodes whose orxaq-ops outbox files wait for their mesh-migrate (SPEC 12)
            "awaiting_migration": legacy_outboxes(self.layout, self.node_id),
            "forks": int(rejected.get("forks", 0)),
            "last_sync": sync_state(self) or None,
            "exchange": exchange_status(self.layout),
        }

    def _read_state(self, name: str) -> dict[str, Any]:
        try:
            return dict(read_json(self.layout.state_dir / name))
        except FileNotFoundError:
            return {}
