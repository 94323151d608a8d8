"""Whose keys to believe: the trust policy (`trust.json`, counted only when signed by a
pinned key), trust on first use with pins, and each node's chain of keys."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..envelope import Envelope
from ..errors import BadInput
from ..store.fsutil import atomic_write_json, read_json
from ..store.keys import (
    fingerprint,
    public_key_bytes,
    rotation_statement,
    rotation_target,
    signature_ok,
    signed_by,
)

if TYPE_CHECKING:
    from ..store.node import Node


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
    from ..envelope import canonical_bytes

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
        from ..store.fsutil import read_regular

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


def sign_policy(mesh: Node, policy: Any) -> dict[str, Any]:
    """Sign a trust policy ({"nodes": {node: {"keys": [...]}}}) with this node's key and
    write it as the ledger's trust.json. Nodes that pin this key in `[trust] policy_keys`
    then believe it."""
    from ..store.fsutil import atomic_write_bytes, dump_json_pretty

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
