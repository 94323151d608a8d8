"""`mesh-migrate`: make a root that orxaq-ops wrote a node of this mesh (docs/migration.md).

What it does, in an order that a crash at any point can resume from:

1. Read and check everything (the old log, its state files, the old manifest): an event
   that cannot become a valid event of this format stops the migration before anything
   is written (`--dry-run` stops here and reports).
2. Record the plan in `state/event_mesh/migrated-from-orxaq-ops/migration.json`, then move
   the old files there (log, dispatch and export state, lease, this node's old outbox
   files and old manifest). From here on the moved log is the source.
3. `mesh-init` the root (identity, key pair, config, manifest, .gitignore) under the old
   node id and capabilities.
4. Write the dispatcher's cursor past the events the old dispatcher had handled, then
   append this node's old events, each re-authored: a new seq, clock, id and signature,
   `legacy_id` = the old id, `causation_id` mapped to the new id of an own cause, or
   `legacy_causation_id` = the old id when the cause is another node's or unknown. Other
   nodes' events are left out: their own migration brings them back.
5. Mark the record done. Running again reads the record and changes nothing.

The dispatcher state is written here, in the store wing, because the dispatcher must not
run before it is there (the dispatch lock is held throughout); its format is that of
dispatch/dispatcher.py (`DispatchState.as_dict`, version 1).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..envelope import (
    FORMAT_VERSION,
    Draft,
    Envelope,
    compute_event_id,
    normalise_node_id,
    now_timestamp,
)
from ..errors import BadInput
from .fsutil import FileLock, atomic_write_json, fsync_dir, read_json
from .identity import check_capability, load_identity
from .init import init_node
from .keys import Signer
from .legacy import (
    LEGACY_FILE_RE,
    LEGACY_ID_RE,
    MIGRATED_DIR,
    is_legacy_event,
    is_legacy_log,
    legacy_event_id,
)
from .log import EventLog
from .paths import ENV_NODE_ID, Layout

OLD_STATE_FILES = (
    "dispatch_cursor.json",
    "dispatch_seen.json",
    "export_seen.json",
    "leader_lease.json",
)
RECORD = "migration.json"
DISPATCH_STATE_VERSION = 1  # dispatch/dispatcher.py STATE_VERSION


@dataclass
class MigrateReport:
    node_id: str
    migrated: int = 0  # this node's old events, re-authored into the new log
    dry_run: bool = False
    changed: bool = False  # whether this run changed any file
    left_out: dict[str, int] = field(default_factory=dict)  # other nodes' events, by author
    handled: int = 0  # events marked dispatched (the old dispatcher had handled them)
    causes_mapped: int = 0  # causation ids mapped to the new ids
    causes_legacy: int = 0  # kept as legacy_causation_id (another node's, or unknown)
    duplicates: int = 0  # lines repeating an id already migrated (orxaq-ops id collisions)
    id_mismatches: int = 0  # old ids that do not match their content (kept as given)
    torn: int = 0  # an unfinished last line of the old log (kept in the archive only)
    moved: list[str] = field(default_factory=list)  # files kept under the archive folder
    archive: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class _Plan:
    node_id: str
    capabilities: tuple[str, ...]
    events: list[dict[str, Any]]  # this node's old events, checked, in log order
    handled: int  # how many of `events`, from the start, the old dispatcher handled
    report: MigrateReport


def archive_dir(layout: Layout) -> Path:
    return layout.state_dir / MIGRATED_DIR


def migrate(
    layout: Layout,
    node_id: str | None = None,
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
) -> MigrateReport:
    """Migrate the orxaq-ops root at `layout` (see the module doc). Idempotent."""
    env = os.environ if env is None else env
    archive = archive_dir(layout)
    record = _read_record(archive)
    legacy_here = is_legacy_log(layout.log_file)
    if record is not None and record.get("status") == "done":
        if legacy_here:
            raise BadInput(
                f"{layout.root} was migrated on {record.get('finished_at')}, but "
                f"{layout.log_file} is an orxaq-ops log again: is the old code still running "
                "here? Stop it, move that log aside and run mesh-migrate again"
            )
        wanted = normalise_node_id(node_id) if node_id else None
        if wanted and wanted != record["node_id"]:
            raise BadInput(f"{layout.root} was migrated as node {record['node_id']}, not {wanted}")
        done = MigrateReport(**record["report"])
        done.dry_run, done.changed = dry_run, False
        return done
    if record is None and not legacy_here:
        if layout.node_file.exists():
            raise BadInput(
                f"{layout.root} is already a node of this mesh and holds no orxaq-ops log at "
                f"{layout.log_file}: nothing to migrate"
            )
        raise BadInput(
            f"no orxaq-ops log at {layout.log_file}: nothing to migrate "
            "(a new node starts with mesh-init)"
        )
    if not dry_run:
        layout.state_dir.mkdir(parents=True, exist_ok=True)
        layout.locks_dir.mkdir(parents=True, exist_ok=True)
    elif not layout.locks_dir.is_dir():
        return _plan(layout, archive, record, node_id, env, dry_run).report
    # one migration at a time, and no dispatcher before the cursor is in place
    with (
        FileLock(layout.locks_dir / "migrate.lock"),
        FileLock(layout.locks_dir / "dispatch.lock", timeout=3600),
    ):
        record = _read_record(archive)
        plan = _plan(layout, archive, record, node_id, env, dry_run)
        if dry_run:
            return plan.report
        _run(layout, archive, record, plan)
        return plan.report


def _read_record(archive: Path) -> dict[str, Any] | None:
    try:
        return dict(read_json(archive / RECORD))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BadInput(f"{archive / RECORD} is unreadable ({exc}); restore it") from None


# --- reading the old root ----------------------------------------------------------------


def _source(layout: Layout, archive: Path, original: Path) -> Path:
    """Where an old file is now: still in place, or already moved into the archive."""
    moved = archive / _archive_name(layout, original)
    return moved if moved.exists() and not original.exists() else original


def _archive_name(layout: Layout, original: Path) -> str:
    """The old file's place under the archive: its path below the root, or (for a file
    an override put elsewhere) a folder named for what it is."""
    if original == layout.log_file:
        return "log/" + original.name
    if original.parent == layout.state_dir:
        return "state/" + original.name
    return "ledger/" + original.relative_to(layout.ledger_dir).as_posix()


def _read_old_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BadInput(f"{path} is unreadable ({exc}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _old_state(path: Path) -> dict[str, Any]:
    """An orxaq-ops state file, or {} when the file is this format's (or absent): this
    format keeps files of the same names with other content."""
    data = _read_old_json(path)
    if path.name == "dispatch_cursor.json":
        old = "version" not in data and isinstance(data.get("offset"), int)
    elif path.name in ("dispatch_seen.json", "export_seen.json"):
        old = "event_ids" in data
    else:
        old = bool(data)  # leader_lease.json: this format has none
    return data if old else {}


def _node_id(
    layout: Layout,
    archive: Path,
    record: dict[str, Any] | None,
    wanted: str | None,
    env: Mapping[str, str],
) -> str:
    requested = normalise_node_id(wanted) if wanted else None
    known = None
    if record is not None:
        known = record["node_id"]
    elif layout.node_file.exists():
        known = load_identity(layout, {}).node_id
    if known is not None:
        if requested and requested != known:
            raise BadInput(f"{layout.root} is node {known}; refusing to migrate it as {requested}")
        return str(known)
    if requested:
        return requested
    if env.get(ENV_NODE_ID):
        return normalise_node_id(env[ENV_NODE_ID])
    # orxaq-ops kept a per-root leader lease: every node led its own root
    lease = _old_state(_source(layout, archive, layout.state_dir / "leader_lease.json"))
    if isinstance(lease.get("leader_id"), str) and lease["leader_id"]:
        return normalise_node_id(lease["leader_id"])
    manifests = sorted(layout.nodes_dir.glob("*.json")) if layout.nodes_dir.is_dir() else []
    if len(manifests) == 1:
        return normalise_node_id(manifests[0].stem)
    raise BadInput(
        f"cannot tell which node {layout.root} was (no leader lease, "
        f"{len(manifests)} manifests): give --node-id or set {ENV_NODE_ID}"
    )


def _capabilities(layout: Layout, archive: Path, node: str) -> tuple[str, ...]:
    manifest = _read_old_json(_source(layout, archive, layout.manifest_file(node)))
    caps = manifest.get("capabilities", [])
    if not isinstance(caps, list):
        return ()
    found = set()
    for cap in caps:
        if isinstance(cap, str):
            with contextlib.suppress(BadInput):
                found.add(check_capability(cap))
    return tuple(sorted(found))


def _plan(
    layout: Layout,
    archive: Path,
    record: dict[str, Any] | None,
    wanted: str | None,
    env: Mapping[str, str],
    dry_run: bool,
) -> _Plan:
    node = _node_id(layout, archive, record, wanted, env)
    log_path = _source(layout, archive, layout.log_file)
    cursor = _old_state(_source(layout, archive, layout.state_dir / "dispatch_cursor.json"))
    seen_data = _old_state(_source(layout, archive, layout.state_dir / "dispatch_seen.json"))
    old_offset = cursor.get("offset", 0)
    handled_lines = old_offset if isinstance(old_offset, int) and old_offset > 0 else 0
    seen_ids = seen_data.get("event_ids", [])
    seen = set(seen_ids) if isinstance(seen_ids, list) else set()
    report = MigrateReport(node_id=node, archive=str(archive), dry_run=dry_run)
    events: list[dict[str, Any]] = []
    mine: set[str] = set()
    handled = 0
    prefix = True  # the cursor can only say "everything up to here"
    try:
        raw = log_path.read_bytes()
    except FileNotFoundError:
        raw = b""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        report.torn = 1  # orxaq-ops died mid-line: the old log keeps it
        lines.pop()
    for index, line in enumerate(lines):
        number = index + 1
        try:
            old = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise BadInput(f"{log_path} line {number} is not JSON ({exc})") from None
        if not is_legacy_event(old):
            raise BadInput(f"{log_path} line {number} is not an orxaq-ops event")
        author = old.get("node_id")
        if author != node:
            name = author if isinstance(author, str) else "?"
            report.left_out[name] = report.left_out.get(name, 0) + 1
            continue
        old_id = old["event_id"]
        if old_id in mine:
            report.duplicates += 1
            continue
        mine.add(old_id)
        if legacy_event_id(old) != old_id:
            report.id_mismatches += 1
        events.append(_checked(old, log_path, number))
        was_handled = index < handled_lines or old_id in seen
        if prefix and was_handled:
            handled += 1
        else:
            prefix = False
    report.migrated = len(events)
    report.handled = handled
    report.moved = _moves_preview(layout, archive, node)
    return _Plan(node, _capabilities(layout, archive, node), events, handled, report)


def _checked(old: dict[str, Any], log_path: Path, number: int) -> dict[str, Any]:
    """The fields of one old event as this format has them (orxaq-ops' own normalising:
    lower case, `misc` and `generic.event` for empty names, {} for a non-object payload;
    timestamps to UTC with Z), checked like any new event (secrets included)."""
    payload = old.get("payload")
    source = old.get("source")
    cause = old.get("causation_id") or None
    try:
        if cause is not None and (type(cause) is not str or not LEGACY_ID_RE.fullmatch(cause)):
            raise BadInput(f"bad causation_id {cause!r}: need an orxaq-ops event id")
        draft = Draft.create(
            str(old.get("topic") or "misc").strip().lower(),
            str(old.get("event_type") or "generic.event").strip().lower(),
            payload if isinstance(payload, dict) else {},
            source=source if isinstance(source, str) and source else "orxaq-ops",
            timestamp=old.get("timestamp"),
        )
    except BadInput as exc:
        raise BadInput(
            f"{log_path} line {number} ({old['event_id']}): {exc.message}; fix or remove "
            "that line, then run mesh-migrate again"
        ) from None
    return {
        "topic": draft.topic,
        "event_type": draft.event_type,
        "payload": draft.payload,
        "source": draft.source,
        "timestamp": draft.timestamp,
        "legacy_id": old["event_id"],
        "cause": cause,
    }


def _moves(layout: Layout, node: str) -> list[Path]:
    """The old files still in place that the archive takes."""
    found = [layout.log_file] if is_legacy_log(layout.log_file) else []
    for name in OLD_STATE_FILES:
        path = layout.state_dir / name
        if _old_state(path):
            found.append(path)
    outbox = layout.outbox_dir(node)
    if outbox.is_dir() and not outbox.is_symlink():
        found.extend(
            outbox / name
            for name in sorted(os.listdir(outbox))
            if LEGACY_FILE_RE.fullmatch(name) and (outbox / name).is_file()
        )
    manifest = layout.manifest_file(node)
    if manifest.is_file() and not manifest.is_symlink():
        with contextlib.suppress(BadInput):
            old = _read_old_json(manifest)
            if "public_key" not in old:
                found.append(manifest)
    return found


def _moves_preview(layout: Layout, archive: Path, node: str) -> list[str]:
    done = set()
    if archive.is_dir():
        done = {p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file()}
        done.discard(RECORD)
    return sorted(done | {_archive_name(layout, p) for p in _moves(layout, node)})


# --- writing -----------------------------------------------------------------------------


def _move(src: Path, dst: Path) -> None:
    """Move one file into the archive durably (a copy, fsync, then unlink across disks)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError:
        tmp = dst.with_name(dst.name + ".part")
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
        os.unlink(src)
    fsync_dir(dst.parent)
    fsync_dir(src.parent)


