"""`mesh-listen`: this node's events out to a NATS JetStream stream, the other nodes'
events in, milliseconds apart. Git stays the backbone; event ids make the paths dedupe.

Out: the log is watched (a stat every few milliseconds); each new event this node authored
is published in seq order to `<prefix>.<node>.<topic>.<event_type>` with Nats-Msg-Id =
event id, pipelined in chunks. The published position (a byte offset in the log) is kept in
the state file; after a crash the last second is sent again and the stream's duplicate
window drops it (and, beyond the window, admission finds the ids already in the logs).

In: a durable pull consumer named after the node reads the whole stream (a new node from
its start). Each message is checked as import checks a ledger file (wire.envelope_of), then
admitted (ledger/admit.py: chain, key, signature) and appended to the log; it is
acknowledged only after the append is fsynced. Events that wait for a predecessor or a key
stay unacknowledged and in memory, and are tried again every second (git may bring what
they wait for). A malformed or forged message is reported and terminated, never fatal.

Everything runs on one asyncio loop in one thread, which owns its `Node` (SQLite
connections stay in their thread); dispatch runs in a thread with its own `Node`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from ..config import Nats, load_config
from ..envelope import Envelope
from ..errors import BadInput
from ..ledger.admit import Admission, Admitter
from ..store.fsutil import atomic_write_json, read_json
from ..store.identity import Identity
from ..store.node import Node
from ..store.paths import Layout
from . import wire
from .errors import BadMessage, NeverConnected

STATE_FILE = "nats_exchange.json"
Progress = Callable[[dict[str, Any]], None]

POLL_SECONDS = 0.002  # how often the log is looked at for new events of this node
FETCH_BATCH = 2000
FETCH_WAIT = 0.25
PUBLISH_CHUNK = 2000  # publishes in flight at once (nats-py allows 4000)
PUBLISH_WAIT = 5.0  # seconds for the acks of a chunk
SETTLE_SECONDS = 1.0  # waiting events are tried again this often
STATE_SECONDS = 1.0
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 15.0
CONNECT_SECONDS = 1.5  # one connection attempt, all servers of the url
ACK_WAIT_SECONDS = 30.0


def state_path(layout: Layout) -> Path:
    return layout.state_dir / STATE_FILE


def nats_config(layout: Layout) -> Nats:
    return load_config(layout.state_dir / "config.toml").nats


def _auth(cfg: Nats, layout: Layout) -> dict[str, Any]:
    """Connection credentials, from where the config names them (never inline)."""

    def path(raw: str) -> Path:
        found = Path(os.path.expanduser(raw))
        return found if found.is_absolute() else layout.root / found

    if cfg.credentials_file:
        creds = path(cfg.credentials_file)
        if not creds.is_file():
            raise BadInput(f"[nats] credentials_file {creds} does not exist")
        return {"user_credentials": str(creds)}
    if cfg.token_file:
        try:
            token = path(cfg.token_file).read_text().strip()
        except OSError as exc:
            raise BadInput(f"[nats] token_file {path(cfg.token_file)}: {exc.strerror}") from None
        return {"token": token}
    if cfg.token_env:
        token = os.environ.get(cfg.token_env, "").strip()
        if not token:
            raise BadInput(f"[nats] token_env names ${cfg.token_env}, which is not set")
        return {"token": token}
    return {}


class _Dispatching:
    """Runs the dispatcher soon after new events land (in its own thread and Node)."""

    def __init__(self, layout: Layout, identity: Identity) -> None:
        from ..dispatch.dispatcher import Dispatcher

        self.dispatcher = Dispatcher(Node(layout, identity))
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-listen-dispatch", daemon=True)
        self.last_error: str | None = None

    def start(self) -> None:
        self.wake.set()  # events that arrived while no listener ran
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.wake.wait(1.0)
                if self._stop.wait(0.05):  # let a burst gather first
                    break
                self.wake.clear()
                try:
                    self.dispatcher.run(wait=False)
                    self.last_error = None
                except Exception as exc:  # a handler's or the config's: report, go on
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    print(f"orxaq-autonomy: dispatch failed: {self.last_error}", file=sys.stderr)
        finally:
            self.dispatcher.mesh.close()


class Listener:
    """One node's side of the exchange. `run()` until `stop()` or the deadline."""

    def __init__(
        self,
        layout: Layout,
        identity: Identity,
        cfg: Nats | None = None,
        progress: Progress | None = None,
        dispatch: bool = True,
        on_append: Callable[[], None] | None = None,
    ) -> None:
        self.layout = layout
        self.identity = identity
        self.cfg = cfg if cfg is not None else nats_config(layout)
        if not self.cfg.enabled:
            raise BadInput(f"no [nats] url in {layout.state_dir / 'config.toml'}")
        self.auth = _auth(self.cfg, layout)
        self.url = self.cfg.url or ""
        self.prefix = self.cfg.subject_prefix
        self.progress = progress or (lambda _: None)
        self.dispatch_wanted = dispatch
        self.on_append = on_append or (lambda: None)
        self.node_id = identity.node_id
        self._stop = asyncio.Event()
        self._held: dict[str, list[Any]] = {}  # event id -> unacknowledged messages
        self.connected = False
        self.ever_connected = False
        self.counts = {"published": 0, "received": 0, "appended": 0, "duplicates": 0}
        self.rejected = 0
        self.last_error: str | None = None
        self.stream_info: dict[str, Any] = {}
        self.consumer_info: dict[str, Any] = {}
        try:
            saved = dict(read_json(state_path(layout)).get("published", {}))
        except (FileNotFoundError, ValueError, AttributeError):
            saved = {}
        self.published = {"offset": int(saved.get("offset", 0)), "seq": int(saved.get("seq", 0))}

    def stop(self) -> None:
        self._stop.set()

    def say(self, event: str, **fields: Any) -> None:
        self.progress({"event": event, **fields})

    # --- the whole run --------------------------------------------------------------

    async def run(self, seconds: float | None = None) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        if deadline is not None:
            loop.call_at(deadline, self._stop.set)
        node = Node(self.layout, self.identity)
        dispatching = _Dispatching(self.layout, self.identity) if self.dispatch_wanted else None
        nc = None
        try:
            nc = await self._connect(deadline)
            if nc is None:
                raise NeverConnected(
                    f"could not reach the NATS server at {self.url} "
                    f"({self.last_error or 'stopped'}); git sync is unaffected"
                )
            if dispatching is not None:
                dispatching.start()
            wake = dispatching.wake.set if dispatching is not None else (lambda: None)
            await self._exchange(nc, node, wake)
        finally:
            if nc is not None:
                # flush the last acks, then close (drain would wait on the pull requests)
                with contextlib.suppress(Exception):
                    await nc.flush(timeout=2)
                with contextlib.suppress(Exception):
                    await nc.close()
            self.connected = False
            self._write_state(node, final=True)
            node.close()
            if dispatching is not None:
                await loop.run_in_executor(None, dispatching.stop)
        summary = {"event": "stopped", **self.counts, "rejected": self.rejected}
        self.progress(summary)
        return summary

    async def _connect(self, deadline: float | None) -> Any:
        import nats

        loop = asyncio.get_running_loop()
        backoff = BACKOFF_FIRST

        async def on_error(exc: Exception) -> None:
            self.last_error = f"{type(exc).__name__}: {exc}".strip()

        async def on_disconnect() -> None:
            if self.connected and not self._stop.is_set():
                self.connected = False
                self.say("disconnected", url=self.url)

        async def on_reconnect() -> None:
            self.connected = True
            self.say("reconnected", url=self.url)

        while not self._stop.is_set():
            self.say("connecting", url=self.url)
            # nats-py keeps retrying a first connect when reconnects are unlimited: give
            # each attempt a bounded time here, and do the backoff (and the saying) here.
            attempt = asyncio.create_task(
                nats.connect(
                    self.cfg.servers,
                    name=f"orxaq-{self.node_id}",
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    pending_size=64 * 1024 * 1024,
                    **self.auth,
                )
            )
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait(
                {attempt, stopping}, timeout=CONNECT_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            stopping.cancel()
            nc = None
            if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
                nc = attempt.result()
            else:
                if attempt.done() and not attempt.cancelled():
                    exc = attempt.exception()
                    self.last_error = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
                attempt.cancel()
                with contextlib.suppress(BaseException):
                    await attempt
                if self._stop.is_set():
                    self.say("unreachable", url=self.url, error=self.last_error or "no answer")
                    break
                wait = backoff if deadline is None else min(backoff, deadline - loop.time())
                self.say(
                    "unreachable",
                    url=self.url,
                    error=self.last_error or "no answer",
                    retry_in=round(max(wait, 0.0), 2),
                )
                backoff = min(backoff * 2, BACKOFF_MAX)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(wait, 0.0))
                continue
            self.connected = self.ever_connected = True
            self.last_error = None
            self.say("connected", url=self.url, stream=self.cfg.stream)
            return nc
        return None

    async def _exchange(self, nc: Any, node: Node, wake: Callable[[], None]) -> None:
        js = nc.jetstream()
        await self._ensure_stream(js)
        tasks = [
            asyncio.create_task(self._publish_loop(js, node, wake)),
            asyncio.create_task(self._consume_loop(js, node, wake)),
            asyncio.create_task(self._state_loop(js, node)),
        ]
        stopper = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in [*tasks, stopper]:
            task.cancel()
        for task in tasks:
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        await asyncio.gather(*tasks, stopper, return_exceptions=True)

    async def _ensure_stream(self, js: Any) -> None:
        """The first listener creates the stream: file storage, a two-minute window."""
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import BadRequestError, NotFoundError

        while True:
            try:
                info = await js.stream_info(self.cfg.stream)
                window = info.config.duplicate_window or 0
                if window < wire.DUPLICATE_WINDOW_SECONDS:
                    self.say("warning", reason=f"stream duplicate window is {window}s (< 120s)")
                return
            except NotFoundError:
                pass
            try:
                await js.add_stream(
                    StreamConfig(
                        name=self.cfg.stream,
                        subjects=[wire.stream_subjects(self.prefix)],
                        storage=StorageType.FILE,
                        duplicate_window=wire.DUPLICATE_WINDOW_SECONDS,
                    )
                )
                self.say("stream_created", stream=self.cfg.stream)
                return
            except BadRequestError:
                continue  # another listener made it meanwhile: look again
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.say("retrying", reason=f"cannot set up stream: {self.last_error}")
                await asyncio.sleep(BACKOFF_FIRST)

    # --- out: this node's events ------------------------------------------------------

    async def _publish_loop(self, js: Any, node: Node, wake: Callable[[], None]) -> None:
        log_path = self.layout.log_file
        backoff = BACKOFF_FIRST
        while True:
            try:
                size = os.stat(log_path).st_size
            except FileNotFoundError:
                size = 0
            if size <= self.published["offset"]:
                if size < self.published["offset"]:  # the log was rebuilt: send all again
                    self.published = {"offset": 0, "seq": 0}
                await asyncio.sleep(POLL_SECONDS)
                continue
            wake()  # new events in the log (ours, or appended by anyone): dispatch them
            end = node.log.committed().log_size
            pending: list[tuple[int, bytes, Envelope]] = []
            for offset, line in node.log.iter_lines(self.published["offset"], end):
                if not line.endswith(b"\n"):
                    break
                pending.append((offset + len(line), line.rstrip(b"\n"), orjson.loads(line)))
            try:
                await self._publish(js, pending)
                backoff = BACKOFF_FIRST
            except _PublishFailed as exc:
                self.say("retrying", reason=f"publish failed: {exc}", retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            if not pending:
                await asyncio.sleep(POLL_SECONDS)  # written, not committed yet

    async def _publish(self, js: Any, lines: list[tuple[int, bytes, Envelope]]) -> None:
        """Publish ours in order, chunk by chunk; the position moves past what was acked."""
        own = [(end, body, env) for end, body, env in lines if env["node_id"] == self.node_id]
        if not own:
            if lines:
                self.published["offset"] = lines[-1][0]
            return
        index = 0
        for start in range(0, len(lines), PUBLISH_CHUNK):
            chunk = lines[start : start + PUBLISH_CHUNK]
            mine = [(end, body, env) for end, body, env in chunk if env["node_id"] == self.node_id]
            results = await self._publish_chunk(js, mine)
            acked = dict.fromkeys(
                env["event_id"]
                for (_, _, env), result in zip(mine, results, strict=True)
                if not isinstance(result, BaseException)
            )
            for end, _, env in chunk:
                if env["node_id"] == self.node_id and env["event_id"] not in acked:
                    failed = next(r for r in results if isinstance(r, BaseException))
                    raise _PublishFailed(f"{type(failed).__name__}: {failed}".strip())
                self.published["offset"] = end
                if env["node_id"] == self.node_id:
                    self.published["seq"] = env["seq"]
                    index += 1
            self.counts["published"] += len(mine)
        self.say("published", count=index, seq=self.published["seq"])

    async def _publish_chunk(self, js: Any, mine: list[tuple[int, bytes, Envelope]]) -> list[Any]:
        """Send a chunk without waiting between messages (one connection keeps their
        order), then collect the acks: a PubAck, or the exception, for each."""
        futures: list[asyncio.Future[Any]] = []
        try:
            for _, body, env in mine:
                futures.append(
                    await js.publish_async(
                        wire.subject_for(self.prefix, env),
                        body,
                        wait_stall=PUBLISH_WAIT,
                        stream=self.cfg.stream,
                        headers=wire.headers_for(env),
                    )
                )
        except Exception as exc:  # not connected, or too many in flight: the rest fail
            failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            futures += [failed] * (len(mine) - len(futures))
        if futures:
            await asyncio.wait(set(futures), timeout=PUBLISH_WAIT)
        results: list[Any] = []
        for future in futures:
            if not future.done():
                future.cancel()
                results.append(TimeoutError("no ack from the server"))
            elif future.cancelled():
                results.append(TimeoutError("cancelled"))
            else:
                results.append(future.exception() or future.result())
        return results

    # --- in: the other nodes' events --------------------------------------------------

    async def _consume_loop(self, js: Any, node: Node, wake: Callable[[], None]) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        admitter = Admitter(node)
        name = wire.durable_name(self.node_id)
        config = ConsumerConfig(
            durable_name=name,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_SECONDS,
            max_ack_pending=-1,  # events that wait for a predecessor stay unacknowledged
            filter_subject=wire.stream_subjects(self.prefix),
        )
        sub = None
        settled_at = time.monotonic()
        try:
            while True:
                if sub is None:
                    try:
                        sub = await js.pull_subscribe(
                            wire.stream_subjects(self.prefix),
                            durable=name,
                            stream=self.cfg.stream,
                            config=config,
                        )
                    except Exception as exc:
                        self.last_error = f"cannot make consumer {name}: {exc!r}"
                        await asyncio.sleep(BACKOFF_FIRST)
                        continue
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_WAIT)
                except TimeoutError:
                    msgs = []
                except Exception as exc:  # disconnected, server restarting: fetch again
                    self.last_error = f"{type(exc).__name__}: {exc}".strip()
                    await asyncio.sleep(0.1)
                    msgs = []
                events = await self._take(msgs)
                now = time.monotonic()
                if events or (admitter.pending and now - settled_at >= SETTLE_SECONDS):
                    settled_at = now
                    report = admitter.offer(events)
                    await self._settled(report, wake)
        finally:
            admitter.close()

    async def _take(self, msgs: list[Any]) -> list[Envelope]:
        events: list[Envelope] = []
        own = f"{self.prefix}.{wire.node_token(self.node_id)}."
        for msg in msgs:
            if msg.subject.startswith(own):
                await msg.ack()  # our own, back from the stream: nothing to check
                continue
            headers = msg.headers
            try:
                env = wire.envelope_of(self.prefix, msg.subject, msg.data, headers)
            except BadMessage as exc:
                self.rejected += 1
                self.say("rejected", **wire.describe(msg.subject, headers), reason=exc.message)
                await msg.term()  # never delivered again
                continue
            if env["node_id"] == self.node_id:  # another node's token mapped to ours
                self.rejected += 1
                self.say("rejected", **wire.describe(msg.subject, headers), reason="our own id")
                await msg.term()
                continue
            self.counts["received"] += 1
            self._held.setdefault(env["event_id"], []).append(msg)
            events.append(env)
        return events

    async def _settled(self, report: Admission, wake: Callable[[], None]) -> None:
        # The appends are fsynced by now (append_sealed): only then acknowledge.
        for event_id in report.done:
            for msg in self._held.pop(event_id, []):
                await msg.ack()
        for env, reason in report.rejected:
            self.rejected += 1
            self.say(
                "rejected",
                subject=wire.subject_for(self.prefix, env),
                msg_id=env["event_id"],
                reason=reason,
            )
        self.counts["duplicates"] += len(report.duplicates)
        if report.appended:
            self.counts["appended"] += len(report.appended)
            by_node: dict[str, int] = {}
            for env in report.appended:
                by_node[env["node_id"]] = by_node.get(env["node_id"], 0) + 1
            self.say("appended", count=len(report.appended), nodes=by_node)
            wake()
            self.on_append()
        for author, why in report.wait_reasons.items():
            self.say("waiting", node=author, reason=why, events=report.waiting)

    # --- status -----------------------------------------------------------------------

    async def _state_loop(self, js: Any, node: Node) -> None:
        name = wire.durable_name(self.node_id)
        while True:
            try:
                info = await js.stream_info(self.cfg.stream)
                self.stream_info = {
                    "messages": info.state.messages,
                    "last_seq": info.state.last_seq,
                }
                ci = await js.consumer_info(self.cfg.stream, name)
                self.consumer_info = {
                    "name": name,
                    "delivered": ci.delivered.stream_seq if ci.delivered else 0,
                    "ack_floor": ci.ack_floor.stream_seq if ci.ack_floor else 0,
                    "num_pending": ci.num_pending or 0,
                    "num_ack_pending": ci.num_ack_pending or 0,
                }
            except Exception as exc:  # the server is away: say so in the state file
                self.last_error = self.last_error or f"{type(exc).__name__}: {exc}"
            self._write_state(node)
            await asyncio.sleep(STATE_SECONDS)

    def _write_state(self, node: Node, final: bool = False) -> None:
        own = node.log.node_heads().get(self.node_id, {"seq": 0})
        pending = self.consumer_info.get("num_pending", 0) + len(self._held)
        state = {
            "url": self.url,
            "stream": self.cfg.stream,
            "subject_prefix": self.prefix,
            "pid": os.getpid(),
            "running": not final,
            "connected": self.connected and not final,
            "updated_at": time.time(),
            "published": self.published,
            "unpublished": max(0, int(own["seq"]) - self.published["seq"]),
            "stream_position": self.stream_info,
            "consumer": self.consumer_info,
            "lag": pending,
            "counts": {**self.counts, "rejected": self.rejected},
            "last_error": self.last_error,
        }
        with contextlib.suppress(OSError):
            atomic_write_json(state_path(self.layout), state)


