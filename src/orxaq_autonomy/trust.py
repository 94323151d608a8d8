"""Trust: Ed25519 signatures on every event, and whose keys to believe.

- Every event a node authors carries `sig = "ed25519:" + base64url(signature over the
  ASCII bytes of its event_id)`. libsodium (PyNaCl's bindings) signs and verifies.
- A node's key is believed from the trust policy in the ledger (`trust.json`) when there
  is one and it is signed by a key this node pins in its own config (`[trust]
  policy_keys`); else on first use: the first key seen for a node is pinned in
  `state/event_mesh/trust_pins.json`. A policy anyone could push counts for nothing.
- Keys change only through the chain itself: a `mesh.trust.key_rotated` event, signed by
  the current key, names the next one and carries a proof signed by it. A reader walks a
  node's events in seq order and switches keys at that event, so a key in a manifest
  alone can never take over a node; when a pin is lost or stale, the key is established
  again from the node's events in the local log, never from its manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

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
        return self.sign_bytes(event_id.encode("ascii"))

    def sign_bytes(self, data: bytes) -> str:
        return "ed25519:" + b64url(self._sign(data, self._secret)[:64])


def public_key_bytes(text: str) -> bytes:
    if not isinstance(text, str) or not text.startswith("ed25519:"):
        raise BadInput(f"bad public key {text!r}: need ed25519:<base64url>")
    raw = b64url_decode(text.removeprefix("ed25519:"))
    if len(raw) != 32:
        raise BadInput(f"bad public key {text!r}: need 32 bytes")
    return raw


def fingerprint(public_key: str) -> str:
    return "sha256:" + hashlib.sha256(public_key_bytes(public_key)).hexdigest()


def signed_by(sig: Any, data: bytes, public_key: str) -> bool:
    """Whether `sig` ("ed25519:<base64url>") is `public_key`'s signature of `data`."""
    if not isinstance(sig, str) or not sig.startswith("ed25519:"):
        return False
    try:
        signature = b64url_decode(sig.removeprefix("ed25519:"))
        _bindings().crypto_sign_open(signature + data, public_key_bytes(public_key))
    except Exception:  # nacl raises BadSignatureError; bad base64 raises binascii.Error
        return False
    return True


def signature_ok(env: Envelope, public_key: str) -> bool:
    return signed_by(env.get("sig"), env["event_id"].encode("ascii"), public_key)


def rotation_statement(node_id: str, previous_key: str, public_key: str) -> bytes:
    """What the new key signs to prove a rotation: it takes over this node from that key."""
    return f"orxaq-mesh key rotation\n{node_id}\n{previous_key}\n{public_key}".encode()


def rotation_target(env: Envelope) -> str | None:
    """The next key, when `env` is a key rotation event."""
    if (env["topic"], env["event_type"]) != ROTATION:
        return None
    key = env["payload"].get("public_key")
    return key if isinstance(key, str) else ""


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


def policy_bytes(policy: dict[str, Any]) -> bytes:
    """The signed form of a trust policy: canonical JSON of everything but `sig`."""
    from .envelope import canonical_bytes

    return canonical_bytes({k: v for k, v in policy.items() if k != "sig"})


@dataclass
class Policy:
    """`trust.json` in the ledger: {"nodes": {"node-a": {"keys": [key or fingerprint]}},
    "signed_by": key, "sig": signature}. It counts only when `signed_by` is one of the keys
    the reader pins (`[trust] policy_keys` in its config) and `sig` verifies."""

    allowed: dict[str, set[str]]

    @classmethod
    def load(cls, ledger_dir: Path, pinned: Iterable[str]) -> tuple[Policy | None, str | None]:
        """The policy, or None (trust on first use) and why a policy that is there was
        ignored."""
        from .fsutil import read_regular

        path = ledger_dir / "trust.json"
        try:
            data = orjson.loads(read_regular(path, MAX_POLICY_BYTES))
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError, BadInput) as exc:
            return None, f"is not a readable trust policy ({_why(exc)}); ignored"
        if not isinstance(data, dict):
            return None, "is not a JSON object; ignored"
        signer = data.get("signed_by")
        keys = {k: fingerprint(k) for k in pinned}
        if not isinstance(signer, str) or not (signer in keys or signer in keys.values()):
            return None, "is not signed by a key pinned in [trust] policy_keys; ignored"
        key = signer if signer in keys else next(k for k, f in keys.items() if f == signer)
        if not signed_by(data.get("sig"), policy_bytes(data), key):
            return None, f"signature does not match {fingerprint(key)}; ignored"
        try:
            nodes = data["nodes"]
            return cls({node: set(entry["keys"]) for node, entry in nodes.items()}), None
        except (KeyError, TypeError, AttributeError) as exc:
            return None, f"is not a valid trust policy ({exc!r}); ignored"

    def allows(self, node: str, public_key: str) -> bool:
        keys = self.allowed.get(node)
        return keys is not None and (public_key in keys or fingerprint(public_key) in keys)


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, BadInput) else str(exc)