def _run(layout: Layout, archive: Path, record: dict[str, Any] | None, plan: _Plan) -> None:
    report = plan.report
    node = plan.node_id
    archive.mkdir(parents=True, exist_ok=True)
    if record is None:
        atomic_write_json(
            archive / RECORD,
            {"status": "started", "node_id": node, "started_at": now_timestamp()},
        )
    for path in _moves(layout, node):
        _move(path, archive / _archive_name(layout, path))
    init_node(layout, node, plan.capabilities, {})
    log = EventLog(layout.log_file, layout.index_file, layout.log_lock, layout.quarantine_dir)
    try:
        appended = bool(log.node_heads().get(node, {}).get("seq"))
        envelopes, lines = _reauthor(layout, log, plan)
        # a run that got as far as the append left them all there (an append is all or
        # none), and its cursor before them
        if envelopes and not appended:
            _write_cursor(layout, log, envelopes, lines, plan.handled)
            refused = log.append_sealed(envelopes)
            if refused:
                raise BadInput(f"could not append the migrated events: {refused[0][1]}")
    finally:
        log.close()
    report.changed = True
    atomic_write_json(
        archive / RECORD,
        {
            "status": "done",
            "node_id": node,
            "started_at": (record or {}).get("started_at", now_timestamp()),
            "finished_at": now_timestamp(),
            "report": {**report.as_dict(), "changed": False, "dry_run": False},
        },
    )


