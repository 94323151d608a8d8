"""The gateway's writer: a child process that appends what HTTP requests submit, in groups.

Why a process: the event loop parses and validates requests while the writer seals, signs
and fsyncs. In one process both would queue for one interpreter lock and each write would
wait for the other's turn; in two they run on two cores.

Why groups: every append costs two fsyncs (the log, then the index commit that makes it
count). Whatever requests arrive while one group is being written go out together in the
next, so many requests share those flushes (group commit). Each request stays all or
nothing: if a group fails on one request's input, its requests are appended one by one so
that only the bad one fails.

The protocol, over a socket pair, is length-prefixed JSON frames:
    request   [id, [draft fields...], ...]          (a Draft as a list, in field order)
    answer    [id, group_size, "ok", [[event_id, seq, duplicate, envelope|null], ...]]
              [id, group_size, "error", kind, message]
`group_size` is the number of events in the group on the first answer of each group, else 0.
The writer ignores SIGINT and SIGTERM: it stops when the gateway closes the socket (or dies),
after appending everything it has already read.
"""

from __future__ import annotations

import signal
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ..envelope import Draft
from ..errors import BadInput, EventTooLarge, UnknownEvent
from ..mesh import Mesh
from ..store.identity import Identity
from ..store.log import Appended
from ..store.paths import Layout

HEADER = struct.Struct("!I")
GROUP_LIMIT = 20_000  # events per group at most
_RECV = 1 << 20
ERROR_KINDS: dict[str, type[Exception]] = {
    "EventTooLarge": EventTooLarge,
    "UnknownEvent": UnknownEvent,
    "BadInput": BadInput,
}


def frame(data: Any) -> bytes:
    body = orjson.dumps(data)
    return HEADER.pack(len(body)) + body


def split_frames(buffer: bytearray) -> Iterator[bytes]:
    """Complete frames from the front of `buffer`, which keeps any partial one."""
    start = 0
    while len(buffer) - start >= HEADER.size:
        (size,) = HEADER.unpack_from(buffer, start)
        end = start + HEADER.size + size
        if len(buffer) < end:
            break
        yield bytes(buffer[start + HEADER.size : end])
        start = end
    del buffer[:start]


def spec(mesh: Mesh) -> str:
    """What the child needs to open the same node: the paths and the identity."""
    layout, identity = mesh.layout, mesh.identity
    return orjson.dumps(
        {
            "root": str(layout.root),
            "log_file": str(layout.log_file),
            "state_dir": str(layout.state_dir),
            "ledger_dir": str(layout.ledger_dir),
            "node_id": identity.node_id,
            "capabilities": list(identity.capabilities),
            "created_at": identity.created_at,
        }
    ).decode()


def open_mesh(spec_json: str) -> Mesh:
    data = orjson.loads(spec_json)
    layout = Layout(*(Path(data[k]) for k in ("root", "log_file", "state_dir", "ledger_dir")))
    identity = Identity(data["node_id"], tuple(data["capabilities"]), data["created_at"])
    return Mesh(layout, identity)


class Writer:
    def __init__(self, mesh: Mesh, sock: socket.socket) -> None:
        self.mesh = mesh
        self.sock = sock

    def run(self) -> None:
        buffer = bytearray()
        while True:
            chunk = self.sock.recv(_RECV)
            if not chunk:
                return
            buffer += chunk
            self._drain(buffer)  # whatever else is already waiting joins this group
            requests = [orjson.loads(raw) for raw in split_frames(buffer)]
            index = 0
            while index < len(requests):
                group: list[list[Any]] = []
                events = 0
                while index < len(requests) and (not group or events < GROUP_LIMIT):
                    group.append(requests[index])
                    events += len(requests[index][1])
                    index += 1
                self.sock.sendall(b"".join(frame(a) for a in self.commit(group, events)))

    def _drain(self, buffer: bytearray) -> None:
        self.sock.setblocking(False)
        try:
            while len(buffer) < 64 * _RECV:
                chunk = self.sock.recv(_RECV)
                if not chunk:
                    break
                buffer += chunk
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def commit(self, group: list[list[Any]], events: int) -> list[list[Any]]:
        drafts = [[Draft(*fields) for fields in request[1]] for request in group]
        outcomes: list[list[Appended] | Exception]
        try:
            results = self.mesh.publish_drafts([d for ds in drafts for d in ds])
            outcomes, position = [], 0
            for ds in drafts:
                outcomes.append(results[position : position + len(ds)])
                position += len(ds)
        except BadInput as exc:
            if len(group) == 1:
                outcomes = [exc]
            else:  # find the request at fault: the others go in on their own
                outcomes = []
                for ds in drafts:
                    try:
                        outcomes.append(self.mesh.publish_drafts(ds))
                    except Exception as one:
                        outcomes.append(one)
        except Exception as exc:  # the disk or the index failed: every request of the group
            outcomes = [exc] * len(group)
        answers = []
        for number, (request, outcome) in enumerate(zip(group, outcomes, strict=True)):
            size = events if number == 0 else 0
            if isinstance(outcome, Exception):
                kind = type(outcome).__name__ if type(outcome).__name__ in ERROR_KINDS else ""
                message = (
                    getattr(outcome, "message", None) or f"{type(outcome).__name__}: {outcome}"
                )
                answers.append([request[0], size, "error", kind, message])
            else:
                single = len(outcome) == 1  # one event: its envelope goes back to the client
                answers.append(
                    [
                        request[0],
                        size,
                        "ok",
                        [
                            [r.event_id, r.seq, r.duplicate, r.envelope if single else None]
                            for r in outcome
                        ],
                    ]
                )
        return answers


def main(argv: list[str]) -> None:
    """`python -m orxaq_autonomy.gateway.writer FD SPEC`: serve the gateway on socket FD."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=int(argv[0]))
    mesh = open_mesh(argv[1])
    try:
        Writer(mesh, sock).run()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the gateway is gone: nobody is waiting for answers
    finally:
        mesh.close()
        sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
