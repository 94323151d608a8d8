"""Node manifests (`<ledger>/nodes/<node_id>.json`): read safely, written only for
this node, rebuilt from what the node knows when the ledger's copy is unsound."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import orjson

from ..envelope import NODE_ID_RE
from ..errors import BadInput, OperationFailed
from .fsutil import (
    FileLock,
    UnsafeFile,
    atomic_write_bytes,
    dump_json_pretty,
    plain_folder,
    read_json,
    read_regular,
    utf8_name,
)
from .identity import Identity, load_identity, public_key_text
from .keys import ROTATION
from .paths import Layout

MAX_MANIFEST_BYTES = 1024 * 1024


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