MAX_POLICY_BYTES = 1024 * 1024
History = Callable[[str], Iterator[Envelope]]  # a node's events in the local log, seq order


class Keyring:
    """The key each node's events must be signed with, as of the last event accepted."""

    def __init__(
        self,
        ledger_dir: Path,
        pins_file: Path | None,
        policy_keys: Iterable[str] = (),
        history: History | None = None,
    ) -> None:
        self.policy, self.policy_problem = Policy.load(ledger_dir, policy_keys)
        self.pins_file = pins_file
        self.history = history
        self.pins: dict[str, dict[str, Any]] = {}
        if pins_file is not None and pins_file.exists():
            self.pins = dict(read_json(pins_file).get("nodes", {}))
        self._dirty = False

    def start(self, node: str, manifest: dict[str, Any], seq: int) -> str:
        """The key for `node`'s event seq+1: the pinned one when this reader has followed
        the node's chain to seq; what its events establish when the pin is lost or stale;
        on first use (seq 0), what the manifest says."""
        pin = self.pins.get(node) or {}
        if pin.get("seq") == seq and seq > 0:
            key = str(pin["key"])
        elif seq > 0 and self.history is not None:
            key = self._from_history(node, seq, manifest, pin)
        else:
            key = manifest_key(manifest, seq + 1)
        if self.policy is not None and not self.policy.allows(node, key):
            raise BadInput(f"{node} with key {fingerprint(key)} is not in trust.json")
        return key

    def _from_history(self, node: str, seq: int, manifest: dict[str, Any], pin: Any) -> str:
        """Walk the node's events held here: its first event picks the key (of those the
        manifest and the stale pin name) that signed it; rotations move it on."""
        candidates = [
            e.get("public_key")
            for e in manifest.get("keys", [])
            if isinstance(manifest.get("keys"), list) and isinstance(e, dict)
        ]
        candidates += [manifest.get("public_key"), pin.get("key")]
        key: str | None = None
        assert self.history is not None
        for env in self.history(node):
            if env["seq"] > seq:
                break
            if key is None:
                key = next(
                    (k for k in candidates if isinstance(k, str) and _verifies(env, k)), None
                )
                if key is None:
                    raise BadInput(
                        f"no key this node knows signed {node}'s first event; "
                        f"restore {self.pins_file} to go on"
                    )
            key = self.check(env, key)
        if key is None:
            raise BadInput(f"{node}'s events are not in the local log; restore it")
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
        payload = env["payload"]
        statement = rotation_statement(env["node_id"], key, nxt)
        if payload.get("previous_key") != key or not signed_by(
            payload.get("proof"), statement, nxt
        ):
            raise BadInput("key rotation without a valid proof: the new key must sign the rotation")
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


def _verifies(env: Envelope, key: str) -> bool:
    try:
        return signature_ok(env, key)
    except BadInput:
        return False


def sign_policy(mesh: Mesh, policy: Any) -> dict[str, Any]:
    """Sign a trust policy ({"nodes": {node: {"keys": [...]}}}) with this node's key and
    write it as the ledger's trust.json. Nodes that pin this key in `[trust] policy_keys`
    then believe it."""
    from .fsutil import atomic_write_bytes, dump_json_pretty

    nodes = policy.get("nodes") if isinstance(policy, dict) else None
    if not isinstance(nodes, dict) or not all(
        isinstance(entry, dict)
        and isinstance(entry.get("keys"), list)
        and all(isinstance(k, str) for k in entry["keys"])
        for entry in nodes.values()
    ):
        raise BadInput(
            'a trust policy is {"nodes": {"<node_id>": {"keys": ["<key or fingerprint>"]}}}'
        )
    signer = mesh.current_signer()
    signed: dict[str, Any] = {"nodes": nodes, "signed_by": signer.public_key}
    signed["sig"] = signer.sign_bytes(policy_bytes(signed))
    atomic_write_bytes(mesh.layout.ledger_dir / "trust.json", dump_json_pretty(signed))
    return {
        "path": mesh.layout.relative(mesh.layout.ledger_dir / "trust.json"),
        "signed_by": signer.public_key,
        "nodes": sorted(nodes),
    }


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
            {
                "public_key": new.public_key,
                "previous_key": old.public_key,
                "proof": new.sign_bytes(
                    rotation_statement(mesh.node_id, old.public_key, new.public_key)
                ),
            },
            source="mesh-rotate-key",
            idempotency_key="rotate:" + new.public_key,
            system=True,
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
