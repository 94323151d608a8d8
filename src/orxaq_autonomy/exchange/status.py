"""The exchange as `mesh-status` shows it: from the state file the listener rewrites every
second (the status command never talks to the server)."""

from __future__ import annotations

import os
import time
from typing import Any

from ..errors import BadInput
from ..store.fsutil import read_json
from ..store.paths import Layout
from .listener import nats_config, state_path

STALE_SECONDS = 5.0  # a listener that has not written for this long is not running


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exchange_status(layout: Layout) -> dict[str, Any] | None:
    """None when `[nats]` is not configured and no listener ever ran."""
    try:
        configured = nats_config(layout)
    except BadInput:
        configured = None
    try:
        state = dict(read_json(state_path(layout)))
    except (FileNotFoundError, ValueError, TypeError):
        state = {}
    if not state and (configured is None or not configured.enabled):
        return None
    fresh = (
        bool(state.get("running"))
        and time.time() - float(state.get("updated_at", 0)) < STALE_SECONDS
        and _alive(state.get("pid"))
    )
    return {
        "url": state.get("url") or (configured.url if configured else None),
        "stream": state.get("stream") or (configured.stream if configured else None),
        "running": fresh,
        "connected": fresh and bool(state.get("connected")),
        "published_seq": state.get("published", {}).get("seq", 0),
        "unpublished": state.get("unpublished"),
        "stream_position": state.get("stream_position", {}),
        "consumer": state.get("consumer", {}),
        "lag": state.get("lag"),
        "counts": state.get("counts", {}),
        "last_error": state.get("last_error"),
        "updated_at": state.get("updated_at"),
    }
