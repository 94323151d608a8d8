"""Keys and signatures: this node's Ed25519 signer, and the checks every reader makes.

Every event a node authors carries `sig = "ed25519:" + base64url(signature over the ASCII
bytes of its event_id)`. libsodium (PyNaCl's bindings) signs and verifies. Whose key to
believe for a node is the ledger wing's question (ledger/keyring.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from ..envelope import Envelope
from ..errors import BadInput

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


def new_key_text() -> bytes:
    """A new private key file's content: `ed25519:<base64url of a 32-byte seed>`."""
    return f"ed25519:{b64url(os.urandom(32))}\n".encode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
