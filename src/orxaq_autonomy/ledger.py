"""The ledger: the git-tracked folder through which nodes exchange events.

    <ledger>/nodes/<node_id>.json                         manifest, with head {seq, event_id}
    <ledger>/outbox/<node_id>/<bucket>/<event_id>.json    one pretty JSON file per event

`bucket` is `(seq - 1) // 1000`, six digits (`000000` holds seq 1-1000), so no folder grows
past 1,000 files and an import lists only the buckets at or after what it already has.
Files directly in `outbox/<node_id>/` or in other subfolders are read too.

This module knows files, not git: `sync.py` moves the folder between nodes.
Costs grow with new events only: export resumes from a byte offset in the log; import
compares each manifest's head with the author's last seq in the local log and reads
nothing for a node that has nothing new.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .envelope import EVENT_ID_RE, Envelope, check_envelope
from .errors import BadInput, OperationFailed
from .fsutil import FileLock, atomic_write_json, dump_json_pretty, read_json
from .mesh import Mesh
from .node import update_manifest
from .paths import Layout
from .trust import Keyring

BUCKET_SIZE = 1000
BUCKET_RE = re.compile(r"\d{6}")
MAX_FILE_BYTES = 4 * 1024 * 1024
# An imported clock this high would leave the importing node no clock for its own events.
CLOCK_CEILING = 2**63 - 1 - 2**32  # pretty-printed; the envelope itself is checked at 1 MiB
Progress = Callable[[int], None]


def bucket_of(seq: int) -> str:
    return f"{(seq - 1) // BUCKET_SIZE:06d}"


def event_path(layout: Layout, env: Envelope) -> Path:
    return layout.outbox_dir(env["node_id"]) / bucket_of(env["seq"]) / f"{env['event_id']}.json"


def no_progress(_: int) -> None:
    pass


# --- export ----------------------------------------------------------------------------


@dataclass
class ExportReport:
    exported: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def export_events(
    mesh: Mesh, max_events: int | None = None, progress: Progress = no_progress
) -> ExportReport:
    """Write this node's new events to its outbox and move its manifest head."""
    with FileLock(mesh.layout.locks_dir / "export.lock", timeout=3600):
        return _export(mesh, max_events, progress)


def _export(mesh: Mesh, max_events: int | None, progress: Progress) -> ExportReport:
    layout = mesh.layout
    head = mesh.manifests().get(mesh.node_id, {}).get("head", {})
    own = mesh.log.node_heads().get(mesh.node_id, {"seq": 0})
    if head.get("seq", 0) > own["seq"]:
        raise OperationFailed(
            f"the ledger already holds {mesh.node_id} up to seq {head['seq']}, but the local "
            f"log ends at seq {own['seq']}: this node lost its log; restore "
            f"{layout.log_file} or re-init this root under a new node id"
        )
    state_file = layout.state_dir / "export_seen.json"
    try:
        state = read_json(state_file)
    except FileNotFoundError:
        state = {"offset": 0, "seq": 0}
    end = mesh.log.committed().log_size
    mine = f'"node_id":"{mesh.node_id}"'.encode()
    report = ExportReport()
    offset = state["offset"]
    outbox = str(layout.outbox_dir(mesh.node_id))
    made: set[str] = set()
    last: Envelope | None = None
    for line_offset, line in mesh.log.iter_lines(state["offset"], end):
        if max_events is not None and report.exported >= max_events:
            break
        offset = line_offset + len(line)
        if mine not in line:  # cheap: most lines of a busy mesh are other nodes'
            continue
        env: Envelope = orjson.loads(line)
        if env["node_id"] != mesh.node_id or env["seq"] <= state["seq"]:
            continue
        # plain os calls: pathlib cost more than the writing at thousands of files a second
        folder = os.path.join(outbox, bucket_of(env["seq"]))
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        _write_once(os.path.join(folder, env["event_id"] + ".json"), dump_json_pretty(env))
        report.exported += 1
        report.first_seq = report.first_seq or env["seq"]
        report.last_seq = env["seq"]
        last = env
        progress(1)
    if last is not None:
        os.sync()  # the files are on disk before the head says they exist
        head = {"seq": last["seq"], "event_id": last["event_id"]}
        update_manifest(layout, mesh.node_id, head=head)
        state = {"offset": offset, "seq": last["seq"], "event_id": last["event_id"]}
        atomic_write_json(state_file, state)
    else:
        if offset != state["offset"]:
            atomic_write_json(state_file, {**state, "offset": offset})
        if state["seq"] and head.get("seq") != state["seq"]:
            # a manifest written over by a race or by hand: put the exported head back
            update_manifest(
                layout, mesh.node_id, head={"seq": state["seq"], "event_id": state["event_id"]}
            )
    report.head = mesh.manifests().get(mesh.node_id, {}).get("head", {})
    return report


