"""`mesh-serve`: the mesh's HTTP front door, an ASGI app (Starlette) over the library API.

    POST /events          one event (mesh fields, router format or CloudEvents; intake.py)
    POST /events/batch    a list of events: all appended, or none
    GET  /events          ?after=&match=&limit= cursor paging in arrival order
    GET  /events/{id}     one event; an id prefix is enough
    GET  /healthz         the process answers
    GET  /readiness       whether it can take writes, and on what that is based
    GET  /metrics         Prometheus text (metrics.py)

A write is answered only after its event is durably in the log. A writer process appends
concurrent writes in groups (writer.py), so that many requests share each flush and the
event loop never waits on the disk or on the writer's CPU. Reads run on a reader thread of
their own for the same reason.

Security, in the order a request meets it: connection caps, in total and per client
address (a connection over them is answered 503 and closed at once, so that file descriptors
stay bounded); the header timeout (a connection that has not sent a request's headers in
time is closed); per-client rate limit (429 with Retry-After); the bearer token, compared in
constant time before any body is read (no token configured: writes are refused; tokens in
the query string are refused); the body limit (413) and the body timeout (408).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import itertools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..envelope import Draft
from ..errors import BadInput, EventTooLarge, MeshError, OperationFailed, UnknownEvent
from ..exchange.listener import ListenerThread, nats_config
from ..mesh import Mesh
from ..store.log import Appended
from .intake import (
    InvalidField,
    cloudevent_from_http,
    draft_from_request,
    drafts_from_batch,
    is_binary_cloudevent,
)
from .metrics import GatewayMetrics

T = TypeVar("T")

SINGLE_BODY_LIMIT = 2 * 1024 * 1024  # one event is at most 1 MiB serialised
TOKEN_ENV = "ORXAQ_AUTONOMY_SERVE_TOKEN"
_DIGITS = re.compile(r"[0-9]{1,12}")
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Settings:
    token: bytes | None = None  # None: writes are refused
    rate_limit: float = 1000.0  # requests per second per client; 0 turns it off
    burst: int = 2000  # requests a client may make at once
    max_body: int = 16 * 1024 * 1024  # bytes, for batches
    max_batch_events: int = 10_000
    max_queued_events: int = 100_000  # beyond this, writes get 503 until the disk catches up
    dispatch_every: float = 1.0  # seconds between background dispatch runs; 0 turns it off
    max_connections: int = 1024  # open at once; beyond, the oldest idle one makes room, or 503
    max_connections_per_client: int = 64  # open at once from one address; 0 turns it off
    header_timeout: float = 10.0  # seconds for a request's headers, from connect or last answer
    body_timeout: float = 30.0  # seconds for a request's body, from the end of its headers


def load_token(token_file: str | None, env: Mapping[str, str] | None = None) -> bytes | None:
    """The bearer token from `token_file`, else from $ORXAQ_AUTONOMY_SERVE_TOKEN, else None."""
    environ = os.environ if env is None else env
    if token_file is not None:
        path = Path(token_file)
        try:
            mode = path.stat().st_mode
            raw = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"cannot read --token-file {token_file}: {exc}") from None
        if mode & 0o077:
            raise BadInput(f"--token-file {token_file} is readable by others: chmod 600 it")
        where = f"--token-file {token_file}"
    elif environ.get(TOKEN_ENV):
        raw, where = environ[TOKEN_ENV].strip(), TOKEN_ENV
    else:
        return None
    if len(raw) < MIN_TOKEN_CHARS or any(c.isspace() for c in raw):
        raise BadInput(f"the token in {where} needs {MIN_TOKEN_CHARS}+ characters, no spaces")
    return raw.encode()


class HTTPError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers


def json_response(status: int, data: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers, media_type="application/json")


def error_response(exc: HTTPError) -> Response:
    error: dict[str, Any] = {"code": exc.status, "message": " ".join(exc.message.split())}
    if exc.field is not None:
        error["field"] = exc.field
    return json_response(exc.status, {"error": error}, exc.headers)


# --- rate limiting -------------------------------------------------------------------------


class RateLimiter:
    """A token bucket per client address; the least recently seen are forgotten first."""

    def __init__(
        self,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def wait(self, client: str) -> float:
        """0 when `client` may go ahead now, else the seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = [float(self.burst), now]
            if len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(client)
            bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1:
            bucket[0] -= 1
            return 0.0
        return (1 - bucket[0]) / self.rate


