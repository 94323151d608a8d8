"""Admission of other nodes' events one by one, as they arrive from anywhere (the NATS
stream today): the per-event half of import, built from the same pieces.

An event is admitted when it extends its author's chain in the local log (seq = head + 1,
prev = head id) and is signed with the key the author's chain and the ledger's manifests
and trust policy give for that seq (`Keyring`, as import). The payload must match the
schema version it names (`Node.schemas`). Parsing, the id, the size and the secrets are
checked before (`envelope.check_envelope`, through the caller's parser).
An event whose predecessor has not arrived, whose author's key is not known yet (no
manifest in the ledger yet, or trust.json does not name it yet), or whose schema version
has not arrived, waits in memory and is
tried again by `settle()`. Appends go through `EventLog.append_sealed`, which re-checks
the chain under the log lock: git import and admission may run at the same time, and
whichever brings an event first wins; the other finds it there (a duplicate, no-op).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..config import load_config
from ..envelope import Envelope
from ..errors import BadInput
from ..store.fsutil import read_json
from ..store.keys import rotation_target, signature_ok
from ..store.node import Node
from .keyring import Keyring

MANIFEST_REFRESH_SECONDS = 1.0  # how often an unknown author sends us back to the ledger
PINS_SAVE_SECONDS = 1.0
PARALLEL_FROM = 256  # below this many events, threads cost more than they save
VERIFY_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclass
class Admission:
    """What one offer or settle did. `done` holds every event id that needs no more
    delivery: appended, already here, or refused."""

    appended: list[Envelope] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    rejected: list[tuple[Envelope, str]] = field(default_factory=list)
    waiting: int = 0
    wait_reasons: dict[str, str] = field(default_factory=dict)  # node -> why it waits

    @property
    def done(self) -> list[str]:
        return (
            [e["event_id"] for e in self.appended]
            + self.duplicates
            + [e["event_id"] for e, _ in self.rejected]
        )


class _Wait(Exception):
    pass


class Admitter:
    """Holds events that wait for their chain or their key; appends the ones that fit."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.pending: dict[str, dict[str, Envelope]] = {}  # author -> event_id -> event
        self._keys: dict[str, tuple[int, str]] = {}  # author -> (seq, key for seq + 1)
        self._manifests: dict[str, dict[str, Any]] = {}
        self._manifests_at = float("-inf")
        self._keyring = self._new_keyring()
        self._pins_saved_at = time.monotonic()
        self._pool: ThreadPoolExecutor | None = None

    def _new_keyring(self) -> Keyring:
        layout = self.node.layout
        return Keyring(
            layout.ledger_dir,
            layout.state_dir / "trust_pins.json",
            load_config(layout.state_dir / "config.toml").trust.policy_keys,
            history=lambda n: (e for e in self.node.log.iter_events() if e["node_id"] == n),
        )

    @property
    def waiting(self) -> int:
        return sum(len(v) for v in self.pending.values())

    def holds(self, event_id: str) -> bool:
        return any(event_id in v for v in self.pending.values())

    def offer(self, events: list[Envelope]) -> Admission:
        """Take parsed, checked events from other nodes; append every one that fits now."""
        for env in events:
            self.pending.setdefault(env["node_id"], {})[env["event_id"]] = env
        return self.settle()

    def settle(self) -> Admission:
        """Append what now fits: after an offer, or when git brought predecessors or keys."""
        report = Admission()
        if not self.pending:
            return report
        heads = self.node.log.node_heads()
        for author in list(self.pending):
            self._settle_author(author, heads, report)
            if not self.pending[author]:
                del self.pending[author]
        report.waiting = self.waiting
        if time.monotonic() - self._pins_saved_at >= PINS_SAVE_SECONDS:
            self.save()
        return report

    def _settle_author(
        self, author: str, heads: dict[str, dict[str, Any]], report: Admission
    ) -> None:
        held = self.pending[author]
        have = heads.get(author, {"seq": 0, "event_id": None})
        by_seq: dict[int, list[Envelope]] = {}
        for event_id, env in list(held.items()):
            if env["seq"] > have["seq"]:
                by_seq.setdefault(env["seq"], []).append(env)
                continue
            del held[event_id]
            if self.node.log.contains(event_id):
                report.duplicates.append(event_id)
            else:
                report.rejected.append(
                    (env, f"fork: {author} seq {env['seq']} is already another event")
                )
        if have["seq"] + 1 not in by_seq:
            return  # its predecessor has not arrived: it waits
        try:
            key = self._key(author, have)
        except _Wait as why:
            report.wait_reasons[author] = str(why)
            return
        linked: list[Envelope] = []  # the events that extend the chain, by prev
        seq, prev = have["seq"], have["event_id"]
        while seq + 1 in by_seq:
            options = sorted(by_seq.pop(seq + 1), key=lambda e: e["event_id"])
            nxt = next((e for e in options if e.get("prev") == prev), None)
            for other in options:
                if other is not nxt:
                    del held[other["event_id"]]
                    report.rejected.append(
                        (other, f"prev does not match {author}'s event at seq {seq}")
                    )
            if nxt is None:
                break
            linked.append(nxt)
            seq, prev = nxt["seq"], nxt["event_id"]
        chain: list[Envelope] = []
        for env, signed in zip(linked, self._signatures(linked, key), strict=True):
            try:
                # An event that is no rotation keeps the key: Keyring.check would verify
                # the signature (done above, in parallel) and return the same key.
                if signed and rotation_target(env) is None:
                    next_key = key
                else:
                    next_key = self._keyring.check(env, key)
            except BadInput as exc:
                del held[env["event_id"]]
                report.rejected.append((env, exc.message))
                break
            try:
                problem = self.node.schemas.check_event(env)
            except FileNotFoundError:  # the schema version it names has not arrived: wait
                report.wait_reasons[author] = f"schema {env.get('schema')} has not arrived yet"
                break
            except (BadInput, OSError) as exc:  # a version file that is unsafe or unreadable
                problem = exc.message if isinstance(exc, BadInput) else str(exc)
            if problem is not None:
                del held[env["event_id"]]
                report.rejected.append((env, f"schema: {problem}"))
                break
            chain.append(env)
            key = next_key
        seq = chain[-1]["seq"] if chain else seq
        if not chain:
            return
        refused = {e["event_id"] for e, _ in self.node.log.append_sealed(chain)}
        for env in chain:
            if env["event_id"] in refused:
                continue  # git moved the head meanwhile: it stays and is tried again
            del held[env["event_id"]]
            report.appended.append(env)
        if refused:
            self._keys.pop(author, None)
        else:
            self._keys[author] = (seq, key)
            self._keyring.accepted(author, seq, key)

    def _signatures(self, events: list[Envelope], key: str) -> list[bool]:
        """Whether each event is signed with the key its place in the chain gives it.
        Ed25519 checks dominate admission; libsodium releases the GIL, so large batches
        are checked on several cores."""
        keys: list[str] = []
        for env in events:
            keys.append(key)
            nxt = rotation_target(env)
            key = nxt if nxt else key
        if len(events) < PARALLEL_FROM:
            return [signature_ok(e, k) for e, k in zip(events, keys, strict=True)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="mesh-verify")
        size = -(-len(events) // (VERIFY_THREADS * 2))
        parts = [(events[i : i + size], keys[i : i + size]) for i in range(0, len(events), size)]
        return [
            ok
            for part in self._pool.map(
                lambda p: [signature_ok(e, k) for e, k in zip(*p, strict=True)], parts
            )
            for ok in part
        ]

    def close(self) -> None:
        self.save()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _key(self, author: str, have: dict[str, Any]) -> str:
        cached = self._keys.get(author)
        if cached is not None and cached[0] == have["seq"]:
            return cached[1]
        manifest = self._manifests.get(author)
        if manifest is None and self._refresh_manifests():
            manifest = self._manifests.get(author)
        if manifest is None:
            raise _Wait(f"{author}'s key is not known yet: its manifest has not arrived")
        try:
            key = self._keyring.start(author, manifest, have["seq"])
        except BadInput as exc:
            # trust.json may name it after the next git pull: wait, and look again then
            self._manifests.pop(author, None)
            raise _Wait(exc.message) from None
        self._keys[author] = (have["seq"], key)
        return key

    def _refresh_manifests(self) -> bool:
        if time.monotonic() - self._manifests_at < MANIFEST_REFRESH_SECONDS:
            return False
        self._manifests_at = time.monotonic()
        self._manifests = self.node.manifests()
        self.save()
        self._keyring = self._new_keyring()  # trust.json may have changed as well
        return True

    def save(self) -> None:
        """Write the key pins, merged with what import wrote meanwhile (highest seq wins)."""
        self._pins_saved_at = time.monotonic()
        ring = self._keyring
        if not ring._dirty or ring.pins_file is None:
            return
        try:
            on_disk = dict(read_json(ring.pins_file).get("nodes", {}))
        except (FileNotFoundError, ValueError, AttributeError):
            on_disk = {}
        for author, pin in on_disk.items():
            ours = ring.pins.get(author)
            if ours is None or int(pin.get("seq", 0)) > int(ours.get("seq", 0)):
                ring.pins[author] = pin
        ring.save()
