"""orxaq event mesh: a decentralized, git-backed event mesh for fleets of machines.

The public API is re-exported here lazily, so `orxaq-autonomy --help` and shell completion
do not pay for imports they never use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Mesh": "mesh",
    "Draft": "envelope",
    "Envelope": "envelope",
    "compute_event_id": "envelope",
    "parse_envelope": "envelope",
    "canonical_bytes": "envelope",
    "Pattern": "patterns",
    "matches": "patterns",
    "MeshError": "errors",
    "BadInput": "errors",
    "OperationFailed": "errors",
    "Appended": "store.log",
}

__all__ = [
    "Appended",
    "BadInput",
    "Draft",
    "Envelope",
    "Mesh",
    "MeshError",
    "OperationFailed",
    "Pattern",
    "canonical_bytes",
    "compute_event_id",
    "matches",
    "parse_envelope",
]

if TYPE_CHECKING:
    from .envelope import Draft, Envelope, canonical_bytes, compute_event_id, parse_envelope
    from .errors import BadInput, MeshError, OperationFailed
    from .mesh import Mesh
    from .patterns import Pattern, matches
    from .store.log import Appended


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)