# --- the writer process ---------------------------------------------------------------------


class Committer:
    """The gateway's side of the writer process (writer.py): submits drafts, awaits answers.
    If the writer dies, waiting writes get 503 and `on_failure` is called: the gateway then
    stops and exits 1, so that a supervisor restarts it rather than it refusing writes."""

    def __init__(
        self,
        mesh: Mesh,
        metrics: GatewayMetrics,
        max_queued: int,
        on_commit: Callable[[], None] = lambda: None,
        on_failure: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.mesh = mesh
        self.metrics = metrics
        self.max_queued = max_queued
        self.on_commit = on_commit
        self.on_failure = on_failure
        self._stopping = False
        self.queued = 0  # events submitted and not yet answered
        self.failure: str | None = None
        self._waiting: dict[int, asyncio.Future[list[Appended]]] = {}
        self._ids = itertools.count(1)
        self._process: subprocess.Popen[bytes] | None = None
        self._stream: asyncio.StreamWriter | None = None
        self._answers: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None and not self.failure

    async def start(self) -> None:
        from .writer import spec

        ours, theirs = socket.socketpair()
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orxaq_autonomy.gateway.writer",
                str(theirs.fileno()),
                spec(self.mesh),
            ],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        reader, self._stream = await asyncio.open_unix_connection(sock=ours)
        self._answers = asyncio.ensure_future(self._read_answers(reader))

    async def stop(self, timeout: float = 60) -> None:
        """Let the writer append everything submitted, then wait for it to exit (and kill
        it if it has not within `timeout`: what it had not committed is not acknowledged)."""
        self._stopping = True
        if self._stream is not None and not self._stream.is_closing():
            self._stream.write_eof()
        if self._answers is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._answers), timeout)
        if self._process is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._process.wait, 5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._stream is not None:
            self._stream.close()

    async def submit(self, drafts: list[Draft]) -> list[Appended]:
        if not self.alive or self._stream is None:
            raise HTTPError(503, f"the writer is not running: {self.failure or 'stopped'}")
        if self.queued + len(drafts) > self.max_queued:
            raise HTTPError(
                503,
                f"{self.queued} events are waiting for the disk; try again shortly",
                headers={"Retry-After": "1"},
            )
        from .writer import frame

        number = next(self._ids)
        data = frame([number, [tuple(d) for d in drafts]])  # first: it may raise
        future: asyncio.Future[list[Appended]] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        self.queued += len(drafts)
        try:
            self._stream.write(data)
            await self._stream.drain()  # the socket's buffer is full: wait for the writer
            return await future
        except (ConnectionError, RuntimeError) as exc:
            raise HTTPError(503, f"the writer is not running: {exc}") from None
        finally:
            self.queued -= len(drafts)
            self._waiting.pop(number, None)

    async def _read_answers(self, reader: asyncio.StreamReader) -> None:
        from .writer import ERROR_KINDS, HEADER

        try:
            while True:
                (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                number, group, status, *rest = orjson.loads(await reader.readexactly(size))
                if group:
                    self.metrics.group_size.observe(group)
                future = self._waiting.pop(number, None)
                results = [Appended(*r) for r in rest[0]] if status == "ok" else []
                fresh = sum(1 for r in results if not r.duplicate)
                self.metrics.published.inc(fresh)  # counted even if the client has gone
                self.metrics.duplicates.inc(len(results) - fresh)
                if fresh:
                    self.on_commit()
                if future is None or future.done():
                    continue  # the request was cancelled; its events (if any) are in the log
                if status == "error":
                    kind, message = rest
                    future.set_exception(ERROR_KINDS.get(kind, OperationFailed)(message))
                else:
                    future.set_result(results)
        except asyncio.IncompleteReadError:
            self.failure = self.failure or "the writer process exited"
        except Exception as exc:  # pragma: no cover - a protocol bug
            self.failure = f"{type(exc).__name__}: {exc}"
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(HTTPError(503, f"the writer failed: {self.failure}"))
            self._waiting.clear()
            if not self._stopping:
                self.on_failure(self.failure or "the writer process exited")


# --- background dispatch -------------------------------------------------------------------


class DispatchLoop:
    """Runs the dispatcher (built-in chain, user handlers, forwarding) in the background:
    soon after new events are committed, and every `every` seconds for retries that
    come due. A `mesh-dispatch` from cron at the same time simply skips its turn."""

    def __init__(self, mesh: Mesh, every: float) -> None:
        from ..dispatch.dispatcher import Dispatcher

        self.dispatcher = Dispatcher(mesh)  # here, so that a broken config stops the start
        self.every = every
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-dispatch", daemon=True)
        self.last_run: float | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.wake.wait(self.every)
                if self._stop.wait(0.25):  # let a burst of commits gather first
                    break
                self.wake.clear()
                try:
                    self.dispatcher.run(wait=False)
                    self.last_error = None
                except Exception as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    print(f"orxaq-autonomy: dispatch failed: {self.last_error}", file=sys.stderr)
                self.last_run = time.time()
        finally:
            self.dispatcher.mesh.close()


# --- the app -------------------------------------------------------------------------------


class Gateway:
    """The app and what it runs on: a committer, a reader thread, a dispatch loop."""

    def __init__(self, mesh: Mesh, settings: Settings) -> None:
        self.settings = settings
        self.layout = mesh.layout
        self.metrics = GatewayMetrics()
        # Each thread gets its own Mesh: SQLite connections stay in the thread that made them.
        self.reader = Mesh(mesh.layout, mesh.identity)
        self.metrics.watch(self.reader)
        self.dispatch = (
            DispatchLoop(Mesh(mesh.layout, mesh.identity), settings.dispatch_every)
            if settings.dispatch_every > 0
            else None
        )
        self.committer = Committer(
            mesh,
            self.metrics,
            settings.max_queued_events,
            self.dispatch.wake.set if self.dispatch else (lambda: None),
            self._writer_failed,
        )
        # [nats] set: the real-time exchange runs beside the HTTP API (its own thread)
        self.exchange = (
            ListenerThread(
                mesh.layout, mesh.identity, self.dispatch.wake.set if self.dispatch else None
            )
            if nats_config(mesh.layout).enabled
            else None
        )
        self.fatal: str | None = None
        self.server: Any = None  # the uvicorn server, once serve() runs
        self.limiter = RateLimiter(settings.rate_limit, settings.burst)
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-reader")
        self.started = time.time()
        routes = [
            Route("/events", self._guard(self.events), methods=["GET", "POST"]),
            Route("/events/batch", self._guard(self.post_batch), methods=["POST"]),
            Route("/events/{ref}", self._guard(self.get_event), methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readiness", self._guard(self.readiness), methods=["GET"]),
            Route("/metrics", self._guard(self.prometheus), methods=["GET"]),
        ]
        self.app: ASGIApp = _Timing(
            _BodyDeadline(
                Starlette(
                    routes=routes,
                    lifespan=self._lifespan,
                    exception_handlers={StarletteHTTPException: _routing_error},
                ),
                settings.body_timeout,
            ),
            self.metrics,
        )

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        await self.committer.start()
        if self.dispatch:
            self.dispatch.start()
        if self.exchange:
            self.exchange.start()

    async def stop(self) -> None:
        await self.committer.stop()
        loop = asyncio.get_running_loop()
        if self.dispatch:
            await loop.run_in_executor(None, self.dispatch.stop)
        if self.exchange:
            await loop.run_in_executor(None, self.exchange.stop)
        await loop.run_in_executor(self._reads, self.reader.close)
        self._reads.shutdown()

    def _lifespan(self, app: Starlette) -> Any:
        gateway = self

        class _Span:
            async def __aenter__(self) -> None:
                await gateway.start()

            async def __aexit__(self, *exc: object) -> None:
                await gateway.stop()

        return _Span()

    def _writer_failed(self, reason: str) -> None:
        self.fatal = reason
        print(f"orxaq-autonomy: error: {reason}; stopping", file=sys.stderr)
        if self.server is not None:
            self.server.should_exit = True

    async def _read(self, fn: Callable[[Mesh], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reads, fn, self.reader)

    # --- the checks every request meets -----------------------------------------------

    def _guard(
        self, endpoint: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            try:
                return await endpoint(request)
            except HTTPError as exc:
                return error_response(exc)
            except InvalidField as exc:
                return error_response(HTTPError(422, exc.reason, exc.field))
            except EventTooLarge as exc:
                return error_response(HTTPError(413, exc.message))
            except UnknownEvent as exc:
                return error_response(HTTPError(404, exc.message))
            except BadInput as exc:
                return error_response(HTTPError(422, exc.message, "event"))
            except MeshError as exc:
                return error_response(HTTPError(503, exc.message))
            except Exception as exc:
                print(f"orxaq-autonomy: internal error: {exc!r}", file=sys.stderr)
                return error_response(HTTPError(500, f"internal error: {type(exc).__name__}"))

        return guarded

    def _admit(self, request: Request, write: bool, limited: bool = True) -> None:
        client = request.client.host if request.client else "unknown"
        wait = self.limiter.wait(client) if limited else 0.0
        if wait:
            self.metrics.rate_limited.inc()
            raise HTTPError(
                429,
                f"rate limit: {self.settings.rate_limit:g} requests/s per client",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        if request.scope["query_string"] and any(
            name in request.query_params for name in ("access_token", "token")
        ):
            raise HTTPError(
                400, "tokens are refused in the query string; send Authorization: Bearer"
            )
        token = self.settings.token
        if token is None:
            # Without a token, reads are open to whatever can reach the port. A web page
            # could reach a loopback server by pointing its own name at 127.0.0.1 (DNS
            # rebinding): its requests then carry its name as Host, which is refused here.
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not _local_name(name.strip("[]")):
                raise HTTPError(403, f"Host {host!r} is refused without a token; use an address")
            if write:
                raise HTTPError(
                    403,
                    f"writes are refused: no token is configured (--token-file or {TOKEN_ENV})",
                )
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest first, always: the time taken must not depend on what was sent
        matches = hmac.compare_digest(given.strip().encode(), token)
        if not (matches and scheme.lower() == "bearer"):
            raise HTTPError(
                401,
                "missing or wrong bearer token",
                headers={"WWW-Authenticate": 'Bearer realm="orxaq-mesh"'},
            )

    async def _body(self, request: Request, limit: int, empty_ok: bool = False) -> tuple[Any, int]:
        """The parsed JSON body and its length in bytes (`None` for an empty body where
        `empty_ok`: a CloudEvent in binary mode may come without data)."""
        # The body is parsed as JSON whatever its Content-Type says (curl -d sends a form
        # type): a token is needed to write, so a browser's cross-site form cannot post.
        declared = request.headers.get("content-length")
        if declared is not None:
            if not _DIGITS.fullmatch(declared):
                raise HTTPError(400, "bad Content-Length")
            if int(declared) > limit:
                raise HTTPError(413, f"body of {declared} bytes; the limit is {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"body over the limit of {limit} bytes")
            chunks.append(chunk)
        from ..envelope import loads_json

        raw = b"".join(chunks)
        if empty_ok and not raw.strip():
            return None, size
        try:
            return loads_json(raw), size
        except ValueError as exc:
            raise HTTPError(400, f"invalid JSON: {exc}", "body") from None

    # --- endpoints --------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        # one route for both methods, so that a wrong method is told both in Allow
        if request.method == "POST":
            return await self.post_event(request)
        return await self.list_events(request)

    async def post_event(self, request: Request) -> Response:
        self._admit(request, write=True)
        binary = is_binary_cloudevent(request.headers)  # CloudEvents: ce-* headers
        body, size = await self._body(request, SINGLE_BODY_LIMIT, empty_ok=binary)
        body = cloudevent_from_http(request.headers, body, has_data=body is not None)
        draft = draft_from_request(body, size)
        (result,) = await self.committer.submit([draft])
        answer: dict[str, Any] = {
            "event_id": result.event_id,
            "seq": result.seq,
            "duplicate": result.duplicate,
        }
        if result.duplicate:
            return json_response(200, answer)
        answer["event"] = result.envelope
        return json_response(201, answer, {"Location": f"/events/{result.event_id}"})

    async def post_batch(self, request: Request) -> Response:
        self._admit(request, write=True)
        body, size = await self._body(request, self.settings.max_body)
        drafts = drafts_from_batch(body, self.settings.max_batch_events, size)
        results = await self.committer.submit(drafts)
        fresh = sum(1 for r in results if not r.duplicate)
        return json_response(
            201 if fresh else 200,
            {
                "published": fresh,
                "duplicates": len(results) - fresh,
                "results": [
                    {"event_id": r.event_id, "seq": r.seq, "duplicate": r.duplicate}
                    for r in results
                ],
            },
        )

    async def list_events(self, request: Request) -> Response:
        self._admit(request, write=False)
        params = request.query_params
        unknown = sorted(set(params) - {"after", "match", "limit"})
        if unknown:
            raise HTTPError(
                400, f"unknown parameter {unknown[0]!r}; known: after, match, limit", unknown[0]
            )
        raw_limit = params.get("limit", "100")
        if not _DIGITS.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= 1000:
            raise HTTPError(400, f"bad limit {raw_limit!r}: need 1-1000", "limit")
        after, match = params.get("after") or None, params.get("match") or None

        def page(mesh: Mesh) -> tuple[list[dict[str, Any]], str | None]:
            try:
                return mesh.page(after, match, int(raw_limit))
            except UnknownEvent:
                raise HTTPError(404, f"unknown event {after!r} in after", "after") from None
            except BadInput as exc:
                field = "match" if "pattern" in exc.message else "after"
                raise HTTPError(400, exc.message, field) from None

        events, cursor = await self._read(page)
        return json_response(200, {"events": events, "next": cursor})

    async def get_event(self, request: Request) -> Response:
        self._admit(request, write=False)
        ref = request.path_params["ref"]

        def get(mesh: Mesh) -> dict[str, Any]:
            try:
                return mesh.get(ref)
            except UnknownEvent:
                raise
            except BadInput as exc:
                raise HTTPError(400, exc.message) from None

        return json_response(200, await self._read(get))

    async def healthz(self, request: Request) -> Response:
        return json_response(200, {"status": "ok"})

    async def readiness(self, request: Request) -> Response:
        self._admit(request, write=False, limited=False)  # a probe must not see 429

        def checks(mesh: Mesh) -> dict[str, dict[str, Any]]:
            found: dict[str, dict[str, Any]] = {}
            try:
                tail = mesh.log.committed()
                found["log"] = {"ok": True, "detail": f"{tail.count} events, index agrees"}
            except Exception as exc:
                found["log"] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
            try:
                free = shutil.disk_usage(mesh.layout.log_file.parent).free
                found["disk"] = {
                    "ok": free >= 64 * 1024 * 1024,
                    "detail": f"{free // (1024 * 1024)} MiB free for the log (needs 64)",
                }
            except OSError as exc:
                found["disk"] = {"ok": False, "detail": f"cannot tell: {exc}"}
            return found

        found = await self._read(checks)
        found["committer"] = {
            "ok": self.committer.alive and self.committer.queued < self.settings.max_queued_events,
            "detail": f"writer process {'running' if self.committer.alive else 'stopped'}"
            + (f" ({self.committer.failure})" if self.committer.failure else "")
            + f", {self.committer.queued} events waiting",
        }
        if self.dispatch is not None:
            found["dispatch"] = {
                "ok": self.dispatch.last_error is None,
                "detail": self.dispatch.last_error
                or f"every {self.dispatch.every:g}s, last run "
                + (
                    f"{time.time() - self.dispatch.last_run:.1f}s ago"
                    if self.dispatch.last_run
                    else "not yet"
                ),
            }
        ready = all(check["ok"] for check in found.values())
        return json_response(
            200 if ready else 503,
            {
                "ready": ready,
                "writes": "accepted" if self.settings.token else "refused: no token configured",
                "checks": found,
            },
        )

    async def prometheus(self, request: Request) -> Response:
        self._admit(request, write=False, limited=False)
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        text = await self._read(lambda _: generate_latest(self.metrics.registry))
        return Response(text, 200, media_type=CONTENT_TYPE_LATEST)


async def _routing_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in the same JSON as every other error."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    return error_response(
        HTTPError(exc.status_code, f"{exc.detail}: {request.url.path}", None, headers)
    )


def _local_name(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


_ROUTES = ("/events/batch", "/events", "/healthz", "/readiness", "/metrics")


def _route_of(path: str) -> str:
    if path in _ROUTES:
        return path
    if path.startswith("/events/"):
        return "/events/{id}"
    return "other"


class _Timing:
    """Request count and latency by route, method and status, for every request."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route, method = _route_of(scope["path"]), scope["method"]
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - start)
            self.metrics.requests.labels(route, method, str(status)).inc()


class BodyTimeout(HTTPError):
    """The request's body did not arrive in time: answered 408, and the connection closes."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            408,
            f"the request body did not arrive within {seconds:g}s",
            headers={"Connection": "close"},
        )


class _BodyDeadline:
    """A request's body must be complete within `seconds` of its headers. A client that
    dribbles it gets 408 (raised from `receive`, so the endpoint stops reading and nothing
    is appended) and the connection is closed."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        complete = False

        async def receiving() -> Message:
            nonlocal complete
            if complete:  # later calls wait for the disconnect, as long as they like
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - loop.time())
            except TimeoutError:
                raise BodyTimeout(self.seconds) from None
            complete = message["type"] != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, receiving, send)


# --- serving -------------------------------------------------------------------------------

BACKLOG = 2048  # connections the kernel queues before they are accepted
FD_RESERVE = 128  # files the process keeps for itself: the log, the index, the writer, ...


class _Connection(Protocol):
    @property
    def awaiting_headers(self) -> bool: ...

    def evict(self) -> None: ...


class _Door:
    """The connections open now, oldest first, and how many each client address holds."""

    def __init__(self, limit: int, per_client: int, header_timeout: float) -> None:
        self.limit = limit
        self.per_client = per_client  # 0: no cap per address
        self.header_timeout = header_timeout
        self.open: dict[_Connection, str] = {}  # -> client address; in arrival order
        self.by_client: Counter[str] = Counter()

    def admit(self, connection: _Connection, client: str) -> str | None:
        """None if `connection` may stay, else why it may not. At the total cap, the oldest
        connection that is waiting for a request's headers (slow, or idle between requests)
        is closed to make room: a slow client cannot keep a fresh one out."""
        if self.per_client and self.by_client[client] >= self.per_client:
            return f"{self.per_client} connections from {client} are open"
        if len(self.open) >= self.limit:
            waiting = next((c for c in self.open if c.awaiting_headers), None)
            if waiting is None:
                return f"{self.limit} connections are open, all busy"
            self.release(waiting)
            waiting.evict()
        self.open[connection] = client
        self.by_client[client] += 1
        return None

    def release(self, connection: _Connection) -> None:
        client = self.open.pop(connection, None)
        if client is not None:
            self.by_client[client] -= 1
            if not self.by_client[client]:
                del self.by_client[client]


def _raw_answer(status: int, message: str, *headers: str) -> bytes:
    """A whole HTTP answer that closes the connection, for where there is no app to give it."""
    body = orjson.dumps({"error": {"code": status, "message": message}})
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    head = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *headers,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _protocol(door: _Door) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the connection caps and the header timeout, which
    uvicorn has not: its keep-alive timer stops at a request's first byte, so a client
    sending a header line every few seconds would hold its connection forever."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Guarded(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.admitted = False
            self.begun = False  # a request has started and its headers are not complete
            self.header_timer: asyncio.TimerHandle | None = None

        @property
        def awaiting_headers(self) -> bool:
            return self.header_timer is not None

        def evict(self) -> None:
            self._stop_waiting()
            self.transport.abort()  # the descriptor is freed now, not after a flush

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            refusal = door.admit(self, self.client[0] if self.client else "unknown")
            if refusal is not None:
                transport.write(_raw_answer(503, refusal, "retry-after: 1"))
                transport.close()
                return
            self.admitted = True
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            door.release(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.admitted:  # a refused connection is closing: what it sends is ignored
                super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.begun = True

        def on_headers_complete(self) -> None:
            self._stop_waiting()
            self.begun = False
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.timeout_keep_alive_task is not None:  # kept alive for the next request
                self._await_headers()

        def _await_headers(self) -> None:
            self._stop_waiting()
            self.header_timer = self.loop.call_later(door.header_timeout, self._headers_late)

        def _stop_waiting(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _headers_late(self) -> None:
            self.header_timer = None
            if self.transport.is_closing():
                return
            if self.begun:
                message = f"the request headers did not arrive within {door.header_timeout:g}s"
                self.transport.write(_raw_answer(408, message))
            self.transport.close()

    return Guarded


def _fit_open_files(connections: int) -> int:
    """Raise the soft limit on open files so that `connections`, the listen backlog and
    the process's own files fit (as far as the hard limit allows); the connections that fit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = connections + BACKLOG + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return connections
    return max(1, min(connections, soft - FD_RESERVE))


def listen(host: str, port: int, token: bytes | None) -> socket.socket:
    """A listening socket. Anything but loopback needs a token: reads would be open."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BadInput(f"bad --host {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    if token is None and not ipaddress.ip_address(address[0]).is_loopback:
        raise BadInput(
            f"refusing to listen on {host} without a token: set --token-file or {TOKEN_ENV}"
        )
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BadInput(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(BACKLOG)
    return sock


def serve(gateway: Gateway, sock: socket.socket) -> None:
    """Serve until SIGINT or SIGTERM; writes already accepted are appended before exit."""
    import uvicorn

    settings = gateway.settings
    limit = _fit_open_files(settings.max_connections)
    if limit < settings.max_connections:
        print(
            f"orxaq-autonomy: warning: --max-connections {settings.max_connections} lowered to"
            f" {limit}: the limit on open files is too low (ulimit -n)",
            file=sys.stderr,
        )
    door = _Door(limit, settings.max_connections_per_client, settings.header_timeout)
    config = uvicorn.Config(
        gateway.app,
        loop="uvloop",
        http=_protocol(door),
        ws="none",  # no WebSocket routes; an upgraded connection would escape the caps
        lifespan="on",
        access_log=False,
        log_level="warning",
        proxy_headers=False,  # the rate limit keys on the peer address; do not trust headers
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    # uvicorn re-raises the stop signal after its graceful shutdown, which would end the
    # process "killed by SIGTERM". A signal is how a server is asked to stop: exit 0 instead.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    gateway.server = uvicorn.Server(config)
    try:
        gateway.server.run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if gateway.fatal:
        raise OperationFailed(f"stopped serving: {gateway.fatal}")


class _Stopped(Exception):
    pass


def _stopped(signum: int, frame: Any) -> None:
    raise _Stopped
