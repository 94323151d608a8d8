"""HTTP gateway throughput and latency on loopback: single-event POSTs and batch POSTs.

    .venv/bin/python bench/bench_serve.py [--requests 20000] [--concurrency 32]

Starts a real `mesh-serve` (uvicorn, default settings but the rate limit, with the
background dispatcher on) in a throwaway root and drives it from this process with a
minimal keep-alive HTTP/1.1 client on asyncio: a general-purpose client would cost more
CPU than the server on this 2-core machine and measure itself. Every answer is checked
(201 and an event id) and the log must hold exactly the events sent. Targets (issue 6):
>= 2,000 single POSTs/s with p95 <= 10 ms; batches >= 20,000 events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
EXTRA = os.environ.get("BENCH_SERVE_ARGS", "").split()


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(
        self, path: str, body: bytes, token: str, method: str = "POST"
    ) -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)


async def drive(
    port: int, token: str, bodies: list[bytes], path: str, concurrency: int
) -> tuple[float, list[float], list[bytes]]:
    todo = iter(range(len(bodies)))
    latencies: list[float] = []
    answers: list[bytes] = [b""] * len(bodies)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = Connection(reader, writer)
        for index in todo:
            start = time.perf_counter()
            status, answer = await conn.post(path, bodies[index], token)
            latencies.append(time.perf_counter() - start)
            if status != 201:
                raise SystemExit(f"request {index}: {status} {answer[:200]!r}")
            answers[index] = answer
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, answers


async def drive_at_rate(
    port: int, token: str, bodies: list[bytes], rate: float, connections: int
) -> tuple[float, list[float]]:
    """Open loop: request i is due at start + i / rate, whatever came before (a closed loop
    would slow down with the server and hide its latency). Latency counts from the due time,
    so time spent waiting for a free connection is included."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(Connection(*await asyncio.open_connection("127.0.0.1", port)))
    latencies: list[float] = []
    clock = time.perf_counter  # uvloop's loop.time() has millisecond steps
    start = clock() + 0.05

    async def one(index: int, due: float) -> None:
        conn = await pool.get()
        status, answer = await conn.post("/events", bodies[index], token)
        latencies.append(clock() - due)
        pool.put_nowait(conn)
        if status != 201:
            raise SystemExit(f"request {index}: {status} {answer[:200]!r}")

    tasks = []
    for index in range(len(bodies)):
        due = start + index / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(index, due)))
    await asyncio.gather(*tasks)
    elapsed = clock() - start
    while not pool.empty():
        pool.get_nowait().writer.close()
    return elapsed, latencies


def start_server(root: Path, token_file: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = Path(sys.executable).with_name("orxaq-autonomy")
    subprocess.run(
        [exe, "--root", root, "mesh-init", "--node-id", "bench"], check=True, capture_output=True
    )
    proc = subprocess.Popen(
        [
            exe,
            "--root",
            root,
            "mesh-serve",
            "--port",
            "0",
            "--json",
            "--rate-limit",
            "0",
            *EXTRA,
            "--token-file",
            token_file,
        ],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    info = orjson.loads(proc.stdout.readline())
    return proc, int(info["port"])


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=int, default=2000, help="paced phase, requests/s")
    parser.add_argument("--batch-events", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "node"
        token = secrets.token_urlsafe(24)
        token_file = Path(tmp) / "token"
        token_file.write_text(token)
        os.chmod(token_file, 0o600)
        proc, port = start_server(root, token_file)
        try:
            warm = [
                orjson.dumps({"topic": "warm", "event_type": "up", "payload": {"i": i}})
                for i in range(500)
            ]
            asyncio.run(drive(port, token, warm, "/events", args.concurrency))

            bodies = [
                orjson.dumps(
                    {
                        "type": "ci.result",
                        "source": "bench",
                        "payload": {"run": i, "ok": i % 7 != 0, "job": "build"},
                    }
                )
                for i in range(args.requests)
            ]
            elapsed, lat, answers = asyncio.run(
                drive(port, token, bodies, "/events", args.concurrency)
            )
            ids = {orjson.loads(a)["event_id"] for a in answers}
            assert len(ids) == args.requests, "duplicate or missing ids"
            print(
                f"single POST /events: {args.requests} requests, concurrency "
                f"{args.concurrency}: {args.requests / elapsed:,.0f} req/s; latency p50 "
                f"{percentile(lat, 0.5) * 1e3:.2f} ms, p95 {percentile(lat, 0.95) * 1e3:.2f}"
                f" ms, p99 {percentile(lat, 0.99) * 1e3:.2f} ms"
            )

            paced = [
                orjson.dumps({"type": "ci.result", "source": "bench", "payload": {"paced": i}})
                for i in range(args.rate * 5)
            ]
            elapsed, lat = asyncio.run(drive_at_rate(port, token, paced, args.rate, 64))
            print(
                f"paced POST /events at {args.rate:,}/s for 5 s: {len(paced) / elapsed:,.0f} "
                f"req/s done; latency p50 {percentile(lat, 0.5) * 1e3:.2f} ms, p95 "
                f"{percentile(lat, 0.95) * 1e3:.2f} ms, p99 {percentile(lat, 0.99) * 1e3:.2f} ms"
            )

            size = args.batch_size
            batches = [
                orjson.dumps(
                    [
                        {"topic": "load", "event_type": "batch", "payload": {"b": b, "i": i}}
                        for i in range(size)
                    ]
                )
                for b in range(args.batch_events // size)
            ]
            elapsed, lat, _ = asyncio.run(drive(port, token, batches, "/events/batch", 4))
            events = len(batches) * size
            print(
                f"batch POST /events/batch: {events} events in {len(batches)} requests of "
                f"{size}, concurrency 4: {events / elapsed:,.0f} events/s; latency p50 "
                f"{percentile(lat, 0.5) * 1e3:.1f} ms, p95 {percentile(lat, 0.95) * 1e3:.1f} ms"
            )

            async def page_reads() -> list[float]:
                conn = Connection(*await asyncio.open_connection("127.0.0.1", port))
                _, first = await conn.post("/events?limit=1", b"", token, "GET")
                after = orjson.loads(first)["events"][0]["event_id"]
                took = []
                for _ in range(3):  # the first read indexes everything published since
                    start = time.perf_counter()
                    status, _ = await conn.post(
                        f"/events?after={after}&limit=100", b"", token, "GET"
                    )
                    took.append(time.perf_counter() - start)
                    assert status == 200
                conn.writer.close()
                return took

            reads = asyncio.run(page_reads())
            cold, later = reads[0], reads[1:]
            print(
                f"GET /events?after=<first>&limit=100 after the ingest: first {cold * 1e3:.0f} ms "
                f"(indexes the backlog), then {max(later) * 1e3:.1f} ms"
            )
        finally:
            proc.terminate()
            proc.wait(30)
        with open(root / "artifacts/autonomy/event_mesh/events.ndjson", "rb") as log:
            total = sum(1 for _ in log)
        expected = 500 + args.requests + len(paced) + len(batches) * size
        print(f"log holds {total} events (sent {expected})")
        assert total == expected


if __name__ == "__main__":
    main()
