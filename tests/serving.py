"""Real servers for the gateway tests: `mesh-serve` as a process on 127.0.0.1, and a
webhook receiver that can be told to fail, hang or accept."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson

from conftest import ENV_VARS


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    token: str | None
    root: Path

    def client(self, token: str | None = "default", **kwargs: Any) -> httpx.Client:
        given = self.token if token == "default" else token
        headers = {"Authorization": f"Bearer {given}"} if given else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(30)


def child_pids(pid: int, marker: str) -> list[int]:
    """The processes `pid` started whose command line holds `marker` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and marker in cmdline:
            found.append(int(entry.name))
    return found


def write_token(path: Path) -> str:
    token = secrets.token_urlsafe(24)
    path.write_text(token + "\n")
    os.chmod(path, 0o600)
    return token


@contextmanager
def serving(root: Path, *args: str, token: bool = True) -> Iterator[Server]:
    """`mesh-serve --port 0` on `root`; stopped with SIGTERM (exit 0 expected) at the end."""
    value = None
    extra = list(args)
    if token:
        token_file = root.parent / f"token-{secrets.token_hex(4)}"
        value = write_token(token_file)
        extra += ["--token-file", str(token_file)]
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orxaq_autonomy",
            "--root",
            str(root),
            "mesh-serve",
            "--port",
            "0",
            "--json",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"mesh-serve did not start: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
    info = orjson.loads(line)
    server = Server(proc, info["url"], value, root)
    try:
        yield server
        if proc.poll() is None:
            assert server.stop() == 0, "a SIGTERMed mesh-serve shuts down cleanly, exit 0"
    finally:
        if proc.poll() is None:
            server.stop(signal.SIGKILL)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@dataclass
class Receiver:
    """A webhook endpoint on 127.0.0.1. `mode`: "ok" (204), "fail" (500), "reject" (400) or
    "hang" (answers after `hang_seconds`, too late for the forwarder's timeout)."""

    mode: str = "ok"
    hang_seconds: float = 2.0
    received: list[dict[str, Any]] = field(default_factory=list)  # accepted deliveries
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def ids(self) -> list[str]:
        with self.lock:
            return [d["headers"]["x-orxaq-event-id"] for d in self.received]

    def wait_for(self, count: int, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(set(self.ids())) >= count:
                return self.ids()
            time.sleep(0.05)
        raise AssertionError(f"receiver got {len(set(self.ids()))} of {count} events")


@contextmanager
def receiving(mode: str = "ok") -> Iterator[Receiver]:
    receiver = Receiver(mode)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with receiver.lock:
                receiver.attempts += 1
                mode = receiver.mode
            if mode == "hang":
                time.sleep(receiver.hang_seconds)
            status = {"ok": 204, "fail": 500, "reject": 400, "hang": 204}[mode]
            if status == 204 and mode == "ok":
                with receiver.lock:
                    receiver.received.append(
                        {
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": orjson.loads(body),
                            "path": self.path,
                        }
                    )
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