class _PublishFailed(Exception):
    pass


def listen(
    layout: Layout,
    identity: Identity,
    seconds: float | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run a listener in this thread until `seconds` pass or SIGINT/SIGTERM."""
    import signal

    listener = Listener(layout, identity, progress=progress)

    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, listener.stop)
        return await listener.run(seconds)

    return asyncio.run(main())


class ListenerThread:
    """The listener inside another program (mesh-serve): its own thread and loop."""

    def __init__(
        self, layout: Layout, identity: Identity, on_append: Callable[[], None] | None = None
    ) -> None:
        self.listener = Listener(
            layout, identity, progress=_to_stderr, dispatch=False, on_append=on_append
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="mesh-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            with contextlib.suppress(NeverConnected):
                await self.listener.run()

        try:
            asyncio.run(main())
        except Exception as exc:
            print(f"orxaq-autonomy: mesh-listen stopped: {exc}", file=sys.stderr)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.listener.stop)
        self._thread.join(timeout=30)


def _to_stderr(line: dict[str, Any]) -> None:
    if line.get("event") in {"unreachable", "rejected", "disconnected", "reconnected"}:
        print(f"orxaq-autonomy: nats: {human(line)}", file=sys.stderr)


def human(line: dict[str, Any]) -> str:
    """One progress line for people."""
    event = line.get("event")
    rest = ", ".join(f"{k}={v}" for k, v in line.items() if k != "event")
    if event == "unreachable":
        retry = f"; retrying in {line['retry_in']}s" if "retry_in" in line else ""
        return f"cannot reach the NATS server at {line.get('url')} ({line.get('error')}){retry}"
    return f"{event}: {rest}" if rest else str(event)
