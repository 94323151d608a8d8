"""The ledger: the git-tracked folder through which nodes exchange events.

    <ledger>/nodes/<node_id>.json                         manifest, with head {seq, event_id}
    <ledger>/outbox/<node_id>/<bucket>/<event_id>.json    one pretty JSON file per event

`bucket` is `(seq - 1) // 1000`, six digits (`000000` holds seq 1-1000), so no folder grows
past 1,000 files and an import lists only the buckets at or after what it already has.
Event files directly in `outbox/<node_id>/` are read too.

Everything here arrived through git and may be hostile. Names are checked before anything
is opened (`<node_id>.json`, `evt_<64 hex>.json` or the orxaq-ops `evt_<20 hex>.json`,
six-digit buckets, valid UTF-8); files are read only through `fsutil.read_regular` (no
symlink followed, regular files of bounded size); folders are checked with lstat, never
followed. Anything odd is reported as a Problem, named printably, and skipped.

This module knows files, not git: `sync.py` moves the folder between nodes.
Costs grow with new events only: export resumes from a byte offset in the log; import
compares each manifest's head with the author's last seq in the local log and reads
nothing for a node that has nothing new.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .config import load_config
from .envelope import EVENT_ID_RE, NODE_ID_RE, Envelope, check_envelope
from .errors import BadInput, OperationFailed
from .fsutil import (
    FileLock,
    UnsafeFile,
    atomic_write_bytes,
    atomic_write_json,
    dump_json_pretty,
    file_kind,
    fsync_dir,
    plain_folder,
    printable,
    read_json,
    read_regular,
    utf8_name,
)
from .mesh import Mesh
from .node import list_manifests, load_manifest, manifest_node, own_manifest, update_manifest
from .paths import Layout
from .trust import Keyring

BUCKET_SIZE = 1000
BUCKET_RE = re.compile(r"[0-9]{6}")
# this format's event ids, and orxaq-ops ones (reported by the envelope check, not by name)
EVENT_FILE_RE = re.compile(r"evt_(?:[0-9a-f]{64}|[0-9a-f]{20})\.json")
MAX_FILE_BYTES = 4 * 1024 * 1024
FSYNC_BATCH = 256  # files written before their fsyncs: the disk takes them together
FSYNC_THREADS = 16
NOT_UTF8 = "has a name that is not valid UTF-8"
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
    repaired: list[dict[str, str]] = field(default_factory=list)  # own manifest replaced

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
    report = ExportReport()
    touched: set[str] = set()  # folders whose entries this export changed: fsynced
    outbox = str(layout.outbox_dir(mesh.node_id))
    with contextlib.suppress(FileNotFoundError):  # made with its first bucket
        _own_folder(layout, ("outbox", mesh.node_id), touched, create=False)
    manifest, problem = own_manifest(layout, mesh.node_id)  # never read through a symlink
    if problem is not None and problem != "is missing":
        report.repaired.append(
            Problem(
                layout.relative(layout.manifest_file(mesh.node_id)),
                f"{problem}; replaced it with a fresh one from this node's own state",
            ).as_dict()
        )
    head = manifest.get("head", {})
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
    offset = state["offset"]
    made: set[str] = set()  # bucket folders checked (or made) this run
    unsynced: list[int] = []  # written files, open until fsynced
    last: Envelope | None = None
    try:
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
            bucket = bucket_of(env["seq"])
            folder = os.path.join(outbox, bucket)
            if folder not in made:
                _own_folder(layout, ("outbox", mesh.node_id, bucket), touched)
                made.add(folder)
            fd = _write_once(os.path.join(folder, env["event_id"] + ".json"), dump_json_pretty(env))
            if fd is not None:
                unsynced.append(fd)
                touched.add(folder)
                if len(unsynced) >= FSYNC_BATCH:
                    _fsync_close(unsynced)
            report.exported += 1
            report.first_seq = report.first_seq or env["seq"]
            report.last_seq = env["seq"]
            last = env
            progress(1)
        # the files, then the folders that name them, are on disk before the head moves:
        # exactly what this export wrote, not every dirty page of the machine (os.sync)
        _fsync_close(unsynced)
    finally:
        for fd in unsynced:
            os.close(fd)
    for folder in sorted(touched, key=len, reverse=True):
        fsync_dir(folder)
    if last is not None:
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
    try:
        report.head = load_manifest(layout.manifest_file(mesh.node_id)).get("head", {})
    except (BadInput, OSError):
        report.head = head
    return report


def _own_folder(
    layout: Layout, parts: tuple[str, ...], touched: set[str], create: bool = True
) -> str:
    """A folder of this node's outbox, made if missing (with `create`; else
    FileNotFoundError). Each component from the ledger folder down must be a real folder:
    a symlink that git brought (to anywhere) or a file there stops the export before it
    writes anything through it."""
    created: list[Path] = []
    try:
        folder = plain_folder(layout.ledger_dir, parts, create=create, created=created)
    except UnsafeFile as exc:
        raise OperationFailed(
            f"refusing to export: {layout.relative(exc.path)} {exc.message}; it came "
            "through git and this node writes only into real folders (remove it, then "
            "export again); nothing was written through it"
        ) from None
    touched.update(str(path.parent) for path in created)
    return str(folder)


def _fsync_close(fds: list[int]) -> None:
    """fsync and close every descriptor in `fds` (emptied as they are closed). A batch is
    fsynced from a few threads at once: the file system commits their journal entries
    together, which is 3x faster than one fsync after another for a big export."""
    if len(fds) > 8:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(FSYNC_THREADS) as pool:
            list(pool.map(os.fsync, fds))
    else:
        for fd in fds:
            os.fsync(fd)
    while fds:
        os.close(fds.pop())


def _write_once(path: str, data: bytes) -> int | None:
    """Create `path` with `data` and return its open descriptor (the caller fsyncs and
    closes it), or None when an identical file is already there. Anything else at that
    name (an export interrupted before it saved its state runs again over the same
    events; or a symlink, folder or FIFO someone pushed into our outbox) is replaced
    atomically and durably, never written through."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        try:
            if read_regular(path, len(data)) == data:
                return None
        except UnsafeFile:
            pass
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)  # a real folder at our own file's name
        except FileNotFoundError:
            pass
        atomic_write_bytes(Path(path), data)
        return None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


