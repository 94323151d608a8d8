"""Dispatch benchmarks. Prints figures; asserts nothing.

    python bench/bench_dispatch.py [--quick]

- drain: a mixed workload (heartbeats, enqueued tasks with routing options, lane
  summaries, unrelated events) dispatched through the built-in chain in one process;
  "events/s" counts every event the dispatcher passed, causes and follow-ups alike
- one new event: the cost of dispatching a single event with 1,000 and with 100,000
  events already dispatched (in-process, median of repeats); the ratio should stay near 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from orxaq_autonomy import Mesh
from orxaq_autonomy.dispatch.dispatcher import Dispatcher


def workload(n: int) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            items.append(
                {
                    "topic": "monitoring",
                    "event_type": "heartbeat.changed",
                    "payload": {"lane": f"lane-{i % 8}"},
                }
            )
        elif kind == 1:
            items.append(
                {
                    "topic": "scheduling",
                    "event_type": "task.enqueued",
                    "payload": {
                        "task_id": f"task-{i}",
                        "routing_options": [
                            {"lane_id": "l1", "node_id": "node-b", "score": i % 5},
                            {"lane_id": "l2", "node_id": "node-c", "score": 2.5},
                        ],
                    },
                }
            )
        elif kind == 2:
            items.append(
                {
                    "topic": "scheduling",
                    "event_type": "lanes.ensure.summary",
                    "payload": {"failed_count": i % 3 == 0, "started_count": 1},
                }
            )
        else:
            items.append({"topic": "ci", "event_type": "run.finished", "payload": {"run": i}})
    return items


def fresh(base: Path, name: str) -> Mesh:
    Mesh.init(base / name, node_id=name)
    return Mesh.open(base / name)


def drain(mesh: Mesh) -> tuple[int, float]:
    start = time.perf_counter()
    report = Dispatcher(mesh).run()
    return report.events, time.perf_counter() - start


def one_more(mesh: Mesh, repeats: int) -> float:
    times = []
    for i in range(repeats):
        mesh.publish("ci", "run.finished", {"run": -i})
        start = time.perf_counter()
        Dispatcher(mesh).run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    n = 20_000 if opts.quick else 100_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        base = Path(tmp)
        big = fresh(base, "big")
        big.publish_many(workload(n))
        events, seconds = drain(big)
        print(
            f"drain through the built-in chain: {n:,} published, {events:,} events "
            f"dispatched (with follow-ups) in {seconds:.2f} s = {events / seconds:,.0f} "
            f"events/s ({n / seconds:,.0f} published events/s)"
        )
        small = fresh(base, "small")
        small.publish_many(workload(1_000))
        drain(small)
        a = one_more(small, 15)
        b = one_more(big, 15)
        print(
            f"dispatch one new event: {a * 1000:.1f} ms after 1,000 events, "
            f"{b * 1000:.1f} ms after {n:,}; ratio {b / a:.2f}"
        )


if __name__ == "__main__":
    main()
