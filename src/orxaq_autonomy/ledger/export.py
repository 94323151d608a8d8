"""Export: this node's new events into its outbox folder, and its manifest head moved."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..envelope import Envelope
from ..errors import BadInput, OperationFailed
from ..store.fsutil import (
    FileLock,
    UnsafeFile,
    atomic_write_bytes,
    atomic_write_json,
    dump_json_pretty,
    fsync_dir,
    plain_folder,
    read_json,
    read_regular,
)
from ..store.manifest import (
    load_manifest,
    own_manifest,
    update_manifest,
)
from ..store.node import Node
from ..store.paths import Layout
from .files import Problem, Progress, bucket_of, no_progress

FSYNC_BATCH = 256  # files written before their fsyncs: the disk takes them together
FSYNC_THREADS = 16


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
    mesh: Node, max_events: int | None = None, progress: Progress = no_progress
) -> ExportReport:
    """Write this node's new events to its outbox and move its manifest head."""
    with FileLock(mesh.layout.locks_dir / "export.lock", timeout=3600):
        return _export(mesh, max_events, progress)


def _export(mesh: Node, max_events: int | None, progress: Progress) -> ExportReport:
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