# --- reading and checking ledger files -------------------------------------------------


@dataclass
class Problem:
    path: str
    reason: str

    def __post_init__(self) -> None:
        # one printable line each, whatever bytes a hostile name or message carried
        self.path = printable(self.path)
        self.reason = printable(self.reason)

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


def _reason(exc: Exception) -> str:
    if isinstance(exc, BadInput):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # str(exc) repeats the path, which the Problem names already
    return str(exc)


def _event_file_place(parts: tuple[str, ...]) -> bool:
    """Whether `parts` (below outbox/<node>/) is `<event file>` or `<bucket>/<event file>`."""
    if len(parts) == 2 and BUCKET_RE.fullmatch(parts[0]):
        parts = parts[1:]
    return len(parts) == 1 and event_name_problem(parts[0]) is None


def event_name_problem(name: str) -> str | None:
    """Why `name` cannot be an event file's name, or None."""
    if not utf8_name(name):
        return NOT_UTF8
    if not EVENT_FILE_RE.fullmatch(name):
        return "is not named evt_<64 hex digits>.json (nor an orxaq-ops event id)"
    return None


def read_event_file(path: Path, folder_node: str) -> Envelope:
    """Parse and check one ledger file; BadInput names what is wrong with it (UnsafeFile
    when it is not a regular file of at most MAX_FILE_BYTES: nothing is followed)."""
    odd = event_name_problem(path.name)
    if odd is not None:
        raise BadInput(odd)
    raw = read_regular(path, MAX_FILE_BYTES)
    try:
        env = orjson.loads(raw)
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


