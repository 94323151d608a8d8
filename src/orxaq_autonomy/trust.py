"""Trust: Ed25519 signatures on every event, and whose keys to believe.

- Every event a node authors carries `sig = "ed25519:" + base64url(signature over the
  ASCII bytes of its event_id)`. libsodium (PyNaCl's bindings) signs and verifies.
- A node's key is believed from the trust policy in the ledger (`trust.json`, reviewed in
  pull requests) when there is one, else on first use: the first key seen for a node is
  pinned in `state/event_mesh/trust_pins.json`.
- Keys change only through the chain itself: a `mesh.trust.key_rotated` event, signed by
  the current key, names the next one. A reader walks a node's events in seq order and
  switches keys at that event, so a key in a manifest alone can never take over a node.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .envelope import Envelope
from .errors import BadInput
from .fsutil import atomic_write_json, read_json
from .node import b64url, b64url_decode

if TYPE_CHECKING:
    from .mesh import Mesh

ROTATION = ("mesh", "trust.key_rotated")


def _bindings() -> Any:
    import nacl.bindings  # lazy: libsodium loads only when something is signed or checked

    return nacl.bindings


class Signer:
    """Signs event ids with this node's private key."""

    def __init__(self, key_file: Path) -> None:
        text = key_file.read_text().strip()
        seed = b64url_decode(text.removeprefix("ed25519:"))
        public, self._secret = _bindings().crypto_sign_seed_keypair(seed)
        self.public_key = "ed25519:" + b64url(public)
        self._sign = _bindings().crypto_sign

    def __call__(self, event_id: str) -> str:
        return "ed25519:" + b64url(self._sign(event_id.encode("ascii"), self._secret)[:64])


def public_key_bytes(text: str) -> bytes:
    if not isinstance(text, str) or not text.startswith("ed25519:"):
        raise BadInput(f"bad public key {text!r}: need ed25519:<base64url>")
    raw = b64url_decode(text.removeprefix("ed25519:"))
    if len(raw) != 32:
        raise BadInput(f"bad public key {text!r}: need 32 bytes")
    return raw


def fingerprint(public_key: str) -> str:
    return "sha256:" + hashlib.sha256(public_key_bytes(public_key)).hexdigest()


def signature_ok(env: Envelope, public_key: str) -> bool:
    sig = env.get("sig")
    if not isinstance(sig, str) or not sig.startswith("ed25519:"):
        return False
    try:
        signature = b64url_decode(sig.removeprefix("ed25519:"))
        _bindings().crypto_sign_open(
            signature + env["event_id"].encode("ascii"), public_key_bytes(public_key)
        )
    except Exception:  # nacl raises BadSignatureError; bad base64 raises binascii.Error
        return False
    return True


def rotation_target(env: Envelope) -> str | None:
    """The next key, when `env` is a key rotation event."""
    if (env["topic"], env["event_type"]) != ROTATION:
        return None
    key = env["payload"].get("public_key")
    return key if isinstance(key, str) else None


def manifest_key(manifest: dict[str, Any], seq: int) -> str:
    """The key a manifest declares for `seq`: `keys` is [{"public_key", "from_seq"}]."""
    key: Any = manifest.get("public_key")
    entries = manifest.get("keys")
    if isinstance(entries, list):
        usable = [
            e
            for e in entries
            if isinstance(e, dict) and isinstance(e.get("from_seq"), int) and e["from_seq"] <= seq
        ]
        if usable:
            key = max(usable, key=lambda e: e["from_seq"]).get("public_key")
    if not isinstance(key, str):
        raise BadInput(f"manifest of {manifest.get('node_id')} declares no public key")
    public_key_bytes(key)
    return key


