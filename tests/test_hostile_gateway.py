"""mesh-serve against slow and greedy clients, over real sockets: slowloris headers, a
dribbled body, too many connections from one address or in total."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson

from conftest import log_lines
from serving import Server, serving

EVENT = orjson.dumps({"type": "ci.result", "source": "jenkins", "payload": {"ok": True}})
SLOW_START = b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # headers never finished


def address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(server: Server, source: str = "127.0.0.1", first: bytes = b"") -> socket.socket:
    sock = socket.create_connection(address(server), timeout=5, source_address=(source, 0))
    if first:
        sock.sendall(first)
    return sock


@contextmanager
def held(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def still_open(sock: socket.socket) -> bool:
    """True if the server has neither answered nor closed `sock`."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection; fails if it does not."""
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"still open after {timeout}s; got {received!r}") from None
    return received


def open_sockets(pid: int) -> int:
    return sum(
        1 for fd in os.listdir(f"/proc/{pid}/fd") if "socket:" in _link(f"/proc/{pid}/fd/{fd}")
    )


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length, from a connection that stays open."""
    sock.settimeout(5)
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def healthz_seconds(server: Server) -> float:
    """Seconds for /healthz on a fresh connection from 127.0.0.1."""
    start = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=5) as http:
        answer = http.get("/healthz")
    assert answer.status_code == 200 and answer.json() == {"status": "ok"}
    return time.monotonic() - start


def slowloris(server: Server, count: int) -> list[socket.socket]:
    """`count` connections, 50 from each of 127.0.0.2, .3, ..., each with half a request."""
    return [connect(server, f"127.0.0.{2 + i // 50}", SLOW_START) for i in range(count)]


def test_healthz_answers_while_200_slowloris_clients_hold_connections(root: Path) -> None:
    with serving(root, "--dispatch-every", "0") as server, held(slowloris(server, 200)) as slow:
        for _ in range(3):
            for sock in slow:
                sock.sendall(b"X-Slow: 1\r\n")  # a header line now and then, never the end
            assert healthz_seconds(server) < 1.0
            time.sleep(0.5)
        # the server really holds them all (under the default caps) and still answers
        assert open_sockets(server.proc.pid) >= 200
        assert all(still_open(sock) for sock in slow)


def test_slow_clients_cannot_fill_the_connection_cap(root: Path) -> None:
    with serving(root, "--dispatch-every", "0", "--max-connections", "50") as server:
        healthz_seconds(server)  # started: the writer's socket is open
        before = open_sockets(server.proc.pid)
        with held(slowloris(server, 200)) as slow:
            for _ in range(3):
                assert healthz_seconds(server) < 1.0  # the oldest slow one made room
            time.sleep(0.3)
            # descriptors stay bounded: each new connection closed the oldest waiting one
            assert open_sockets(server.proc.pid) <= before + 50
            assert not any(still_open(sock) for sock in slow[:100])
            assert sum(still_open(sock) for sock in slow) <= 50
            assert read_until_closed(slow[0], 2) == b""  # evicted silently


def test_total_cap_refuses_when_every_connection_is_busy(root: Path) -> None:
    with serving(root, "--dispatch-every", "0", "--max-connections", "3") as server:
        posting = (
            b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {server.token}\r\n".encode()
            + f"Content-Length: {len(EVENT)}\r\n\r\n".encode()
        )
        busy = [connect(server, f"127.0.0.{2 + i}", posting) for i in range(3)]
        with held(busy):
            time.sleep(0.3)  # headers in: these wait for their bodies, none can be evicted
            extra = connect(server, "127.0.0.9")
            answer = read_until_closed(extra, 2)
            extra.close()
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"retry-after: 1" in answer and b"all busy" in answer
            assert all(still_open(sock) for sock in busy)
            busy[0].sendall(EVENT)  # a busy one finishes, and is answered as usual
            assert read_answer(busy[0]).startswith(b"HTTP/1.1 201 ")


def test_half_sent_headers_are_closed_after_the_header_timeout(root: Path) -> None:
    with serving(root, "--dispatch-every", "0", "--header-timeout", "1") as server:
        # a header line every 0.3 s: never idle, so uvicorn's keep-alive timer never fires
        slow = connect(server, first=b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        received = b""
        with held([slow]):
            while time.monotonic() - start < 5:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                if select.select([slow], [], [], 0.3)[0]:
                    received = read_until_closed(slow, 2)
                    break
            elapsed = time.monotonic() - start
        assert 0.8 <= elapsed <= 2.5, elapsed
        assert received == b"" or received.startswith(b"HTTP/1.1 408 "), received

        # a connection that sends nothing is closed as well, without an answer
        silent = connect(server)
        start = time.monotonic()
        with held([silent]):
            assert read_until_closed(silent, 4) == b""
        assert 0.8 <= time.monotonic() - start <= 2.5

        # after an answer, the next request's headers have the same time
        kept = connect(server)
        with held([kept]):
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_answer(kept).startswith(b"HTTP/1.1 200 ")
            kept.sendall(b"GET /healthz HTTP/1.1\r\n")  # and then nothing more
            start = time.monotonic()
            assert read_until_closed(kept, 4).startswith(b"HTTP/1.1 408 ")
        assert 0.8 <= time.monotonic() - start <= 2.5

        assert healthz_seconds(server) < 1.0  # a prompt request is not affected


def test_dribbled_body_is_cut_off_and_nothing_is_written(root: Path) -> None:
    with serving(root, "--dispatch-every", "0", "--body-timeout", "1") as server:
        events_before = len(log_lines(root))
        dribbler = connect(
            server,
            first=b"POST /events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Authorization: Bearer {server.token}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(EVENT)}\r\n\r\n".encode(),
        )
        start = time.monotonic()
        received = b""
        with held([dribbler]):
            # the whole body in 12 pieces 0.25 s apart: complete after 3 s, were it let
            pieces = [EVENT[len(EVENT) * i // 12 : len(EVENT) * (i + 1) // 12] for i in range(12)]
            for piece in pieces:
                try:
                    dribbler.sendall(piece)
                except (BrokenPipeError, ConnectionResetError):
                    break
                if select.select([dribbler], [], [], 0.25)[0]:
                    received = read_until_closed(dribbler, 2)
                    break
            elapsed = time.monotonic() - start
        assert 0.8 <= elapsed <= 2.5, elapsed
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), received
        assert b"connection: close" in head.lower()
        assert orjson.loads(body)["error"]["code"] == 408
        assert len(log_lines(root)) == events_before  # nothing appended

        # the same body sent promptly is a valid event: it was the pace that was refused
        with server.client() as http:
            answer = http.post("/events", content=EVENT)
            assert answer.status_code == 201, answer.text
            assert http.get("/events").json()["events"][-1]["event_id"] == answer.json()["event_id"]
        assert len(log_lines(root)) == events_before + 1


def test_one_address_over_its_cap_is_refused_and_others_are_served(root: Path) -> None:
    args = ("--dispatch-every", "0", "--max-connections-per-client", "4")
    with serving(root, *args) as server:
        greedy = [connect(server, "127.0.0.2", SLOW_START) for _ in range(4)]
        with held(greedy):
            over = connect(server, "127.0.0.2")
            answer = read_until_closed(over, 2)
            over.close()
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"4 connections from 127.0.0.2" in answer
            assert all(still_open(sock) for sock in greedy)  # refusing did not drop these

            with server.client() as http:  # another address is served meanwhile
                assert http.get("/events").status_code == 200

            greedy.pop().close()  # one fewer: the address may connect again
            time.sleep(0.2)
            transport = httpx.HTTPTransport(local_address="127.0.0.2")
            with server.client(transport=transport) as http:
                assert http.get("/events").status_code == 200
