"""`mesh-verify`: every file of the ledger checked, as a pull-request check."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..envelope import NODE_ID_RE, Envelope
from ..errors import BadInput
from ..store.fsutil import (
    UnsafeFile,
    plain_folder,
    utf8_name,
)
from ..store.manifest import (
    list_manifests,
    manifest_node,
)
from ..store.paths import Layout
from ..store.schemas import VERSION_FILE_RE, Registry, problems_in_registry
from .files import (
    NOT_UTF8,
    Problem,
    _event_file_place,
    _reason,
    event_files,
    event_path,
    read_event_file,
    read_manifest,
)
from .keyring import Keyring

# --- verify ----------------------------------------------------------------------------


@dataclass
class VerifyReport:
    checked: int = 0
    nodes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "nodes": self.nodes,
            "problems": [p.as_dict() for p in self.problems],
        }


def verify_ledger(
    layout: Layout,
    changed: dict[str, str] | None = None,
    base_manifest: Callable[[str], dict[str, Any] | None] | None = None,
    policy_keys: Iterable[str] = (),
) -> VerifyReport:
    """Check every file of the ledger: it parses, its id matches its content, it is in its
    node's folder, holds no secret, and each node's chain is whole (seq 1..N, prev links)
    and matches its manifest's head.

    `changed` (from `--since REV`: path relative to the root -> git status letter) limits
    the check to the files those paths name, and refuses event files that were modified or
    deleted: published events are immutable. `base_manifest(node)` (the manifest at REV)
    says where each node's chain stood, so its new events are checked for continuity and
    signatures from there without reading the files that were already there."""
    report = VerifyReport()
    rel = layout.relative
    outbox = layout.outbox_root
    nodes: set[str] = set()
    if changed is None:
        try:
            names = sorted(os.listdir(plain_folder(layout.ledger_dir, ("outbox",))))
        except FileNotFoundError:
            names = []
        except UnsafeFile as exc:
            names = []
            report.problems.append(Problem(rel(exc.path), exc.message))
        for name in names:
            if utf8_name(name) and NODE_ID_RE.fullmatch(name):
                nodes.add(name)
            else:
                report.problems.append(
                    Problem(
                        rel(outbox / name),
                        NOT_UTF8 if not utf8_name(name) else "is not named like a node id",
                    )
                )
        manifests, odd = list_manifests(layout)
        nodes.update(node for node, _ in manifests)
        report.problems.extend(Problem(rel(path), why) for path, why in odd)
    else:
        outbox_parts = Path(rel(outbox)).parts
        nodes_parts = Path(rel(layout.nodes_dir)).parts
        for path, status in sorted(changed.items()):
            if path.startswith('"'):  # git quotes names that are not plain ASCII
                if status[0] != "D":
                    report.problems.append(
                        Problem(path, "has a name that is not plain ASCII; no ledger name is")
                    )
                continue
            parts = Path(path).parts
            if parts[: len(outbox_parts)] == outbox_parts and len(parts) > len(outbox_parts):
                node, inside = parts[len(outbox_parts)], parts[len(outbox_parts) + 1 :]
                if not NODE_ID_RE.fullmatch(node):
                    if status[0] != "D":
                        report.problems.append(Problem(path, "is not under a node id folder"))
                    continue
                nodes.add(node)
                if status[0] in "MDRT" and path.endswith(".json"):
                    verb = {"M": "modified", "D": "deleted", "R": "renamed", "T": "retyped"}
                    report.problems.append(
                        Problem(path, f"was {verb[status[0]]}: published events are immutable")
                    )
                elif status[0] != "D" and not _event_file_place(inside):
                    report.problems.append(
                        Problem(path, "is not <node>/[<six-digit bucket>/]<event id>.json")
                    )
            elif parts[: len(nodes_parts)] == nodes_parts and len(parts) > len(nodes_parts):
                node_name = manifest_node(parts[-1]) if len(parts) == len(nodes_parts) + 1 else None
                if node_name is not None:
                    nodes.add(node_name)
                elif status[0] != "D":
                    report.problems.append(Problem(path, "is not named <node_id>.json"))
    registry = Registry(layout)
    _check_registry(layout, registry, changed, report)
    keyring = Keyring(layout.ledger_dir, None, policy_keys)
    if keyring.policy_problem:
        report.problems.append(
            Problem(rel(layout.ledger_dir / "trust.json"), keyring.policy_problem)
        )
    for node in sorted(nodes):
        report.nodes += 1
        node_dir = outbox / node
        try:
            plain_folder(layout.ledger_dir, ("outbox", node))
        except FileNotFoundError:
            pass
        except UnsafeFile as exc:
            report.problems.append(Problem(rel(exc.path), exc.message))
            continue
        manifest_path = layout.manifest_file(node)
        manifest: dict[str, Any] | None = None
        try:
            manifest = read_manifest(manifest_path)
        except FileNotFoundError:
            report.problems.append(Problem(rel(manifest_path), "missing manifest"))
        except (BadInput, OSError) as exc:
            report.problems.append(Problem(rel(manifest_path), _reason(exc)))
        base = base_manifest(node) if changed is not None and base_manifest else None
        start_seq = int(base.get("head", {}).get("seq", 0)) if base else 0
        start_id = base.get("head", {}).get("event_id") if base else None
        if changed is None:
            files: Iterable[tuple[Path, str | None]] = event_files(node_dir)
        else:
            mine = rel(node_dir) + "/"
            files = [
                (layout.root / path, None)
                for path, status in sorted(changed.items())
                if path.startswith(mine) and path.endswith(".json") and status[0] in "AM"
            ]
        by_seq: dict[int, Envelope] = {}
        for file, odd_name in files:
            report.checked += 1
            if odd_name is not None:
                report.problems.append(Problem(rel(file), odd_name))
                continue
            try:
                env = read_event_file(file, node)
            except (BadInput, OSError) as exc:
                report.problems.append(Problem(rel(file), _reason(exc)))
                continue
            if env["seq"] <= start_seq:
                continue  # an old seq rewritten: flagged as modified above
            if env["seq"] in by_seq:
                report.problems.append(
                    Problem(
                        rel(file),
                        f"fork: seq {env['seq']} is also {by_seq[env['seq']]['event_id']}",
                    )
                )
                continue
            by_seq[env["seq"]] = env
            _check_schema(registry, env, rel(file), report)
        key: str | None = None
        trusted = base or manifest
        if trusted is not None:
            try:
                key = keyring.start(node, trusted, start_seq)
            except BadInput as exc:
                report.problems.append(Problem(rel(manifest_path), exc.message))
        prev = start_id
        for seq in range(start_seq + 1, max(by_seq, default=start_seq) + 1):
            found = by_seq.get(seq)
            if found is None:
                report.problems.append(Problem(rel(node_dir), f"seq {seq} is missing"))
                prev = None
                continue
            if prev is not None and found.get("prev") != prev:
                report.problems.append(
                    Problem(rel(event_path(layout, found)), f"prev does not match seq {seq - 1}")
                )
            if key is not None:
                try:
                    key = keyring.check(found, key)
                except BadInput as exc:
                    report.problems.append(Problem(rel(event_path(layout, found)), exc.message))
            prev = found["event_id"]
        if manifest is None:
            continue
        head = manifest.get("head", {})
        top = max(by_seq, default=start_seq)
        top_id = by_seq[top]["event_id"] if top in by_seq else start_id
        if head.get("seq", 0) != top or (top and head.get("event_id") != top_id):
            report.problems.append(
                Problem(
                    rel(manifest_path),
                    f"head is seq {head.get('seq', 0)}, but the outbox ends at seq {top}",
                )
            )
    return report


def _check_schema(registry: Registry, env: Envelope, where: str, report: VerifyReport) -> None:
    """The event against the schema version it names (an event that names none passes)."""
    try:
        problem = registry.check_event(env)
    except FileNotFoundError:
        problem = f"names schema {env.get('schema')}, which is not in the ledger"
    except (BadInput, OSError) as exc:
        problem = _reason(exc)
    if problem is not None:
        report.problems.append(Problem(where, f"schema: {problem}"))


def _check_registry(
    layout: Layout, registry: Registry, changed: dict[str, str] | None, report: VerifyReport
) -> None:
    """The registry itself: valid schemas, versions 1..N, each compatible with the ones
    before it under the subject's mode; with `--since`, no version changed or deleted."""
    report.problems.extend(Problem(where, why) for where, why in problems_in_registry(registry))
    if changed is None:
        return
    prefix = layout.relative(registry.root) + "/"
    verb = {"M": "modified", "D": "deleted", "R": "renamed", "T": "retyped"}
    for path, status in sorted(changed.items()):
        name = Path(path).name
        if path.startswith(prefix) and status[0] in verb and VERSION_FILE_RE.fullmatch(name):
            report.problems.append(
                Problem(path, f"was {verb[status[0]]}: published schema versions are immutable")
            )
