"""Node identity: `mesh-init`, the Ed25519 key pair, the manifest and the .gitignore block.

Manifests (`<ledger>/nodes/<node_id>.json`) arrive through git, so every read of one goes
through `load_manifest` (no symlink followed, a regular file of at most 1 MiB, a node id
name). This node is the authority on its own manifest: when the ledger's copy is not a
sound file (a symlink, a folder, a special file, oversized, unparseable, missing), it is
replaced by a fresh one built from what the node knows (identity, key history from its
own log, head from its export state), and a warning says so.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .envelope import NODE_ID_RE, normalise_node_id, now_timestamp
from .errors import BadInput, NotInitialised, OperationFailed
from .fsutil import (
    FileLock,
    UnsafeFile,
    atomic_write_bytes,
    atomic_write_json,
    dump_json_pretty,
    plain_folder,
    read_json,
    read_regular,
    utf8_name,
)
from .paths import ENV_NODE_ID, Layout

CAPABILITY_RE = re.compile(r"[a-z0-9][a-z0-9._:-]{0,62}")
MAX_MANIFEST_BYTES = 1024 * 1024
# trust.ROTATION, the key rotation event; spelled out here because trust imports this module
ROTATION = ("mesh", "trust.key_rotated")
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
        from nacl.signing import SigningKey

        layout.keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        seed = bytes(SigningKey.generate())
        atomic_write_bytes(
            layout.private_key_file, f"ed25519:{b64url(seed)}\n".encode(), mode=0o600
        )
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
    """Set top-level manifest fields (head, lanes); write only when something changed. A
    manifest that is not a sound file is replaced (see `own_manifest`)."""
    with FileLock(layout.locks_dir / "manifest.lock"):  # dispatch (lanes) vs export (head)
        manifest, raw, problem = _own_locked(layout, node_id)
        rendered = dump_json_pretty({**manifest, **fields})
        if problem is None and rendered == raw:
            return False
        _write_manifest(layout.manifest_file(node_id), rendered)
        return True


def own_manifest(layout: Layout, node_id: str) -> tuple[dict[str, Any], str | None]:
    """This node's manifest. If the ledger's copy is not a sound file (a symlink, a folder,
    a special file, oversized, unparseable, someone else's, missing), it is replaced now by
    a fresh one from what the node knows, and the reason is returned (else None)."""
    with FileLock(layout.locks_dir / "manifest.lock"):
        manifest, _, problem = _own_locked(layout, node_id)
        if problem is not None:
            _write_manifest(layout.manifest_file(node_id), dump_json_pretty(manifest))
        return manifest, problem


def _own_locked(layout: Layout, node_id: str) -> tuple[dict[str, Any], bytes, str | None]:
    """(manifest, its bytes, None) when sound; (a fresh manifest, b"", reason) otherwise.
    Caller holds the manifest lock and writes the fresh one."""
    manifest, raw, problem = _read_own(layout, node_id)
    if manifest is not None:
        return manifest, raw, None
    identity = load_identity(layout, {})
    fresh = fresh_manifest(layout, identity, public_key_text(layout))
    assert problem is not None
    _warn_replaced(layout, layout.manifest_file(node_id), problem)
    return fresh, b"", problem


def _nodes_folder(layout: Layout) -> Path:
    """The nodes/ folder, made if missing; refuses one that is a symlink or not a folder,
    since writing our manifest there would write outside the ledger."""
    try:
        return plain_folder(layout.ledger_dir, ("nodes",), create=True)
    except UnsafeFile as exc:
        raise OperationFailed(
            f"refusing to write the manifest: {layout.relative(exc.path)} {exc.message} "
            "(it came through git; remove it)"
        ) from None


def _read_own(layout: Layout, node_id: str) -> tuple[dict[str, Any] | None, bytes, str | None]:
    """(manifest, its bytes, None) or (None, b"", why it cannot be used)."""
    _nodes_folder(layout)
    path = layout.manifest_file(node_id)
    try:
        raw = read_regular(path, MAX_MANIFEST_BYTES)
        return parse_manifest(raw, node_id), raw, None
    except FileNotFoundError:
        return None, b"", "is missing"
    except BadInput as exc:
        return None, b"", exc.message
    except OSError as exc:
        return None, b"", f"is unreadable ({exc.strerror or exc})"


def _write_manifest(path: Path, rendered: bytes) -> None:
    """Atomically put `rendered` at `path`: a symlink or special file there is replaced
    itself (never written through); a folder there (our own name, pushed by someone else)
    is removed first."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)  # a real folder: rmtree never follows a symlink inside it
    except FileNotFoundError:
        pass
    atomic_write_bytes(path, rendered)


def _warn_replaced(layout: Layout, path: Path, problem: str) -> None:
    if problem == "is missing":
        return
    sys.stderr.write(
        f"orxaq-autonomy: warning: this node's manifest {layout.relative(path)} {problem}; "
        "replaced it with a fresh one from the node's own state\n"
    )


def fresh_manifest(layout: Layout, identity: Identity, public_key: str) -> dict[str, Any]:
    """A manifest from what the node knows without the ledger: its identity, its current
    key and the keys its own log says it rotated from, and the head its export state
    records. Lanes come back with the next dispatch."""
    return _render_manifest(
        identity,
        public_key,
        _exported_head(layout),
        [],
        _key_history(layout, identity.node_id, public_key),
    )


def _exported_head(layout: Layout) -> dict[str, Any]:
    try:
        state = read_json(layout.state_dir / "export_seen.json")
        if isinstance(state.get("seq"), int) and state["seq"] > 0:
            return {"seq": state["seq"], "event_id": state["event_id"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {"seq": 0}


def _key_history(layout: Layout, node_id: str, public_key: str) -> list[dict[str, Any]]:
    """[{public_key, from_seq}] from this node's key rotation events in its own log (a
    full read of the log, done only when the manifest has to be rebuilt)."""
    marker = f'"event_type":"{ROTATION[1]}"'.encode()
    rotations: list[tuple[int, str, str]] = []
    try:
        with open(layout.log_file, "rb") as fh:
            for line in fh:
                if marker not in line:
                    continue
                try:
                    env = orjson.loads(line)
                    if env["node_id"] != node_id or (env["topic"], env["event_type"]) != ROTATION:
                        continue
                    payload = env["payload"]
                    rotations.append(
                        (env["seq"], str(payload["previous_key"]), str(payload["public_key"]))
                    )
                except (ValueError, KeyError, TypeError):
                    continue
    except FileNotFoundError:
        pass
    keys: list[dict[str, Any]] = []
    for seq, previous, new in sorted(rotations):
        if not keys:
            keys.append({"public_key": previous, "from_seq": 1})
        keys.append({"public_key": new, "from_seq": seq + 1})
    return keys or [{"public_key": public_key, "from_seq": 1}]


# --- reading manifests that arrived through git -------------------------------------------


def manifest_node(name: str) -> str | None:
    """The node id a file name under nodes/ stands for, or None if it is not
    `<node_id>.json` (checked before anything is opened)."""
    stem, dot, ext = name.rpartition(".")
    if dot and ext == "json" and NODE_ID_RE.fullmatch(stem):
        return stem
    return None


def list_manifests(layout: Layout) -> tuple[list[tuple[str, Path]], list[tuple[Path, str]]]:
    """The well-named manifests under nodes/ as (node_id, path), sorted, and everything
    else that is there as (path, why it is odd). Nothing is opened. Dot files (a writer's
    temporary file) are left alone."""
    good: list[tuple[str, Path]] = []
    odd: list[tuple[Path, str]] = []
    try:
        folder = plain_folder(layout.ledger_dir, ("nodes",))
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return good, odd
    except UnsafeFile as exc:
        return good, [(exc.path, exc.message)]
    except OSError as exc:
        return good, [(layout.nodes_dir, f"is unreadable ({exc.strerror or exc})")]
    for name in names:
        path = folder / name
        if not utf8_name(name):
            odd.append((path, "has a name that is not valid UTF-8"))
        elif name.startswith("."):
            continue
        elif (node := manifest_node(name)) is None:
            odd.append((path, "is not named <node_id>.json"))
        else:
            good.append((node, path))
    return good, odd


def parse_manifest(raw: bytes, node_id: str) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadInput(f"is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("node_id") != node_id:
        raise BadInput(f"must be a JSON object whose node_id is {node_id!r}")
    head = data.get("head", {})
    if not isinstance(head, dict) or not isinstance(head.get("seq", 0), int):
        raise BadInput("head must be an object with an integer seq")
    return data


def load_manifest(path: Path) -> dict[str, Any]:
    """One manifest from the ledger: named `<node_id>.json`, a regular file (no symlink
    followed) of at most MAX_MANIFEST_BYTES, a JSON object with that node_id and a head
    with an integer seq. Raises BadInput (UnsafeFile for the file itself) saying what is
    wrong, FileNotFoundError, or OSError."""
    node = manifest_node(path.name) if utf8_name(path.name) else None
    if node is None:
        raise BadInput("is not named <node_id>.json")
    return parse_manifest(read_regular(path, MAX_MANIFEST_BYTES), node)
