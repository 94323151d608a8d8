"""Node identity: `mesh-init`, the Ed25519 key pair, the manifest and the .gitignore block."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .envelope import normalise_node_id, now_timestamp
from .errors import BadInput, NotInitialised
from .fsutil import FileLock, atomic_write_bytes, atomic_write_json, dump_json_pretty, read_json
from .paths import ENV_NODE_ID, Layout

CAPABILITY_RE = re.compile(r"[a-z0-9][a-z0-9._:-]{0,62}")
GITIGNORE_MARK = "# orxaq-autonomy: node-private event mesh files (the ledger stays tracked)"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Identity:
    node_id: str
    capabilities: tuple[str, ...]
    created_at: str


@dataclass
class InitResult:
    node_id: str
    root: str
    public_key: str
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "root": self.root,
            "public_key": self.public_key,
            "created": self.created,
            "updated": self.updated,
        }


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
    from nacl.signing import SigningKey  # lazy: only init and signing need libsodium

    seed = b64url_decode(layout.private_key_file.read_text().strip().removeprefix("ed25519:"))
    return "ed25519:" + b64url(bytes(SigningKey(seed).verify_key))


def _render_manifest(
    identity: Identity,
    public_key: str,
    head: dict[str, Any],
    lanes: list[Any],
    keys: list[Any],
) -> dict[str, Any]:
    return {
        "node_id": identity.node_id,
        "capabilities": list(identity.capabilities),
        "lanes": lanes,
        "public_key": public_key,
        "keys": keys,  # every key this node has signed with, from the seq it took over
        "head": head,
    }


def init_node(
    layout: Layout,
    node_id: str | None = None,
    capabilities: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> InitResult:
    """Create (or complete) the layout for one node. Rerunning changes nothing that exists;
    new capabilities are added to the identity and the manifest."""
    env = os.environ if env is None else env
    wanted_caps = {check_capability(c) for c in capabilities}
    requested = normalise_node_id(node_id) if node_id is not None else None
    if layout.node_file.exists():
        current = load_identity(layout, {} if requested else env)
        if requested and requested != current.node_id:
            raise BadInput(
                f"{layout.root} is already node {current.node_id}; "
                f"refusing to re-initialise it as {requested}"
            )
    for path in (layout.root, layout.state_dir):
        if path.exists() and not path.is_dir():
            raise BadInput(f"{path} exists and is not a directory")

    layout.state_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(layout.locks_dir / "init.lock"):
        result = _init_locked(layout, requested, wanted_caps, env)
    return result


def _init_locked(
    layout: Layout, requested: str | None, wanted_caps: set[str], env: Mapping[str, str]
) -> InitResult:
    created: list[str] = []
    updated: list[str] = []
    for path in (layout.log_file.parent, layout.quarantine_dir, layout.nodes_dir):
        path.mkdir(parents=True, exist_ok=True)

    if layout.node_file.exists():
        identity = load_identity(layout, {})
        merged = tuple(sorted(set(identity.capabilities) | wanted_caps))
        if merged != identity.capabilities:
            identity = Identity(identity.node_id, merged, identity.created_at)
            _write_identity(layout, identity)
            updated.append(layout.relative(layout.node_file))
    else:
        node_id = requested or normalise_node_id(default_node_id(env))
        identity = Identity(node_id, tuple(sorted(wanted_caps)), now_timestamp())
        _write_identity(layout, identity)
        created.append(layout.relative(layout.node_file))

    if not layout.private_key_file.exists():
        from nacl.signing import SigningKey

        layout.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        seed = bytes(SigningKey.generate())
        atomic_write_bytes(
            layout.private_key_file, f"ed25519:{b64url(seed)}\n".encode(), mode=0o600
        )
        created.append(layout.relative(layout.private_key_file))
    public_key = public_key_text(layout)

    manifest_path = layout.manifest_file(identity.node_id)
    head: dict[str, Any] = {"seq": 0}
    lanes: list[Any] = []
    keys: list[Any] = [{"public_key": public_key, "from_seq": 1}]
    if manifest_path.exists():
        existing = read_json(manifest_path)
        head = existing.get("head", head)
        lanes = existing.get("lanes", lanes)
        keys = existing.get("keys", keys)
    manifest = _render_manifest(identity, public_key, head, lanes, keys)
    rendered = dump_json_pretty(manifest)
    if not manifest_path.exists():
        atomic_write_bytes(manifest_path, rendered)
        created.append(layout.relative(manifest_path))
    elif manifest_path.read_bytes() != rendered:
        atomic_write_bytes(manifest_path, rendered)
        updated.append(layout.relative(manifest_path))

    config_file = layout.state_dir / "config.toml"
    if not config_file.exists():
        from .config import TEMPLATE

        atomic_write_bytes(config_file, TEMPLATE.encode())
        created.append(layout.relative(config_file))

    gitignore = _ensure_gitignore(layout)
    if gitignore == "created":
        created.append(".gitignore")
    elif gitignore == "updated":
        updated.append(".gitignore")

    from .log import EventLog  # creates the index, so status works before the first publish

    if not layout.index_file.exists():
        log = EventLog(layout.log_file, layout.index_file, layout.log_lock, layout.quarantine_dir)
        log.committed()
        log.close()
        created.append(layout.relative(layout.index_file))
    return InitResult(identity.node_id, str(layout.root), public_key, created, updated)


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


def _ensure_gitignore(layout: Layout) -> str | None:
    """Ignore the node-private paths; never touch a block that is already there."""
    path = layout.root / ".gitignore"
    existed = path.exists()
    existing = path.read_text() if existed else ""
    if GITIGNORE_MARK in existing:
        return None
    log = layout.log_file
    private = [
        f"/{layout.relative(log)}"
        if log.parent == layout.root
        else f"/{layout.relative(log.parent)}/",
        f"/{layout.relative(layout.state_dir)}/",
    ]
    lines = [GITIGNORE_MARK, *private]
    prefix = existing if not existing or existing.endswith("\n") else existing + "\n"
    separator = "\n" if prefix else ""
    atomic_write_bytes(path, (prefix + separator + "\n".join(lines) + "\n").encode())
    return "updated" if existed else "created"


def update_manifest(layout: Layout, node_id: str, **fields: Any) -> bool:
    """Set top-level manifest fields (head, lanes); write only when something changed."""
    path = layout.manifest_file(node_id)
    with FileLock(layout.locks_dir / "manifest.lock"):  # dispatch (lanes) vs export (head)
        try:
            manifest = read_json(path)
        except FileNotFoundError:
            raise NotInitialised(f"no manifest at {path}: run mesh-init") from None
        rendered = dump_json_pretty({**manifest, **fields})
        if rendered == path.read_bytes():
            return False
        atomic_write_bytes(path, rendered)
        return True
