"""The library API: one `Mesh` per root. The CLI is a thin layer over these methods.

from orxaq_autonomy import Mesh
mesh = Mesh.open("/srv/fleet")               # a root that ran `mesh-init`
result = mesh.publish("routing", "route.requested", {"task_id": "task-17"})
for event in mesh.events(match="routing.#", limit=10):
    print(event["seq"], event["event_type"])
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from .envelope import (
    EVENT_ID_RE,
    Draft,
    Envelope,
    check_node_id,
    check_not_reserved,
    normalise_timestamp,
    refuse_credential,
    routing_key,
    unreserved,
)
from .errors import BadInput, UnknownEvent
from .fsutil import read_json
from .log import Appended, EventLog
from .node import Identity, InitResult, init_node, load_identity
from .paths import Layout, resolve_layout
from .patterns import compile_pattern

if TYPE_CHECKING:
    from .trust import Signer


class Mesh:
    """A node's view of the mesh: its identity, its log and the ledger folder."""

    def __init__(self, layout: Layout, identity: Identity) -> None:
        self.layout = layout
        self.identity = identity
        self.log = EventLog(
            layout.log_file, layout.index_file, layout.log_lock, layout.quarantine_dir
        )
        self._signer: Signer | None = None
        self._signer_stamp: tuple[int, int] | None = None

    @classmethod
    def open(
        cls, root: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> Mesh:
        """Open an initialised root (else `$ORXAQ_AUTONOMY_ROOT`, else the current directory)."""
        layout = resolve_layout(root, env)
        return cls(layout, load_identity(layout, env))

    @staticmethod
    def init(
        root: str | os.PathLike[str] | None = None,
        node_id: str | None = None,
        capabilities: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> InitResult:
        """Create the layout, identity, keys, manifest and .gitignore (idempotent). Refuses a
        clone whose branch tracks node-private files: they came from the remote."""
        from .sync import tracked_private_files

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

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- publishing -------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        event_type: str,
        payload: Any = None,
        *,
        system: bool = False,
        **fields: Any,
    ) -> Appended:
        """Append one event, durably. Optional fields: source, causation_id, correlation_id,
        target, partition_key, tenant, idempotency_key, timestamp. The topic `mesh` is the
        mesh's own: only its emitters (key rotation, fork records) pass `system=True`."""
        fields.setdefault("source", "api")
        if "causation_id" in fields and fields["causation_id"] is not None:
            fields["causation_id"] = self._causation(fields["causation_id"])
        draft = Draft.create(topic, event_type, payload, **fields)
        check_not_reserved(draft.topic, system)
        return self._append([draft], keep_envelopes=True)[0]

    def publish_many(
        self,
        items: Iterable[Mapping[str, Any]],
        default_source: str = "api",
        *,
        system: bool = False,
    ) -> list[Appended]:
        """Validate every item, then append all of them or none. `items` may be lazy (it is
        consumed under the log lock). Results carry ids and seqs, not envelopes. An item on
        the topic `mesh` is refused unless `system=True` (the mesh's own emitters)."""

        def drafts() -> Iterator[Draft]:
            for number, item in enumerate(items, 1):
                try:
                    fields = dict(item)
                    if fields.get("causation_id") is not None:
                        fields["causation_id"] = self._causation(fields["causation_id"])
                    draft = Draft.from_mapping(fields, default_source)
                    check_not_reserved(draft.topic, system)
                    yield draft
                except BadInput as exc:
                    raise BadInput(f"item {number}: {exc.message}") from None

        return self._append(drafts(), keep_envelopes=False)

    def publish_drafts(
        self, drafts: Iterable[Draft], keep_envelopes: bool = True, *, system: bool = False
    ) -> list[Appended]:
        """Append drafts built elsewhere (the gateway's writer, the dispatcher), all or none.
        A draft on the topic `mesh` is refused unless `system=True`."""
        return self._append(drafts if system else unreserved(drafts), keep_envelopes)

    def _append(self, drafts: Iterable[Draft], keep_envelopes: bool) -> list[Appended]:
        return self.log.append(drafts, self.node_id, keep_envelopes, self.current_signer)

    def current_signer(self) -> Signer:
        """The signer for this node's next events. Called under the log lock, so a key
        rotated by another process is picked up before anything is signed."""
        from .trust import Signer, finish_rotation

        key_file = self.layout.private_key_file
        if key_file.with_name(key_file.name + ".next").exists():
            finish_rotation(self)
        stamp = key_file.stat()
        if self._signer is None or self._signer_stamp != (stamp.st_ino, stamp.st_mtime_ns):
            self._signer = Signer(key_file)
            self._signer_stamp = (stamp.st_ino, stamp.st_mtime_ns)
        return self._signer

    def rotate_key(self) -> dict[str, Any]:
        """A new key pair; the switch is announced by an event signed with the old key."""
        from .trust import rotate_key

        return rotate_key(self)

    def sign_policy(self, policy: Any) -> dict[str, Any]:
        """Sign a trust policy with this node's key and write it as the ledger's trust.json."""
        from .trust import sign_policy

        return sign_policy(self, policy)

    def _causation(self, ref: Any) -> Any:
        """A full id is taken as given (its event may not be imported yet); a prefix must
        name exactly one event in the local log."""
        if isinstance(ref, str) and not EVENT_ID_RE.fullmatch(ref):
            refuse_credential(ref, "causation id")  # before any message could repeat it
            return self.resolve_event_id(ref)
        return ref

    # --- reading ----------------------------------------------------------------------

    def resolve_event_id(self, ref: str) -> str:
        """A full event id from an id or a unique prefix."""
        return self.log.resolve(ref)

    def get(self, ref: str) -> Envelope:
        event = self.log.get(self.resolve_event_id(ref))
        if event is None:  # resolve() found it in the index
            raise UnknownEvent(f"unknown event id {ref!r}")
        return event

    def trace(self, ref: str, max_events: int = 1000) -> dict[str, Any]:
        """The causal chain of an event: its causes (nearest first) and its follow-ups
        (a tree). A cause that is not in the local log is listed with `missing: true`."""
        event = self.get(ref)
        causes: list[dict[str, Any]] = []
        cause_id = event.get("causation_id")
        while cause_id is not None and len(causes) < max_events:
            cause = self.log.get(cause_id)
            if cause is None:
                causes.append({"event_id": cause_id, "missing": True})
                break
            causes.append(cause)
            cause_id = cause.get("causation_id")
        budget = [max_events]

        def tree(of: Envelope) -> list[dict[str, Any]]:
            nodes = []
            for child in self.log.followups_of(of["event_id"]):
                if budget[0] <= 0:
                    break
                budget[0] -= 1
                nodes.append({"event": child, "followups": tree(child)})
            return nodes

        return {"event": event, "causes": causes, "followups": tree(event)}

    def events(
        self,
        match: str | None = None,
        node: str | None = None,
        since: str | None = None,
        limit: int | None = None,
    ) -> list[Envelope]:
        """Events in arrival order, filtered; with `limit`, the most recent `limit` of them."""
        pattern = compile_pattern(match) if match else None
        if node is not None:
            check_node_id(node, "node id")
        since_ts = normalise_timestamp(since, "since") if since is not None else None
        if limit is not None and limit < 1:
            raise BadInput(f"bad limit {limit}: need a positive integer")

        def keep(event: Envelope) -> bool:
            return (
                (node is None or event["node_id"] == node)
                and (since_ts is None or event["timestamp"] >= since_ts)
                and (pattern is None or pattern.matches(routing_key(event)))
            )

        if limit is None:
            return [e for e in self.log.iter_events() if keep(e)]
        picked: list[Envelope] = []
        for event in self.log.iter_events_reverse():
            if keep(event):
                picked.append(event)
                if len(picked) == limit:
                    break
        picked.reverse()
        return picked

    def page(
        self,
        after: str | None = None,
        match: str | None = None,
        limit: int = 100,
        scan: int = 10_000,
    ) -> tuple[list[Envelope], str | None]:
        """Cursor paging in arrival order: up to `limit` events matching `match` that come
        after the event `after` (an id or unique prefix; None: the start of the log).
        At most `scan` lines are read, so a page costs the same however long the log is.
        Returns the events and the cursor for the next page: the id of the last line read
        (matching or not), or `after` itself when nothing new was there."""
        pattern = compile_pattern(match) if match else None
        if not 1 <= limit <= 10_000:
            raise BadInput(f"bad limit {limit}: need 1-10000")
        start, cursor = 0, None
        if after:
            cursor = self.resolve_event_id(after)
            start = self.log.end_of(cursor) or 0
        picked: list[Envelope] = []
        for read, (_, line) in enumerate(self.log.iter_lines(start, self.log.committed().log_size)):
            event: Envelope = orjson.loads(line)
            cursor = event["event_id"]
            if pattern is None or pattern.matches(routing_key(event)):
                picked.append(event)
                if len(picked) == limit:
                    break
            if read + 1 >= scan:
                break
        return picked, cursor

    def iter_events(self, start: int = 0) -> Iterator[Envelope]:
        return self.log.iter_events(start)

    def status(self) -> dict[str, Any]:
        """Counts and heads from the index and the ledger's manifests; never scans the log."""
        tail = self.log.committed()
        heads = self.log.node_heads()
        own = heads.get(self.node_id, {"seq": 0})
        manifests = self.manifests()
        exported = manifests.get(self.node_id, {}).get("head", {}).get("seq", 0)
        quarantine = sorted(p.name for p in self.layout.quarantine_dir.glob("*.ndjson"))
        dispatch = self._dispatch_status(tail.count)
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
            "forwarding": _forwarding(dispatch),
            "quarantined": {
                "incidents": tail.quarantined,
                "files": quarantine,
                "dir": str(self.layout.quarantine_dir),
            },
            "import_rejected": self._count("import_rejected.json", "rejected"),
            "forks": int(self._read_state("import_rejected.json").get("forks", 0)),
            "last_sync": self._read_state("sync.json") or None,
        }

    def _read_state(self, name: str) -> dict[str, Any]:
        try:
            return dict(read_json(self.layout.state_dir / name))
        except FileNotFoundError:
            return {}

    def _count(self, name: str, key: str) -> int:
        return len(self._read_state(name).get(key, []))

    def _dispatch_status(self, count: int) -> dict[str, Any]:
        state_dir = self.layout.state_dir
        try:
            cursor = read_json(state_dir / "dispatch_cursor.json")
        except FileNotFoundError:
            cursor = {}
        dead_by_handler: dict[str, int] = {}
        for path in (state_dir / "dead_letters").glob("*.json"):
            handler = path.stem.partition("--")[2]  # <event_id>--<handler>.json
            dead_by_handler[handler] = dead_by_handler.get(handler, 0) + 1
        pending_by_handler: dict[str, int] = {}
        for entry in cursor.get("pending", []):
            pending_by_handler[entry["handler"]] = pending_by_handler.get(entry["handler"], 0) + 1
        now = time.time()
        return {
            "cursor": cursor.get("offset", 0),
            "dispatched": cursor.get("dispatched", 0),
            "lag_events": max(0, count - cursor.get("dispatched", 0)),
            "pending": len(cursor.get("pending", [])),
            "paused": sorted(
                name
                for name, breaker in cursor.get("breakers", {}).items()
                if breaker.get("open_until", 0) > now
            ),
            "dead_letters": sum(dead_by_handler.values()),
            "pending_by_handler": pending_by_handler,
            "dead_by_handler": dead_by_handler,
            "stats": cursor.get("stats", {}),
        }

    def manifests(self) -> dict[str, dict[str, Any]]:
        """The node manifests in the ledger (`nodes/<node_id>.json`), by node id. They
        arrive through git: a name that is not `<node_id>.json`, a symlink, a folder, a
        special file, a file over 1 MiB or one that does not parse is skipped (import and
        mesh-verify report them)."""
        from .node import list_manifests, load_manifest

        found: dict[str, dict[str, Any]] = {}
        for node, path in list_manifests(self.layout)[0]:
            try:
                found[node] = load_manifest(path)
            except (BadInput, OSError):
                continue
        return found


def _forwarding(dispatch: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per webhook consumer: deliveries made, failed attempts, waiting, dead-lettered."""
    from .forward import FORWARD_PREFIX

    names = {
        name
        for table in ("stats", "pending_by_handler", "dead_by_handler")
        for name in dispatch[table]
        if name.startswith(FORWARD_PREFIX)
    }
    return {
        name.removeprefix(FORWARD_PREFIX): {
            "delivered": dispatch["stats"].get(name, {}).get("ok", 0),
            "failed_attempts": dispatch["stats"].get(name, {}).get("failed", 0),
            "pending": dispatch["pending_by_handler"].get(name, 0),
            "dead_letters": dispatch["dead_by_handler"].get(name, 0),
        }
        for name in sorted(names)
    }
