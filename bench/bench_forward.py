"""Webhook forwarding throughput: `mesh-dispatch` posting events to a local receiver.

    .venv/bin/python bench/bench_forward.py [--events 5000]

The receiver is http.server (threads, keep-alive) in this process; `mesh-dispatch` runs as
a real process and delivers one event at a time over a kept-alive connection. Every event
must arrive exactly once (the receiver counts event ids).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from orxaq_autonomy import Mesh


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=5000)
    args = parser.parse_args()
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                seen[self.headers["X-Orxaq-Event-Id"]] += 1
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "node"
        Mesh.init(root, node_id="bench")
        (root / "state/event_mesh/config.toml").write_text(
            f'[[forward]]\nname = "hook"\nurl = "http://127.0.0.1:{server.server_port}/hook"\n'
            'match = "ci.#"\n'
        )
        with Mesh.open(root) as mesh:
            mesh.publish_many(
                {"topic": "ci", "event_type": "run.finished", "payload": {"run": i}}
                for i in range(args.events)
            )
        exe = Path(sys.executable).with_name("orxaq-autonomy")
        start = time.perf_counter()
        subprocess.run([exe, "--root", root, "mesh-dispatch"], check=True, capture_output=True)
        elapsed = time.perf_counter() - start
    server.shutdown()
    assert len(seen) == args.events and set(seen.values()) == {1}, "lost or repeated"
    print(
        f"mesh-dispatch forwarded {args.events} events to one webhook in {elapsed:.2f} s: "
        f"{args.events / elapsed:,.0f} deliveries/s (process start included), each once"
    )


if __name__ == "__main__":
    main()
