"""Node identity: `mesh-init`, the Ed25519 key pair, the manifest and the .gitignore block.

Manifests (`<ledger>/nodes/<node_id>.json`) arrive through git, so every read of one goes
through `load_manifest` (no symlink followed, a regular file of at most 1 MiB, a node id
name). This node is the authority on its own manifest: when the ledger's copy is not a
sound file (a symlink, a folder, a special file, oversized, unparseable, missing), it is
replaced by a fresh one built from what the node knows (identity, key history from its
own log, head from its export state), and a warning says so.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..envelope import normalise_node_id
from ..errors import BadInput, NotInitialised
from .fsutil import (
    atomic_write_json,
    read_json,
)
from .keys import Signer
from .legacy import is_legacy_log, refuse_message
from .paths import ENV_NODE_ID, Layout

CAPABILITY_RE = re.compile(r"[a-z0-9][a-z0-9._:-]{0,62}")


@dataclass(frozen=True)
class Identity:
    node_id: str
    capabilities: tuple[str, ...]
    created_at: str


def default_node_id(env: Mapping[str, str]) -> str:
    import socket  # lazy: only mesh-init needs the host name

    return env.get(ENV_NODE_ID) or socket.gethostname() or "node"


def check_capability(raw: str) -> str:
    cap = raw.strip().lower()
    if not CAPABILITY_RE.fullmatch(cap):
        raise BadInput(f"bad capability {raw!r}: need 1-63 characters of [a-z0-9._:-]")
    return cap


def load_identity(layout: Layout, env: Mapping[str, str] | None = None) -> Identity:
    """The node this root belongs to; refuses an uninitialised root or a conflicting env id."""
    env = os.environ if env is None else env
    try:
        data = read_json(layout.node_file)
        identity = Identity(data["node_id"], tuple(data["capabilities"]), data["created_at"])
    except FileNotFoundError:
        if is_legacy_log(layout.log_file):
            raise NotInitialised(refuse_message(layout.log_file, layout.root)) from None
        raise NotInitialised(
            f"{layout.root} is not initialised: run `orxaq-autonomy --root {layout.root} mesh-init`"
        ) from None
    except NotADirectoryError:
        raise BadInput(f"{layout.root} is not a directory") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{layout.node_file} is unreadable ({exc}); restore it or re-init") from None
    wanted = env.get(ENV_NODE_ID)
    if wanted and normalise_node_id(wanted) != identity.node_id:
        raise BadInput(
            f"{ENV_NODE_ID}={wanted} but {layout.root} belongs to node {identity.node_id}"
        )
    return identity


def public_key_text(layout: Layout) -> str:
    return Signer(layout.private_key_file).public_key


def _write_identity(layout: Layout, identity: Identity) -> None:
    atomic_write_json(
        layout.node_file,
        {
            "format": 1,
            "node_id": identity.node_id,
            "capabilities": list(identity.capabilities),
            "created_at": identity.created_at,
        },
    )