def _write_once(path: str, data: bytes) -> None:
    """Create `path` with `data`; an existing file is rewritten only if it differs (an
    export interrupted before it saved its state runs again over the same events)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        with open(path, "rb") as fh:
            if fh.read() == data:
                return
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# --- reading and checking ledger files -------------------------------------------------


@dataclass
class Problem:
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


def _reason(exc: Exception) -> str:
    return exc.message if isinstance(exc, BadInput) else str(exc)


def read_event_file(path: Path, folder_node: str) -> Envelope:
    """Parse and check one ledger file; BadInput names what is wrong with it."""
    if path.is_symlink():
        raise BadInput("is a symlink; ledger files must be regular files")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise BadInput(f"is {size} bytes; the limit is {MAX_FILE_BYTES}")
    try:
        env = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"is not valid JSON (truncated?): {exc}") from None
    check_envelope(env)
    if len(orjson.dumps(env)) > 1024 * 1024:
        raise BadInput("holds an event over 1 MiB")
    if env["node_id"] != folder_node:
        raise BadInput(f"node_id {env['node_id']!r} does not match its folder {folder_node!r}")
    if path.name != f"{env['event_id']}.json":
        raise BadInput(f"is named {path.name}, but holds {env['event_id']}")
    if env["clock"] > CLOCK_CEILING:
        raise BadInput(f"clock {env['clock']} leaves no room for later events")
    return env  # type: ignore[no-any-return]


def event_files(node_dir: Path, from_bucket: str | None = None) -> Iterator[Path]:
    """Event files of one node's outbox; with `from_bucket`, skip our earlier buckets.
    Names are sorted as strings: a big outbox has hundreds of buckets."""
    if not node_dir.is_dir():
        return
    for name in sorted(os.listdir(node_dir)):
        if from_bucket and BUCKET_RE.fullmatch(name) and name < from_bucket:
            continue  # decided by name: no stat for the buckets already imported
        entry = node_dir / name
        if entry.is_dir() and not entry.is_symlink():
            yield from (entry / f for f in sorted(os.listdir(entry)) if f.endswith(".json"))
        elif name.endswith(".json"):
            yield entry


def read_manifest(path: Path) -> dict[str, Any]:
    if path.is_symlink():
        raise BadInput("is a symlink; ledger files must be regular files")
    try:
        data = read_json(path)
    except ValueError as exc:
        raise BadInput(f"is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("node_id") != path.stem:
        raise BadInput(f"must be a JSON object whose node_id is {path.stem!r}")
    head = data.get("head", {})
    if not isinstance(head, dict) or not isinstance(head.get("seq", 0), int):
        raise BadInput("head must be an object with an integer seq")
    return data


# --- import ----------------------------------------------------------------------------


@dataclass
class ImportReport:
    imported: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # node -> events imported
    waiting: int = 0  # valid events whose predecessor has not arrived yet
    rejected: list[Problem] = field(default_factory=list)
    forks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "nodes": self.nodes,
            "waiting": self.waiting,
            "rejected": [p.as_dict() for p in self.rejected],
            "forks": self.forks,
        }


def import_events(
    mesh: Mesh, max_events: int | None = None, progress: Progress = no_progress
) -> ImportReport:
    """Append new, verified events from the other nodes' outboxes, in each node's seq order."""
    layout = mesh.layout
    report = ImportReport()
    heads = mesh.log.node_heads()
    rel = layout.relative
    budget = max_events if max_events is not None else -1
    manifests = sorted(layout.nodes_dir.glob("*.json")) if layout.nodes_dir.is_dir() else []
    keyring = Keyring(layout.ledger_dir, layout.state_dir / "trust_pins.json")
    forks: list[tuple[str, Envelope, Path]] = []
    for manifest_path in manifests:
        node = manifest_path.stem
        if node == mesh.node_id or budget == 0:
            continue
        try:
            manifest = read_manifest(manifest_path)
        except BadInput as exc:
            report.rejected.append(Problem(rel(manifest_path), exc.message))
            continue
        have = heads.get(node, {"seq": 0, "event_id": None})
        if manifest.get("head", {}).get("seq", 0) <= have["seq"]:
            continue  # nothing new: no file of this node is read
        try:
            key = keyring.start(node, manifest, have["seq"])
        except BadInput as exc:
            report.rejected.append(Problem(rel(manifest_path), exc.message))
            continue
        node_dir = layout.outbox_dir(node)
        if node_dir.is_symlink() or not node_dir.resolve().is_relative_to(
            layout.outbox_root.resolve()
        ):
            report.rejected.append(Problem(rel(node_dir), "is a symlink or leaves the outbox"))
            continue
        candidates: dict[int, list[Envelope]] = {}
        for path in event_files(layout.outbox_dir(node), bucket_of(have["seq"] + 1)):
            if EVENT_ID_RE.fullmatch(path.stem) and mesh.log.contains(path.stem):
                continue
            try:
                env = read_event_file(path, node)
            except (BadInput, OSError) as exc:
                report.rejected.append(Problem(rel(path), _reason(exc)))
                continue
            if env["seq"] <= have["seq"]:
                report.rejected.append(
                    Problem(rel(path), f"fork: {node} seq {env['seq']} is already another event")
                )
                forks.append((node, env, path))
                continue
            candidates.setdefault(env["seq"], []).append(env)
        chain: list[Envelope] = []
        seq, prev = have["seq"], have["event_id"]
        while seq + 1 in candidates and budget != len(chain):
            options = sorted(candidates.pop(seq + 1), key=lambda e: e["event_id"])
            nxt = next((e for e in options if e.get("prev") == prev), None)
            for other in options:
                if other is not nxt:
                    report.rejected.append(
                        Problem(
                            rel(event_path(layout, other)),
                            f"prev does not match {node}'s event at seq {seq}"
                            if nxt is None
                            else f"fork: {node} seq {other['seq']} twice",
                        )
                    )
            if nxt is None:
                break
            try:
                next_key = keyring.check(nxt, key)
            except BadInput as exc:
                report.rejected.append(Problem(rel(event_path(layout, nxt)), exc.message))
                break
            chain.append(nxt)
            key = next_key
            seq, prev = nxt["seq"], nxt["event_id"]
        report.waiting += sum(len(v) for v in candidates.values())
        if chain:
            refused = mesh.log.append_sealed(chain)
            for env, reason in refused:
                report.rejected.append(Problem(rel(event_path(layout, env)), reason))
            count = len(chain) - len(refused)
            report.imported += count
            report.nodes[node] = count
            progress(count)
            if not refused:
                keyring.accepted(node, chain[-1]["seq"], key)
            if budget > 0:
                budget -= count
    keyring.save()
    if forks:
        _record_forks(mesh, forks)
    report.forks = len(forks)
    rejected = {"rejected": [p.as_dict() for p in report.rejected], "forks": len(forks)}
    rejected_file = layout.state_dir / "import_rejected.json"
    if rejected["rejected"] or rejected_file.exists():
        try:
            unchanged = read_json(rejected_file) == rejected
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            atomic_write_json(rejected_file, rejected)
    return report


def _record_forks(mesh: Mesh, forks: list[tuple[str, Envelope, Path]]) -> None:
    """One `mesh.trust.fork_detected` event per refused fork (deduplicated by its id)."""
    mesh.publish_many(
        {
            "topic": "mesh",
            "event_type": "trust.fork_detected",
            "source": "import",
            "payload": {
                "node_id": node,
                "seq": env["seq"],
                "refused": env["event_id"],
                "path": mesh.layout.relative(path),
            },
            "idempotency_key": f"fork:{node}:{env['seq']}:{env['event_id']}",
        }
        for node, env, path in forks
    )


# --- verify ----------------------------------------------------------------------------


@dataclass
class VerifyReport:
    checked: int = 0
    nodes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "nodes": self.nodes,
            "problems": [p.as_dict() for p in self.problems],
        }


def verify_ledger(
    layout: Layout,
    changed: dict[str, str] | None = None,
    base_manifest: Callable[[str], dict[str, Any] | None] | None = None,
) -> VerifyReport:
    """Check every file of the ledger: it parses, its id matches its content, it is in its
    node's folder, holds no secret, and each node's chain is whole (seq 1..N, prev links)
    and matches its manifest's head.

    `changed` (from `--since REV`: path relative to the root -> git status letter) limits
    the check to the files those paths name, and refuses event files that were modified or
    deleted: published events are immutable. `base_manifest(node)` (the manifest at REV)
    says where each node's chain stood, so its new events are checked for continuity and
    signatures from there without reading the files that were already there."""
    report = VerifyReport()
    rel = layout.relative
    outbox = layout.outbox_root
    nodes: set[str] = set()
    if changed is None:
        if outbox.is_dir():
            nodes.update(p.name for p in outbox.iterdir())
        if layout.nodes_dir.is_dir():
            nodes.update(p.stem for p in layout.nodes_dir.glob("*.json"))
    else:
        outbox_parts = Path(rel(outbox)).parts
        nodes_dir = Path(rel(layout.nodes_dir))
        for path, status in sorted(changed.items()):
            parts = Path(path).parts
            if parts[: len(outbox_parts)] == outbox_parts and len(parts) > len(outbox_parts):
                nodes.add(parts[len(outbox_parts)])
                if status[0] in "MDR" and path.endswith(".json"):
                    verb = {"M": "modified", "D": "deleted", "R": "renamed"}[status[0]]
                    report.problems.append(
                        Problem(path, f"was {verb}: published events are immutable")
                    )
            elif Path(path).parent == nodes_dir and path.endswith(".json"):
                nodes.add(Path(path).stem)
    policy_error = None
    try:
        keyring = Keyring(layout.ledger_dir, None)
    except BadInput as exc:
        policy_error = exc.message
        report.problems.append(Problem(rel(layout.ledger_dir / "trust.json"), exc.message))
    for node in sorted(nodes):
        report.nodes += 1
        node_dir = outbox / node
        if node_dir.is_symlink() or (node_dir.exists() and not node_dir.is_dir()):
            report.problems.append(Problem(rel(node_dir), "is not a plain folder"))
            continue
        manifest_path = layout.manifest_file(node)
        manifest: dict[str, Any] | None = None
        try:
            manifest = read_manifest(manifest_path)
        except FileNotFoundError:
            report.problems.append(Problem(rel(manifest_path), "missing manifest"))
        except (BadInput, OSError) as exc:
            report.problems.append(Problem(rel(manifest_path), _reason(exc)))
        base = base_manifest(node) if changed is not None and base_manifest else None
        start_seq = int(base.get("head", {}).get("seq", 0)) if base else 0
        start_id = base.get("head", {}).get("event_id") if base else None
        if changed is None:
            files: Iterable[Path] = event_files(node_dir)
        else:
            mine = rel(node_dir) + "/"
            files = [
                layout.root / path
                for path, status in sorted(changed.items())
                if path.startswith(mine) and path.endswith(".json") and status[0] in "AM"
            ]
        by_seq: dict[int, Envelope] = {}
        for file in files:
            report.checked += 1
            try:
                env = read_event_file(file, node)
            except (BadInput, OSError) as exc:
                report.problems.append(Problem(rel(file), _reason(exc)))
                continue
            if env["seq"] <= start_seq:
                continue  # an old seq rewritten: flagged as modified above
            if env["seq"] in by_seq:
                report.problems.append(
                    Problem(
                        rel(file),
                        f"fork: seq {env['seq']} is also {by_seq[env['seq']]['event_id']}",
                    )
                )
                continue
            by_seq[env["seq"]] = env
        key: str | None = None
        trusted = base or manifest
        if trusted is not None and policy_error is None:
            try:
                key = keyring.start(node, trusted, start_seq)
            except BadInput as exc:
                report.problems.append(Problem(rel(manifest_path), exc.message))
        prev = start_id
        for seq in range(start_seq + 1, max(by_seq, default=start_seq) + 1):
            found = by_seq.get(seq)
            if found is None:
                report.problems.append(Problem(rel(node_dir), f"seq {seq} is missing"))
                prev = None
                continue
            if prev is not None and found.get("prev") != prev:
                report.problems.append(
                    Problem(rel(event_path(layout, found)), f"prev does not match seq {seq - 1}")
                )
            if key is not None:
                try:
                    key = keyring.check(found, key)
                except BadInput as exc:
                    report.problems.append(Problem(rel(event_path(layout, found)), exc.message))
            prev = found["event_id"]
        if manifest is None:
            continue
        head = manifest.get("head", {})
        top = max(by_seq, default=start_seq)
        top_id = by_seq[top]["event_id"] if top in by_seq else start_id
        if head.get("seq", 0) != top or (top and head.get("event_id") != top_id):
            report.problems.append(
                Problem(
                    rel(manifest_path),
                    f"head is seq {head.get('seq', 0)}, but the outbox ends at seq {top}",
                )
            )
    return report


def rejected_count(layout: Layout) -> int:
    try:
        return len(read_json(layout.state_dir / "import_rejected.json").get("rejected", []))
    except FileNotFoundError:
        return 0
