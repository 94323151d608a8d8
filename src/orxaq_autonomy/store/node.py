"""A node's own side of the mesh: its identity, its signed log and its view of the ledger's
manifests. Publishing, reading, tracing and key rotation live here; the wings (dispatch,
ledger, gateway) take a Node, and `mesh.Mesh` is the facade that adds them on top.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import orjson

from ..envelope import (
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
from ..errors import BadInput, UnknownEvent
from ..patterns import compile_pattern
from .fsutil import atomic_write_bytes, fsync_dir
from .identity import Identity, load_identity
from .keys import ROTATION, Signer, new_key_text, rotation_statement
from .log import Appended, EventLog
from .manifest import list_manifests, load_manifest, update_manifest
from .paths import Layout, resolve_layout

if TYPE_CHECKING:
    from .schemas import Registry

# The built-in chain's schemas (package data): a subject with neither one of these nor a
# folder in the ledger's registry has no schema, and its publish never imports store/schemas.
_BUILTIN_SCHEMAS = Path(__file__).with_name("builtin_schemas")


class Node:
    """One node: its layout, identity, log and signer."""

    def __init__(self, layout: Layout, identity: Identity) -> None:
        self.layout = layout
        self.identity = identity
        self.log = EventLog(
            layout.log_file, layout.index_file, layout.log_lock, layout.quarantine_dir
        )
        self._signer: Signer | None = None
        self._signer_stamp: tuple[int, int] | None = None
        self._schemas: Registry | None = None
        self._policy: tuple[Any, bool, tuple[tuple[str, Any], ...]] | None = None

    @classmethod
    def open(
        cls, root: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> Self:
        """Open an initialised root (else `$ORXAQ_AUTONOMY_ROOT`, else the current directory)."""
        layout = resolve_layout(root, env)
        return cls(layout, load_identity(layout, env))

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Self:
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
        return self._append([self.check_schema(draft)], keep_envelopes=True)[0]

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
                    yield self.check_schema(draft)
                except BadInput as exc:
                    raise BadInput(f"item {number}: {exc.message}") from None

        return self._append(drafts(), keep_envelopes=False)

    def publish_drafts(
        self, drafts: Iterable[Draft], keep_envelopes: bool = True, *, system: bool = False
    ) -> list[Appended]:
        """Append drafts built elsewhere (the gateway's writer, the dispatcher), all or none.
        A draft on the topic `mesh` is refused unless `system=True`."""
        checked = (self.check_schema(d) for d in (drafts if system else unreserved(drafts)))
        return self._append(checked, keep_envelopes)

    def _append(self, drafts: Iterable[Draft], keep_envelopes: bool) -> list[Appended]:
        return self.log.append(drafts, self.node_id, keep_envelopes, self.current_signer)

    def current_signer(self) -> Signer:
        """The signer for this node's next events. Called under the log lock, so a key
        rotated by another process is picked up before anything is signed."""
        key_file = self.layout.private_key_file
        if self._next_key_file.exists():
            self._finish_rotation()
        stamp = key_file.stat()
        if self._signer is None or self._signer_stamp != (stamp.st_ino, stamp.st_mtime_ns):
            self._signer = Signer(key_file)
            self._signer_stamp = (stamp.st_ino, stamp.st_mtime_ns)
        return self._signer

    @property
    def _next_key_file(self) -> Path:
        key_file = self.layout.private_key_file
        return key_file.with_name(key_file.name + ".next")

    def rotate_key(self) -> dict[str, Any]:
        """Make a new key pair and switch to it. The rotation event names the new key, is
        signed by the old one and carries the new key's proof (ledger/keyring.py checks
        both). Under the log lock it is the old key's last event, and nothing can be signed
        in between. A crash before the switch is finished on the next publish."""
        with self.log.locked():
            nxt = self._next_key_file
            if not nxt.exists():
                atomic_write_bytes(nxt, new_key_text(), mode=0o600)
            new = Signer(nxt)
            old = self.current_signer()
            result = self.publish(
                ROTATION[0],
                ROTATION[1],
                {
                    "public_key": new.public_key,
                    "previous_key": old.public_key,
                    "proof": new.sign_bytes(
                        rotation_statement(self.node_id, old.public_key, new.public_key)
                    ),
                },
                source="mesh-rotate-key",
                idempotency_key="rotate:" + new.public_key,
                system=True,
            )
            self._finish_rotation()
        return {
            "event_id": result.event_id,
            "seq": result.seq,
            "public_key": new.public_key,
            "previous_key": old.public_key,
        }

    def _finish_rotation(self) -> None:
        """Swap in the next key once its rotation event is in the log; drop it otherwise."""
        nxt = self._next_key_file
        new = Signer(nxt)
        done = self.log.idempotent_hit(self.node_id, ("", "rotate:" + new.public_key))
        if done is None:
            return  # the rotation event was never written: rotate_key will use this key
        key_file = self.layout.private_key_file
        os.replace(nxt, key_file)
        fsync_dir(key_file.parent)
        manifest = self.manifests().get(self.node_id, {})
        keys = [k for k in manifest.get("keys", []) if k.get("public_key") != new.public_key]
        keys.append({"public_key": new.public_key, "from_seq": done.seq + 1})
        update_manifest(self.layout, self.node_id, public_key=new.public_key, keys=keys)

    # --- schemas (SPEC 9) --------------------------------------------------------------

    @property
    def schemas(self) -> Registry:
        """The ledger's schema registry (store/schemas.py)."""
        if self._schemas is None:
            from .schemas import Registry

            self._schemas = Registry(self.layout)
        return self._schemas

    def _schema_policy(self) -> tuple[bool, tuple[tuple[str, Any], ...]]:
        """`[schemas] required` and the `[[naming]]` rules from the config. The config is
        parsed (pydantic) only when it mentions either, so a plain publish stays fast."""
        path = self.layout.state_dir / "config.toml"
        try:
            info = path.stat()
            stamp: Any = (info.st_ino, info.st_mtime_ns, info.st_size)
        except FileNotFoundError:
            stamp = None
        if self._policy is not None and self._policy[0] == stamp:
            return self._policy[1], self._policy[2]
        required: bool = False
        naming: tuple[tuple[str, Any], ...] = ()
        if stamp is not None:
            raw = path.read_bytes()
            if b"schemas" in raw or b"naming" in raw:
                import re

                from ..config import load_config

                config = load_config(path)
                required = config.schemas.required
                naming = tuple((r.tenant, re.compile(r.pattern)) for r in config.naming)
        self._policy = (stamp, required, naming)
        return required, naming

    def check_schema(self, draft: Draft) -> Draft:
        """`draft` checked against its subject's latest schema (and the naming rules),
        carrying the version it was checked against. BadInput names the JSON path and rule."""
        required, naming = self._schema_policy()
        subject = f"{draft.topic}.{draft.event_type}"
        if (
            self._schemas is None  # once the registry is loaded, it answers (and caches)
            and not required
            and not naming
            and not os.path.lexists(self.layout.ledger_dir / "schemas" / subject)
            and not os.path.exists(_BUILTIN_SCHEMAS / f"{subject}.json")
        ):
            return draft if draft.schema is None else draft._replace(schema=None)
        rule = None
        if naming and draft.tenant is not None:

            def rule(d: Draft) -> str | None:
                for tenant, pattern in naming:
                    if tenant == d.tenant and not pattern.fullmatch(d.routing_key):
                        return (
                            f"subject {d.routing_key!r} breaks the naming rule of tenant "
                            f"{tenant!r}: it must match {pattern.pattern!r}"
                        )
                return None

        return self.schemas.check_draft(draft, required=required, naming=rule)

    def schema_check(
        self, subject: str, schema: bytes, compatibility: str | None = None
    ) -> dict[str, Any]:
        """Whether `schema` may become the subject's next version (`mesh-schema check`);
        BadInput names each incompatibility. Writes nothing."""
        _, mode, version = self.schemas.check_new(
            subject, schema, compatibility, self.log.iter_events
        )
        return {"subject": subject, "version": version, "compatibility": mode}

    def schema_add(
        self, subject: str, schema: bytes, compatibility: str | None = None
    ) -> dict[str, Any]:
        """Write the subject's next version (`mesh-schema add`) and record the change as a
        `mesh.schema.added` event."""
        from .schemas import CHANGE_EVENT

        added = self.schemas.add(subject, schema, compatibility, self.log.iter_events)
        mode = self.schemas.mode(subject)
        self.publish(
            CHANGE_EVENT[0],
            CHANGE_EVENT[1],
            {
                "subject": subject,
                "version": added.version,
                "compatibility": mode,
                "digest": added.digest,
            },
            source="mesh-schema",
            idempotency_key=f"schema:{added.ref}:{added.digest}",
            system=True,
        )
        return {"subject": subject, "version": added.version, "compatibility": mode}

    def schema_list(self) -> list[dict[str, Any]]:
        """Every subject with a schema, its versions and mode (`mesh-schema list`)."""
        found = []
        for subject in self.schemas.subjects():
            try:
                versions = self.schemas.versions(subject)
                builtin = self.schemas._folder(subject) is None
                mode = self.schemas.mode(subject)
            except (BadInput, OSError):
                continue  # not a plain folder or file (it came through git): verify says so
            found.append(
                {
                    "subject": subject,
                    "versions": versions,
                    "latest": versions[-1] if versions else None,
                    "compatibility": mode,
                    "builtin": builtin,
                }
            )
        return found

    def schema_show(self, subject: str, version: int | None = None) -> dict[str, Any]:
        """One version of a subject's schema, the latest by default (`mesh-schema show`)."""
        from .schemas import check_subject

        check_subject(subject)
        versions = self.schemas.versions(subject)
        if not versions:
            raise BadInput(f"subject {subject!r} has no schema")
        number = versions[-1] if version is None else version
        if number not in versions:
            raise BadInput(f"subject {subject!r} has no version {number} (has {versions})")
        found = self.schemas.get(subject, number)
        return {
            "subject": subject,
            "version": number,
            "compatibility": self.schemas.mode(subject),
            "schema": found.schema,
        }

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
        cause_id = self._cause_id(event)
        while cause_id is not None and len(causes) < max_events:
            cause = self.log.get(cause_id)
            if cause is None:
                causes.append({"event_id": cause_id, "missing": True})
                break
            causes.append(cause)
            cause_id = self._cause_id(cause)
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

    def _cause_id(self, event: Envelope) -> str | None:
        """`causation_id`, or for an event migrated from orxaq-ops whose cause was another
        node's (`legacy_causation_id`), that cause's new id once its node's migration has
        brought it here (SPEC 12)."""
        legacy = event.get("legacy_causation_id")
        if legacy is None:
            return event.get("causation_id")
        found = self.log.find_legacy(legacy)
        return None if found is None else str(found["event_id"])

    def event_filter(
        self,
        match: str | None = None,
        node: str | None = None,
        since: str | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> Callable[[Envelope], bool]:
        """A predicate for events: a routing-key pattern, an author, a time, and envelope
        fields that must be equal (`{"tenant": "acme"}`)."""
        pattern = compile_pattern(match) if match else None
        if node is not None:
            check_node_id(node, "node id")
        since_ts = normalise_timestamp(since, "since") if since is not None else None
        pairs = tuple((fields or {}).items())

        def keep(event: Envelope) -> bool:
            return (
                all(event.get(k) == v for k, v in pairs)
                and (node is None or event["node_id"] == node)
                and (since_ts is None or event["timestamp"] >= since_ts)
                and (pattern is None or pattern.matches(routing_key(event)))
            )

        return keep

    def events(
        self,
        match: str | None = None,
        node: str | None = None,
        since: str | None = None,
        limit: int | None = None,
        fields: Mapping[str, str] | None = None,
        end: int | None = None,
    ) -> list[Envelope]:
        """Events in arrival order, filtered (see event_filter), up to byte `end` of the log;
        with `limit`, the most recent `limit` of them (read backwards: the cost is what is
        taken)."""
        keep = self.event_filter(match, node, since, fields)
        if limit is not None and limit < 1:
            raise BadInput(f"bad limit {limit}: need a positive integer")
        if end is None:
            end = self.log.committed().log_size
        if limit is None:
            return [e for e in self.log.iter_events(0, end) if keep(e)]
        picked: list[Envelope] = []
        for event in self.log.iter_events_reverse(end):
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

    def manifests(self) -> dict[str, dict[str, Any]]:
        """The node manifests in the ledger (`nodes/<node_id>.json`), by node id. They
        arrive through git: a name that is not `<node_id>.json`, a symlink, a folder, a
        special file, a file over 1 MiB or one that does not parse is skipped (import and
        mesh-verify report them)."""
        found: dict[str, dict[str, Any]] = {}
        for node, path in list_manifests(self.layout)[0]:
            try:
                found[node] = load_manifest(path)
            except (BadInput, OSError):
                continue
        return found
