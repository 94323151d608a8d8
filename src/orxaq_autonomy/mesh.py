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
from collections.abc import Iterable, Mapping
from typing import Any

from .dispatch.dispatcher import Dispatcher, DispatchReport, dispatch_status
from .dispatch.forward import forwarding_status
from .errors import BadInput
from .ledger.export import ExportReport, export_events
from .ledger.importer import ImportReport, import_events
from .ledger.keyring import sign_policy
from .ledger.sync import Syncer, SyncReport, sync_state, tracked_private_files
from .store.fsutil import read_json
from .store.init import InitResult, init_node
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
            "quarantined": {
                "incidents": tail.quarantined,
                "files": quarantine,
                "dir": str(self.layout.quarantine_dir),
            },
            "import_rejected": len(rejected.get("rejected", [])),
            "forks": int(rejected.get("forks", 0)),
            "last_sync": sync_state(self) or None,
        }

    def _read_state(self, name: str) -> dict[str, Any]:
        try:
            return dict(read_json(self.layout.state_dir / name))
        except FileNotFoundError:
            return {}
