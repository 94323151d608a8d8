"""Task benchmarks. Prints figures; asserts nothing.

    python bench/bench_tasks.py [--quick]

- start: N tasks enqueued on one node whose lane runs `true` with max_parallel = N; the
  dispatch that routes them and starts them all (in-process), per task
- drain: wall time until all N outcomes are recorded (dispatching every 50 ms)
- idle: an in-process dispatch with nothing new, with the N tasks ended (what mesh-serve's
  dispatch loop pays every second)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from orxaq_autonomy import Mesh
from orxaq_autonomy.dispatch.dispatcher import Dispatcher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    n = 20 if parser.parse_args().quick else 100
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "node"
        Mesh.init(root, node_id="node-a", capabilities=["gpu"])
        with open(root / "state/event_mesh/config.toml", "a") as fh:
            fh.write(
                '\n[[lanes]]\nid = "l1"\ncapabilities = ["gpu"]\nrun = "true"\n'
                f"max_parallel = {n}\n"
            )
        with Mesh.open(root) as mesh:
            mesh.publish_many(
                {
                    "topic": "scheduling",
                    "event_type": "task.enqueued",
                    "payload": {"task_id": f"t{i}", "required_capabilities": ["gpu"]},
                }
                for i in range(n)
            )
            began = time.perf_counter()
            dispatcher = Dispatcher(mesh)
            dispatcher.run()
            start = time.perf_counter() - began
            print(
                f"start: {n} tasks routed and started in {start:.2f}s "
                f"({start / n * 1000:.1f} ms per task; started {dispatcher.tasks['started']})"
            )
            began = time.perf_counter()
            while len(list(mesh.events(match="scheduling.task.completed"))) < n:
                Dispatcher(mesh).run()
                time.sleep(0.05)
            print(f"drain: all {n} outcomes recorded {time.perf_counter() - began:.2f}s later")
            idle = []
            for _ in range(20):
                began = time.perf_counter()
                Dispatcher(mesh).run()
                idle.append(time.perf_counter() - began)
            print(
                f"idle: a dispatch with {n} ended tasks takes "
                f"{statistics.median(idle) * 1000:.1f} ms (median of 20)"
            )


if __name__ == "__main__":
    main()
