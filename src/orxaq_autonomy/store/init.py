"""`mesh-init`: the layout, identity, key pair, manifest, config and .gitignore of a node."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..envelope import normalise_node_id, now_timestamp
from ..errors import BadInput
from .fsutil import (
    FileLock,
    atomic_write_bytes,
    dump_json_pretty,
)
from .identity import (
    Identity,
    _write_identity,
    check_capability,
    default_node_id,
    load_identity,
    public_key_text,
)
from .keys import new_key_text
from .legacy import is_legacy_log, refuse_message
from .manifest import (
    _nodes_folder,
    _read_own,
    _render_manifest,
    _warn_replaced,
    _write_manifest,
    fresh_manifest,
)
from .paths import Layout

GITIGNORE_MARK = "# orxaq-autonomy: node-private event mesh files (the ledger stays tracked)"


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


def init_node(
    layout: Layout,
    node_id: str | None = None,
    capabilities: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> InitResult:
    """Create (or complete) the layout for one node. Rerunning changes nothing that exists;
    new capabilities are added to the identity and the manifest."""
    env = os.environ if env is None else env
    if is_legacy_log(layout.log_file):  # before anything is written: mesh-migrate takes it
        raise BadInput(refuse_message(layout.log_file, layout.root))
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
    for path in (layout.log_file.parent, layout.quarantine_dir):
        path.mkdir(parents=True, exist_ok=True)
    layout.ledger_dir.mkdir(parents=True, exist_ok=True)
    _nodes_folder(layout)

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
        layout.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_bytes(layout.private_key_file, new_key_text(), mode=0o600)
        created.append(layout.relative(layout.private_key_file))
    public_key = public_key_text(layout)

    manifest_path = layout.manifest_file(identity.node_id)
    with FileLock(layout.locks_dir / "manifest.lock"):
        existing, raw, problem = _read_own(layout, identity.node_id)
        if existing is None:
            manifest = fresh_manifest(layout, identity, public_key)
        else:
            manifest = _render_manifest(
                identity,
                public_key,
                existing.get("head", {"seq": 0}),
                existing.get("lanes", []),
                existing.get("keys", [{"public_key": public_key, "from_seq": 1}]),
            )
        rendered = dump_json_pretty(manifest)
        if problem == "is missing":
            _write_manifest(manifest_path, rendered)
            created.append(layout.relative(manifest_path))
        elif problem is not None:
            _write_manifest(manifest_path, rendered)
            _warn_replaced(layout, manifest_path, problem)
            updated.append(layout.relative(manifest_path))
        elif raw != rendered:
            _write_manifest(manifest_path, rendered)
            updated.append(layout.relative(manifest_path))

    config_file = layout.state_dir / "config.toml"
    if not config_file.exists():
        from ..config import TEMPLATE

        atomic_write_bytes(config_file, TEMPLATE.encode())
        created.append(layout.relative(config_file))

    gitignore = _ensure_gitignore(layout)
    if gitignore == "created":
        created.append(".gitignore")
    elif gitignore == "updated":
        updated.append(".gitignore")

    from .log import EventLog

    if not layout.index_file.exists():
        log = EventLog(layout.log_file, layout.index_file, layout.log_lock, layout.quarantine_dir)
        log.committed()
        log.close()
        created.append(layout.relative(layout.index_file))
    return InitResult(identity.node_id, str(layout.root), public_key, created, updated)


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