def event_files(
    node_dir: Path, from_bucket: str | None = None
) -> Iterator[tuple[Path, str | None]]:
    """What one node's outbox holds: (path, None) for each well-named event file (loose or
    in a six-digit bucket), (path, why) for anything else. With `from_bucket`, our earlier
    buckets are skipped by name, without a stat. Names are sorted as strings: a big
    outbox has hundreds of buckets. Nothing is opened; a bucket is listed only when lstat
    says it is a real folder. The caller has checked `node_dir` (see `plain_folder`)."""
    try:
        names = sorted(os.listdir(node_dir))
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        entry = node_dir / name
        if not utf8_name(name) or not BUCKET_RE.fullmatch(name):
            yield entry, event_name_problem(name)
            continue
        if from_bucket and name < from_bucket:
            continue
        try:
            mode = os.lstat(entry).st_mode
            if not stat.S_ISDIR(mode):
                yield entry, f"is {file_kind(mode)}, not a plain folder"
                continue
            inner = sorted(os.listdir(entry))
        except FileNotFoundError:
            continue
        except OSError as exc:
            yield entry, f"is unreadable ({exc.strerror or exc})"
            continue
        for sub in inner:
            yield entry / sub, event_name_problem(sub)


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest from the ledger (see node.load_manifest: named `<node_id>.json`, a
    regular file of at most 1 MiB, never followed through a symlink)."""
    return load_manifest(path)


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
    manifests, odd = list_manifests(layout)
    report.rejected.extend(Problem(rel(path), why) for path, why in odd)
    keyring = Keyring(
        layout.ledger_dir,
        layout.state_dir / "trust_pins.json",
        load_config(layout.state_dir / "config.toml").trust.policy_keys,
        history=lambda node: (e for e in mesh.log.iter_events() if e["node_id"] == node),
    )
    if keyring.policy_problem:
        report.rejected.append(
            Problem(rel(layout.ledger_dir / "trust.json"), keyring.policy_problem)
        )
    forks: list[tuple[str, Envelope, Path]] = []
    for node, manifest_path in manifests:
        if node == mesh.node_id or budget == 0:
            continue
        try:
            manifest = read_manifest(manifest_path)
        except (BadInput, OSError) as exc:
            report.rejected.append(Problem(rel(manifest_path), _reason(exc)))
            continue
        have = heads.get(node, {"seq": 0, "event_id": None})
        if manifest.get("head", {}).get("seq", 0) <= have["seq"]:
            continue  # nothing new: no file of this node is read
        try:
            key = keyring.start(node, manifest, have["seq"])
        except BadInput as exc:
            report.rejected.append(Problem(rel(manifest_path), exc.message))
            continue
        try:
            node_dir = plain_folder(layout.ledger_dir, ("outbox", node))
        except FileNotFoundError:
            continue  # its files have not arrived yet
        except UnsafeFile as exc:
            report.rejected.append(Problem(rel(exc.path), exc.message))
            continue
        except OSError as exc:
            report.rejected.append(Problem(rel(layout.outbox_dir(node)), _reason(exc)))
            continue
        candidates: dict[int, list[Envelope]] = {}
        for path, odd_name in event_files(node_dir, bucket_of(have["seq"] + 1)):
            if odd_name is not None:
                report.rejected.append(Problem(rel(path), odd_name))
                continue
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
        (
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
        ),
        system=True,
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
    policy_keys: Iterable[str] = (),
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
        try:
            names = sorted(os.listdir(plain_folder(layout.ledger_dir, ("outbox",))))
        except FileNotFoundError:
            names = []
        except UnsafeFile as exc:
            names = []
            report.problems.append(Problem(rel(exc.path), exc.message))
        for name in names:
            if utf8_name(name) and NODE_ID_RE.fullmatch(name):
                nodes.add(name)
            else:
                report.problems.append(
                    Problem(
                        rel(outbox / name),
                        NOT_UTF8 if not utf8_name(name) else "is not named like a node id",
                    )
                )
        manifests, odd = list_manifests(layout)
        nodes.update(node for node, _ in manifests)
        report.problems.extend(Problem(rel(path), why) for path, why in odd)
    else:
        outbox_parts = Path(rel(outbox)).parts
        nodes_parts = Path(rel(layout.nodes_dir)).parts
        for path, status in sorted(changed.items()):
            if path.startswith('"'):  # git quotes names that are not plain ASCII
                if status[0] != "D":
                    report.problems.append(
                        Problem(path, "has a name that is not plain ASCII; no ledger name is")
                    )
                continue
            parts = Path(path).parts
            if parts[: len(outbox_parts)] == outbox_parts and len(parts) > len(outbox_parts):
                node, inside = parts[len(outbox_parts)], parts[len(outbox_parts) + 1 :]
                if not NODE_ID_RE.fullmatch(node):
                    if status[0] != "D":
                        report.problems.append(Problem(path, "is not under a node id folder"))
                    continue
                nodes.add(node)
                if status[0] in "MDRT" and path.endswith(".json"):
                    verb = {"M": "modified", "D": "deleted", "R": "renamed", "T": "retyped"}
                    report.problems.append(
                        Problem(path, f"was {verb[status[0]]}: published events are immutable")
                    )
                elif status[0] != "D" and not _event_file_place(inside):
                    report.problems.append(
                        Problem(path, "is not <node>/[<six-digit bucket>/]<event id>.json")
                    )
            elif parts[: len(nodes_parts)] == nodes_parts and len(parts) > len(nodes_parts):
                node_name = manifest_node(parts[-1]) if len(parts) == len(nodes_parts) + 1 else None
                if node_name is not None:
                    nodes.add(node_name)
                elif status[0] != "D":
                    report.problems.append(Problem(path, "is not named <node_id>.json"))
    keyring = Keyring(layout.ledger_dir, None, policy_keys)
    if keyring.policy_problem:
        report.problems.append(
            Problem(rel(layout.ledger_dir / "trust.json"), keyring.policy_problem)
        )
    for node in sorted(nodes):
        report.nodes += 1
        node_dir = outbox / node
        try:
            plain_folder(layout.ledger_dir, ("outbox", node))
        except FileNotFoundError:
            pass
        except UnsafeFile as exc:
            report.problems.append(Problem(rel(exc.path), exc.message))
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
            files: Iterable[tuple[Path, str | None]] = event_files(node_dir)
        else:
            mine = rel(node_dir) + "/"
            files = [
                (layout.root / path, None)
                for path, status in sorted(changed.items())
                if path.startswith(mine) and path.endswith(".json") and status[0] in "AM"
            ]
        by_seq: dict[int, Envelope] = {}
        for file, odd_name in files:
            report.checked += 1
            if odd_name is not None:
                report.problems.append(Problem(rel(file), odd_name))
                continue
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
        if trusted is not None:
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
