"""Import: other nodes' verified events from their outboxes into the local log, in each
node's seq order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_config
from ..envelope import EVENT_ID_RE, Envelope
from ..errors import BadInput
from ..store.fsutil import (
    UnsafeFile,
    atomic_write_json,
    plain_folder,
    read_json,
)
from ..store.manifest import (
    list_manifests,
)
from ..store.node import Node
from ..store.paths import Layout
from .files import (
    Problem,
    Progress,
    _reason,
    bucket_of,
    event_files,
    event_path,
    legacy_outboxes,
    no_progress,
    read_event_file,
    read_manifest,
)
from .keyring import Keyring

# --- import ----------------------------------------------------------------------------


@dataclass
class ImportReport:
    imported: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # node -> events imported
    waiting: int = 0  # valid events whose predecessor has not arrived yet
    rejected: list[Problem] = field(default_factory=list)
    forks: int = 0
    # orxaq-ops event files per node: not imported until that node runs mesh-migrate
    legacy: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "nodes": self.nodes,
            "waiting": self.waiting,
            "rejected": [p.as_dict() for p in self.rejected],
            "forks": self.forks,
            "legacy": self.legacy,
        }


def import_events(
    mesh: Node, max_events: int | None = None, progress: Progress = no_progress
) -> ImportReport:
    """Append new, verified events from the other nodes' outboxes, in each node's seq order."""
    layout = mesh.layout
    report = ImportReport()
    heads = mesh.log.node_heads()
    rel = layout.relative
    budget = max_events if max_events is not None else -1
    manifests, odd = list_manifests(layout)
    report.rejected.extend(Problem(rel(path), why) for path, why in odd)
    keyring = Keyring(
        layout.ledger_dir,
        layout.state_dir / "trust_pins.json",
        load_config(layout.state_dir / "config.toml").trust.policy_keys,
        history=lambda node: (e for e in mesh.log.iter_events() if e["node_id"] == node),
    )
    if keyring.policy_problem:
        report.rejected.append(
            Problem(rel(layout.ledger_dir / "trust.json"), keyring.policy_problem)
        )
    forks: list[tuple[str, Envelope, Path]] = []
    for node, manifest_path in manifests:
        if node == mesh.node_id or budget == 0:
            continue
        try:
            manifest = read_manifest(manifest_path)
        except (BadInput, OSError) as exc:
            report.rejected.append(Problem(rel(manifest_path), _reason(exc)))
            continue
        have = heads.get(node, {"seq": 0, "event_id": None})
        if manifest.get("head", {}).get("seq", 0) <= have["seq"]:
            continue  # nothing new: no file of this node is read
        try:
            key = keyring.start(node, manifest, have["seq"])
        except BadInput as exc:
            report.rejected.append(Problem(rel(manifest_path), exc.message))
            continue
        try:
            node_dir = plain_folder(layout.ledger_dir, ("outbox", node))
        except FileNotFoundError:
            continue  # its files have not arrived yet
        except UnsafeFile as exc:
            report.rejected.append(Problem(rel(exc.path), exc.message))
            continue
        except OSError as exc:
            report.rejected.append(Problem(rel(layout.outbox_dir(node)), _reason(exc)))
            continue
        candidates: dict[int, list[Envelope]] = {}
        for path, odd_name in event_files(node_dir, bucket_of(have["seq"] + 1)):
            if odd_name is not None:
                report.rejected.append(Problem(rel(path), odd_name))
                continue
            if EVENT_ID_RE.fullmatch(path.stem) and mesh.log.contains(path.stem):
                continue
            try:
                env = read_event_file(path, node)
            except (BadInput, OSError) as exc:
                report.rejected.append(Problem(rel(path), _reason(exc)))
                continue
            if env["seq"] <= have["seq"]:
                report.rejected.append(
                    Problem(rel(path), f"fork: {node} seq {env['seq']} is already another event")
                )
                forks.append((node, env, path))
                continue
            candidates.setdefault(env["seq"], []).append(env)
        chain: list[Envelope] = []
        seq, prev = have["seq"], have["event_id"]
        while seq + 1 in candidates and budget != len(chain):
            options = sorted(candidates.pop(seq + 1), key=lambda e: e["event_id"])
            nxt = next((e for e in options if e.get("prev") == prev), None)
            for other in options:
                if other is not nxt:
                    report.rejected.append(
                        Problem(
                            rel(event_path(layout, other)),
                            f"prev does not match {node}'s event at seq {seq}"
                            if nxt is None
                            else f"fork: {node} seq {other['seq']} twice",
                        )
                    )
            if nxt is None:
                break
            try:
                next_key = keyring.check(nxt, key)
            except BadInput as exc:
                report.rejected.append(Problem(rel(event_path(layout, nxt)), exc.message))
                break
            try:
                problem = mesh.schemas.check_event(nxt)
            except FileNotFoundError:  # its schema version has not arrived: it waits, as
                candidates[nxt["seq"]] = [nxt]  # an event whose predecessor is missing does
                break
            except (BadInput, OSError) as exc:  # a version file that is unsafe or unreadable
                problem = _reason(exc)
            if problem is not None:
                report.rejected.append(Problem(rel(event_path(layout, nxt)), f"schema: {problem}"))
                break
            chain.append(nxt)
            key = next_key
            seq, prev = nxt["seq"], nxt["event_id"]
        report.waiting += sum(len(v) for v in candidates.values())
        if chain:
            refused = mesh.log.append_sealed(chain)
            for env, reason in refused:
                report.rejected.append(Problem(rel(event_path(layout, env)), reason))
            count = len(chain) - len(refused)
            report.imported += count
            report.nodes[node] = count
            progress(count)
            if not refused:
                keyring.accepted(node, chain[-1]["seq"], key)
            if budget > 0:
                budget -= count
    keyring.save()
    report.legacy = legacy_outboxes(layout, mesh.node_id)
    if forks:
        _record_forks(mesh, forks)
    report.forks = len(forks)
    rejected = {"rejected": [p.as_dict() for p in report.rejected], "forks": len(forks)}
    rejected_file = layout.state_dir / "import_rejected.json"
    if rejected["rejected"] or rejected_file.exists():
        try:
            unchanged = read_json(rejected_file) == rejected
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            atomic_write_json(rejected_file, rejected)
    return report


def _record_forks(mesh: Node, forks: list[tuple[str, Envelope, Path]]) -> None:
    """One `mesh.trust.fork_detected` event per refused fork (deduplicated by its id)."""
    mesh.publish_many(
        (
            {
                "topic": "mesh",
                "event_type": "trust.fork_detected",
                "source": "import",
                "payload": {
                    "node_id": node,
                    "seq": env["seq"],
                    "refused": env["event_id"],
                    "path": mesh.layout.relative(path),
                },
                "idempotency_key": f"fork:{node}:{env['seq']}:{env['event_id']}",
            }
            for node, env, path in forks
        ),
        system=True,
    )


def rejected_count(layout: Layout) -> int:
    try:
        return len(read_json(layout.state_dir / "import_rejected.json").get("rejected", []))
    except FileNotFoundError:
        return 0