def _reauthor(layout: Layout, log: EventLog, plan: _Plan) -> tuple[list[Envelope], list[int]]:
    """The old events as this node's next events, and each one's line length. An earlier
    run that got as far as the append left them all there (an append is all or none)."""
    node = plan.node_id
    own = log.node_heads().get(node, {"seq": 0, "event_id": None})
    if own["seq"]:
        legacy = [e.get("legacy_id") for e in log.iter_events() if e["node_id"] == node]
        if legacy != [e["legacy_id"] for e in plan.events]:
            raise BadInput(
                f"{layout.log_file} already holds {own['seq']} events of {node} that are not "
                "this migration's: migrate into a root that has published nothing yet"
            )
    signer = Signer(layout.private_key_file)
    report = plan.report
    clock = 0 if own["seq"] else log.committed().clock
    prev = None
    new_ids: dict[str, str] = {}
    envelopes: list[Envelope] = []
    lengths: list[int] = []
    for seq, old in enumerate(plan.events, 1):
        clock += 1
        body: Envelope = {
            "v": FORMAT_VERSION,
            "node_id": node,
            "seq": seq,
            "clock": clock,
            "timestamp": old["timestamp"],
            "topic": old["topic"],
            "event_type": old["event_type"],
            "source": old["source"],
            "payload": old["payload"],
            "legacy_id": old["legacy_id"],
        }
        if prev is not None:
            body["prev"] = prev
        cause = old["cause"]
        if cause is not None:
            if cause in new_ids:
                body["causation_id"] = new_ids[cause]
                report.causes_mapped += 1
            else:
                body["legacy_causation_id"] = cause
                report.causes_legacy += 1
        body["event_id"] = compute_event_id(body)
        body["sig"] = signer(body["event_id"])
        prev = body["event_id"]
        new_ids[old["legacy_id"]] = prev
        envelopes.append(body)
        lengths.append(len(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)) + 1)
    return envelopes, lengths


def _write_cursor(
    layout: Layout, log: EventLog, envelopes: list[Envelope], lengths: list[int], handled: int
) -> None:
    """The dispatcher's cursor just past the last handled event. Written before the events
    are appended: until they are, the dispatcher refuses a cursor that names an event its
    log lacks, so it can never run over the handled ones."""
    if handled == 0:
        return
    tail = log.committed()
    offset = tail.log_size + sum(lengths[: handled - 1])
    state = {
        "version": DISPATCH_STATE_VERSION,
        "offset": offset + lengths[handled - 1],
        "check": {"offset": offset, "event_id": envelopes[handled - 1]["event_id"]},
        "dispatched": tail.count + handled,
        "pending": [],
        "breakers": {},
        "lagging": {},
        "stats": {},
    }
    atomic_write_json(layout.state_dir / "dispatch_cursor.json", state)
