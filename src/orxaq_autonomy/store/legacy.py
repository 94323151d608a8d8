"""What this mesh knows of the orxaq-ops format it replaces (docs/migration.md).

orxaq-ops wrote the same log path as this mesh, one envelope a line without `v`, `seq`,
`clock` or `sig`, with `event_id` = `evt_` + 20 hex digits of SHA-256 over
`{node_id, topic, event_type, payload, event_ts, causation_id}` (Python's json.dumps,
sorted keys, compact separators, ASCII escapes). Its outbox files are named
`evt_<20 hex>.json`, directly in `outbox/<node_id>/`.

Only the first line of a log is looked at to tell the formats apart: the log is
append-only and one node's log is written by one format.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import orjson

LEGACY_ID_RE = re.compile(r"evt_[0-9a-f]{20}")
LEGACY_FILE_RE = re.compile(r"evt_[0-9a-f]{20}\.json")
MIGRATED_DIR = "migrated-from-orxaq-ops"
_PEEK_BYTES = 64 * 1024 * 1024  # an envelope is at most 1 MiB; a first line beyond this is not one


def first_line(path: Path) -> bytes | None:
    """The first line of `path` (without its newline), or None when there is none."""
    try:
        with open(path, "rb") as fh:
            line = fh.readline(_PEEK_BYTES)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    return line.rstrip(b"\n") or None


def is_legacy_event(data: Any) -> bool:
    """Whether `data` is an orxaq-ops envelope: an old id and no format version."""
    return (
        isinstance(data, dict)
        and "v" not in data
        and isinstance(data.get("event_id"), str)
        and LEGACY_ID_RE.fullmatch(data["event_id"]) is not None
    )


def is_legacy_log(path: Path) -> bool:
    """Whether the log at `path` was written by orxaq-ops (judged by its first line)."""
    line = first_line(path)
    if line is None:
        return False
    try:
        return is_legacy_event(orjson.loads(line))
    except orjson.JSONDecodeError:
        return False


def legacy_event_id(event: dict[str, Any]) -> str:
    """The id orxaq-ops gave `event`: its content rule, byte for byte (json, not orjson:
    the ASCII escapes and separators are part of the hash)."""
    body = {
        "node_id": event.get("node_id"),
        "topic": event.get("topic"),
        "event_type": event.get("event_type"),
        "payload": event.get("payload"),
        "event_ts": event.get("timestamp"),
        "causation_id": event.get("causation_id", ""),
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return "evt_" + hashlib.sha256(text.encode()).hexdigest()[:20]


def refuse_message(log: Path, root: Path | None = None) -> str:
    where = f" --root {root}" if root is not None else ""
    return (
        f"{log} is an orxaq-ops log: run `orxaq-autonomy{where} mesh-migrate` "
        "(with --dry-run first to see what it would do) to make this root a node of this mesh"
    )