@dataclass
class Policy:
    """`trust.json` in the ledger: {"nodes": {"node-a": {"keys": [key or fingerprint]}}}.
    None when the ledger has no policy, which means trust on first use."""

    allowed: dict[str, set[str]]

    @classmethod
    def load(cls, ledger_dir: Path) -> Policy | None:
        path = ledger_dir / "trust.json"
        if not path.exists():
            return None
        try:
            data = read_json(path)
            nodes = data["nodes"]
            return cls({node: set(entry["keys"]) for node, entry in nodes.items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BadInput(f"{path} is not a valid trust policy ({exc})") from None

    def allows(self, node: str, public_key: str) -> bool:
        keys = self.allowed.get(node)
        return keys is not None and (public_key in keys or fingerprint(public_key) in keys)


class Keyring:
    """The key each node's events must be signed with, as of the last event accepted."""

    def __init__(self, ledger_dir: Path, pins_file: Path | None) -> None:
        self.policy = Policy.load(ledger_dir)
        self.pins_file = pins_file
        self.pins: dict[str, dict[str, Any]] = {}
        if pins_file is not None and pins_file.exists():
            self.pins = dict(read_json(pins_file).get("nodes", {}))
        self._dirty = False

    def start(self, node: str, manifest: dict[str, Any], seq: int) -> str:
        """The key for `node`'s event seq+1: the pinned one when this reader has followed
        the node's chain to seq, else (first use) what the manifest says for seq+1."""
        pin = self.pins.get(node) or {}
        pinned = str(pin["key"]) if pin.get("seq") == seq else None
        if pinned and (self.policy is None or self.policy.allows(node, pinned)):
            key = pinned
        else:  # first use, or the policy no longer allows the pinned key
            key = manifest_key(manifest, seq + 1)
        if self.policy is not None and not self.policy.allows(node, key):
            raise BadInput(f"{node} with key {fingerprint(key)} is not in trust.json")
        return key

    def check(self, env: Envelope, key: str) -> str:
        """Verify `env` against `key`; the key for the node's next event."""
        if "sig" not in env:
            raise BadInput("has no signature")
        if not signature_ok(env, key):
            raise BadInput(f"signature does not match {env['node_id']}'s key {fingerprint(key)}")
        nxt = rotation_target(env)
        if nxt is None:
            return key
        public_key_bytes(nxt)
        if self.policy is not None and not self.policy.allows(env["node_id"], nxt):
            raise BadInput(f"rotates to key {fingerprint(nxt)}, which trust.json does not allow")
        return nxt

    def accepted(self, node: str, seq: int, key: str) -> None:
        self.pins[node] = {"key": key, "seq": seq}
        self._dirty = True

    def save(self) -> None:
        if self._dirty and self.pins_file is not None:
            atomic_write_json(self.pins_file, {"nodes": self.pins})
            self._dirty = False


# --- key rotation ------------------------------------------------------------------------


def _next_file(mesh: Mesh) -> Path:
    key_file = mesh.layout.private_key_file
    return key_file.with_name(key_file.name + ".next")


def rotate_key(mesh: Mesh) -> dict[str, Any]:
    """Make a new key pair and switch to it. Under the log lock: the rotation event (signed
    with the old key, naming the new one) is the old key's last event, and nothing can be
    signed in between. A crash before the switch is finished on the next publish."""
    import os

    from .fsutil import atomic_write_bytes

    with mesh.log._locked():
        nxt = _next_file(mesh)
        if not nxt.exists():
            atomic_write_bytes(nxt, f"ed25519:{b64url(os.urandom(32))}\n".encode(), mode=0o600)
        new = Signer(nxt)
        old = mesh.current_signer()
        result = mesh.publish(
            ROTATION[0],
            ROTATION[1],
            {"public_key": new.public_key, "previous_key": old.public_key},
            source="mesh-rotate-key",
            idempotency_key="rotate:" + new.public_key,
        )
        finish_rotation(mesh)
    return {
        "event_id": result.event_id,
        "seq": result.seq,
        "public_key": new.public_key,
        "previous_key": old.public_key,
    }


def finish_rotation(mesh: Mesh) -> None:
    """Swap in the next key once its rotation event is in the log; drop it otherwise."""
    import os

    from .fsutil import fsync_dir
    from .node import update_manifest

    nxt = _next_file(mesh)
    new = Signer(nxt)
    done = mesh.log.idempotent_hit(mesh.node_id, ("", "rotate:" + new.public_key))
    if done is None:
        return  # the rotation event was never written: rotate_key will use this key
    key_file = mesh.layout.private_key_file
    os.replace(nxt, key_file)
    fsync_dir(key_file.parent)
    manifest = mesh.manifests().get(mesh.node_id, {})
    keys = [k for k in manifest.get("keys", []) if k.get("public_key") != new.public_key]
    keys.append({"public_key": new.public_key, "from_seq": done.seq + 1})
    update_manifest(mesh.layout, mesh.node_id, public_key=new.public_key, keys=keys)
