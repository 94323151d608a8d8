"""Publish, status and log benchmarks. Prints figures; asserts nothing (timed tests flake).

    python bench/bench_publish.py            # full run (~1 minute)
    python bench/bench_publish.py --quick    # smaller sizes, for a smoke run

Figures:
- batch: `mesh-publish --stdin` end to end (process start to exit), ~100-byte payloads
- single: wall time of one `mesh-publish` process, median of repeated runs
- scaling: the same single publish and `mesh-status` with 1,000 and 100,000 events in
  the log; the ratio should stay near 1.0 (costs must not grow with history)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

CLI = [sys.executable, "-m", "orxaq_autonomy"]


def run(root: Path, *args: str, stdin: bytes | None = None) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORXAQ_AUTONOMY_")}
    start = time.perf_counter()
    subprocess.run(
        [*CLI, "--root", str(root), *args],
        input=stdin,
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    return time.perf_counter() - start


def batch_lines(n: int) -> bytes:
    # payload ~100 bytes serialised
    return b"".join(
        orjson.dumps(
            {
                "topic": "bench",
                "event_type": "item.done",
                "payload": {
                    "task_id": f"task-{i:08d}",
                    "lane": "lane-3",
                    "status": "ok",
                    "attempt": 1,
                    "note": f"build {i} passed on ci",
                },
            }
        )
        + b"\n"
        for i in range(n)
    )


def fresh_root(base: Path, name: str) -> Path:
    root = base / name
    subprocess.run(
        [*CLI, "--root", str(root), "mesh-init", "--node-id", name],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return root


def median_wall(root: Path, args: list[str], repeats: int) -> float:
    run(root, *args)  # warm the page cache
    return statistics.median(run(root, *args) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    big = 20_000 if opts.quick else 100_000
    repeats = 5 if opts.quick else 15
    publish = [
        "mesh-publish",
        "--topic",
        "bench",
        "--event-type",
        "one",
        "--payload-json",
        '{"task_id": "task-1"}',
    ]

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        base = Path(tmp)
        root = fresh_root(base, "batch")
        data = batch_lines(big)
        seconds = run(root, "mesh-publish", "--stdin", stdin=data)
        print(
            f"batch publish --stdin: {big} events in {seconds:.2f} s = "
            f"{big / seconds:,.0f} events/s end to end"
        )

        small = fresh_root(base, "small")
        run(small, "mesh-publish", "--stdin", stdin=batch_lines(1_000))
        single_small = median_wall(small, publish, repeats)
        single_big = median_wall(root, publish, repeats)
        status_small = median_wall(small, ["mesh-status", "--json"], repeats)
        status_big = median_wall(root, ["mesh-status", "--json"], repeats)
        log_small = median_wall(small, ["mesh-log", "--limit", "10", "--json"], repeats)
        log_big = median_wall(root, ["mesh-log", "--limit", "10", "--json"], repeats)
        print(
            f"single mesh-publish process: {single_small * 1000:.0f} ms median "
            f"(log of 1,000 events)"
        )
        for label, a, b in [
            ("mesh-publish", single_small, single_big),
            ("mesh-status", status_small, status_big),
            ("mesh-log --limit 10", log_small, log_big),
        ]:
            print(
                f"{label}: {a * 1000:.0f} ms at 1,000 events, {b * 1000:.0f} ms at "
                f"{big:,} events, ratio {b / a:.2f}"
            )

        # in-process: the cost of one durable publish through the library API
        from orxaq_autonomy import Mesh

        for target in (small, root):
            with Mesh.open(target) as mesh:
                times = []
                for i in range(200):
                    start = time.perf_counter()
                    mesh.publish("bench", "lib", {"i": i})
                    times.append(time.perf_counter() - start)
                count = mesh.status()["log"]["events"]
            print(
                f"library publish (fsync + commit each): {statistics.median(times) * 1e3:.2f}"
                f" ms median with {count:,} events in the log"
            )


if __name__ == "__main__":
    main()
