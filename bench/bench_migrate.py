"""mesh-migrate benchmark. Prints figures; asserts nothing (timed tests flake).

    python bench/bench_migrate.py            # 100,000 events (the target: <= 20 s)
    python bench/bench_migrate.py --quick    # 10,000 events, for a smoke run

The orxaq-ops log is written with the old id rule: 90% of its lines authored by the
migrating node (half of them follow-ups of an earlier own event), 10% imported from
another node; a dispatch cursor at 80% of the lines. The figure is `mesh-migrate` end to
end as a process (start to exit), then a second run (idempotent: it reads its record).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-m", "orxaq_autonomy"]
LOG = "artifacts/autonomy/event_mesh/events.ndjson"


def old_id(event: dict[str, object]) -> str:
    body = {
        "node_id": event["node_id"],
        "topic": event["topic"],
        "event_type": event["event_type"],
        "payload": event["payload"],
        "event_ts": event["timestamp"],
        "causation_id": event["causation_id"],
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return "evt_" + hashlib.sha256(text.encode()).hexdigest()[:20]


def write_old_root(root: Path, count: int) -> None:
    rng = random.Random(7)
    mine: list[str] = []
    lines = []
    for i in range(count):
        node = "ops-a" if rng.random() < 0.9 else "ops-b"
        cause = rng.choice(mine) if node == "ops-a" and mine and rng.random() < 0.5 else ""
        event: dict[str, object] = {
            "causation_id": cause,
            "event_type": "task.scheduled" if cause else "task.enqueued",
            "node_id": node,
            "payload": {"task_id": f"task-{i}", "state": "ready", "n": i},
            "source": "mesh-dispatch" if cause else "runtime",
            "timestamp": f"2026-12-02T13:{i // 60_000_000 % 60:02d}:"
            f"{i // 1_000_000 % 60:02d}.{i % 1_000_000:06d}+00:00",
            "topic": "scheduling",
        }
        event["event_id"] = old_id(event)
        if node == "ops-a":
            mine.append(str(event["event_id"]))
        lines.append(json.dumps(event, sort_keys=True))
    (root / LOG).parent.mkdir(parents=True)
    (root / LOG).write_text("\n".join(lines) + "\n")
    state = root / "state/event_mesh"
    state.mkdir(parents=True)
    (state / "dispatch_cursor.json").write_text(json.dumps({"offset": int(count * 0.8)}))
    (state / "leader_lease.json").write_text(json.dumps({"leader_id": "ops-a", "epoch": 1}))


def timed(root: Path, *args: str) -> tuple[float, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORXAQ_AUTONOMY_")}
    start = time.perf_counter()
    proc = subprocess.run(
        [*CLI, "--root", str(root), *args, "--json"],
        check=True,
        capture_output=True,
        env=env,
    )
    return time.perf_counter() - start, json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    count = 10_000 if parser.parse_args().quick else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "old"
        write_old_root(root, count)
        size = (root / LOG).stat().st_size
        dry, plan = timed(root, "mesh-migrate", "--dry-run")
        took, report = timed(root, "mesh-migrate")
        again, _ = timed(root, "mesh-migrate")
        print(f"orxaq-ops log: {count:,} events, {size / 1e6:.1f} MB")
        print(f"mesh-migrate --dry-run: {dry:.2f} s ({plan['migrated']:,} would migrate)")
        print(
            f"mesh-migrate: {took:.2f} s for {report['migrated']:,} events "
            f"({report['migrated'] / took:,.0f} events/s; {report['handled']:,} marked "
            f"handled, {report['causes_mapped']:,} causes mapped); target <= 20 s"
        )
        print(f"mesh-migrate again (nothing to do): {again:.2f} s")


if __name__ == "__main__":
    main()
