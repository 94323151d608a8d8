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

import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..envelope import NODE_ID_RE, Envelope, check_envelope
from ..errors import BadInput
from ..store.fsutil import (
    file_kind,
    plain_folder,
    printable,
    read_regular,
    utf8_name,
)
from ..store.legacy import is_legacy_event
from ..store.manifest import (
    load_manifest,
)
from ..store.paths import Layout

BUCKET_SIZE = 1000
BUCKET_RE = re.compile(r"[0-9]{6}")
# this format's event ids, and orxaq-ops ones (reported by the envelope check, not by name)
EVENT_FILE_RE = re.compile(r"evt_(?:[0-9a-f]{64}|[0-9a-f]{20})\.json")
MAX_FILE_BYTES = 4 * 1024 * 1024
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
    if is_legacy_event(env):
        raise BadInput(
            f"is an orxaq-ops event: {folder_node} still runs orxaq-ops; its events come "
            f"once {folder_node} runs mesh-migrate"
        )
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


# --- orxaq-ops outboxes ----------------------------------------------------------------

LEGACY_FILE_RE = re.compile(r"evt_[0-9a-f]{20}\.json")


def legacy_outboxes(layout: Layout, skip: str | None = None) -> dict[str, int]:
    """Per node, how many orxaq-ops event files (`evt_<20 hex>.json`, loose in
    `outbox/<node>/`) its folder holds: that node still runs orxaq-ops and waits for its
    mesh-migrate (which moves them away). Names only: nothing is opened or followed."""
    found: dict[str, int] = {}
    try:
        outbox = plain_folder(layout.ledger_dir, ("outbox",))
        nodes = sorted(os.listdir(outbox))
    except (OSError, BadInput):
        return found
    for node in nodes:
        if node == skip or not utf8_name(node) or not NODE_ID_RE.fullmatch(node):
            continue
        try:
            folder = plain_folder(layout.ledger_dir, ("outbox", node))
            count = sum(1 for name in os.listdir(folder) if LEGACY_FILE_RE.fullmatch(name))
        except (OSError, BadInput):
            continue
        if count:
            found[node] = count
    return found
