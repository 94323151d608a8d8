"""The dispatcher: runs handlers over new events in the local log, exactly once per node.

State, all small and independent of the log's length:

- `dispatch_cursor.json`: the byte offset up to which every event has been considered, the
  id of the line that ends there (so a cursor never runs over a different log), the events
  waiting to be retried or waiting behind a failing one (`pending`), handlers paused by
  their circuit breaker (`breakers`) and where a paused handler resumes (`lagging`).
- `dispatch_seen.json`: outside effects begun and not yet recorded (in-flight markers).
- `dead_letters/`: one file per event and handler that used up its attempts.

Exactly once: a chunk of events is handled in memory, its follow-ups are appended, then the
cursor is saved. A crash in between re-handles the chunk; every follow-up carries an
idempotency key derived from its cause, its handler and its content, so the log refuses the
repeats and returns the first ids. Handlers are pure except the lane actuator, which guards
its command with an in-flight marker (see lanes.py). Two dispatchers on one node never
overlap: the second exits saying so, or waits with `wait=True`.
"""

from __future__ import annotations

import hashlib
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..config import Config, DispatchPolicy, load_config
from ..envelope import (
    Draft,
    Envelope,
    canonical_bytes,
    check_event_type,
    check_fits,
    check_node_id,
    check_not_reserved,
    check_payload,
    check_text,
    check_topic,
    now_timestamp,
    refuse_credential,
    routing_key,
)
from ..errors import BadInput, OperationFailed
from ..handlers import Binding, Context, FollowUp, Reject
from ..store.fsutil import FileLock, atomic_write_json, read_json
from ..store.node import Node
from ..store.paths import Layout
from .lanes import publish_lanes
from .loader import PAUSE_PREFIX, broken_modules, load_bindings, pause_broken
from .tasks import advance as advance_tasks

STATE_VERSION = 1
DEAD_LETTERED = "mesh.dispatch.dead_lettered"
TRACEBACK_TAIL_CHARS = 4000


@dataclass
class Pending:
    """One (event, handler) pair that must run again: a failure, or one waiting behind a
    failing event with the same partition key."""

    event_id: str
    offset: int
    handler: str
    attempts: int = 0
    due: float = 0.0
    error: str = ""
    partition_key: str | None = None
    generation: int = 0  # how many times the dead letters sent it back

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if v not in (None, "")}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pending:
        return cls(**data)


@dataclass
class DispatchState:
    offset: int = 0
    check: dict[str, Any] | None = None  # {"offset": start of last line, "event_id": ...}
    dispatched: int = 0
    pending: list[Pending] = field(default_factory=list)
    breakers: dict[str, dict[str, float]] = field(default_factory=dict)
    lagging: dict[str, int] = field(default_factory=dict)
    stats: dict[str, dict[str, int]] = field(default_factory=dict)  # per handler, cumulative

    def count(self, handler: str, outcome: str) -> None:
        per = self.stats.setdefault(handler, {})
        per[outcome] = per.get(outcome, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "offset": self.offset,
            "check": self.check,
            "dispatched": self.dispatched,
            "pending": [p.as_dict() for p in sorted(self.pending, key=_pending_order)],
            "breakers": self.breakers,
            "lagging": self.lagging,
            "stats": self.stats,
        }


def _pending_order(p: Pending) -> tuple[int, str]:
    return (p.offset, p.handler)


@dataclass
class DispatchReport:
    skipped: bool = False
    events: int = 0  # events read past the cursor
    handled: int = 0  # handler runs that succeeded
    followups: int = 0  # follow-ups appended
    duplicates: int = 0  # follow-ups the log already had (a re-handled cause)
    failed: int = 0  # handler runs that raised
    dead_lettered: int = 0
    pending: int = 0
    lag_events: int = 0
    paused: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def followup_key(handler: str, cause_id: str, fu: FollowUp) -> str:
    """Deterministic: the same cause, handler and content always give the same key."""
    body = {"c": cause_id, "h": handler, "t": fu.topic, "e": fu.event_type, "p": fu.payload}
    if fu.target is not None:
        body["g"] = fu.target
    return "fu:" + hashlib.sha256(canonical_bytes(body)).hexdigest()[:40]


def make_followup(handler: str, cause: Envelope, fu: FollowUp, *, system: bool = False) -> Draft:
    """The follow-up's draft: everything but its content is taken from the cause. A
    handler may not ask for the reserved topic `mesh` (only the dispatcher's own notices
    pass `system=True`), nor put a credential in any string: either is a `BadInput`, which
    dead-letters the cause like any other invalid follow-up."""
    if not isinstance(fu, FollowUp):
        raise TypeError(f"handler returned {type(fu).__name__}, not FollowUp")
    # What the handler chose is validated; what comes from the (valid) cause is not again.
    draft = Draft(
        topic=check_not_reserved(check_topic(fu.topic), system),
        event_type=check_event_type(fu.event_type),
        payload=check_payload(fu.payload),
        source=check_text(f"handler:{handler}", "source"),
        timestamp=cause["timestamp"],
        causation_id=cause["event_id"],
        correlation_id=cause.get("correlation_id", cause["event_id"]),
        target=None
        if fu.target is None
        else refuse_credential(check_node_id(fu.target, "target"), "target"),
        partition_key=cause.get("partition_key"),
        tenant=cause.get("tenant"),
        idempotency_key=check_text(fu.key, "follow-up key")
        if fu.key is not None
        else followup_key(handler, cause["event_id"], fu),
    )
    check_fits(draft)  # an oversize follow-up is dead-lettered here
    return draft


def _as_followups(result: Any) -> list[FollowUp]:
    if result is None:
        return []
    if isinstance(result, FollowUp):
        return [result]
    return list(result)


class Dispatcher:
    """Runs the bound handlers over the log of one `Node`."""

    def __init__(
        self,
        mesh: Node,
        config: Config | None = None,
        bindings: list[Binding] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.mesh = mesh
        self.layout = mesh.layout
        self.node_id = mesh.node_id
        self.config = config if config is not None else load_config(self.config_file)
        self.policy: DispatchPolicy = self.config.dispatch
        self.broken: dict[str, str] = {}  # handler modules that failed to load: paused
        self.modules: dict[str, list[str]] = {}  # loaded handler modules: their handlers
        self.bindings = (
            bindings
            if bindings is not None
            else load_bindings(self.config, self.layout.root, self.broken, self.modules)
        )
        self.by_name = {b.name: b for b in self.bindings}
        self.clock = clock
        self._routes: dict[str, list[Binding]] = {}
        self._seen = self._load_seen()
        self._event: Envelope | None = None
        self.tasks: dict[str, int] = {}  # what the last run did to tasks (tasks.advance)
        self.ctx = Context(
            self.node_id,
            self.config,
            self.layout,
            mesh.manifests,
            self._recorded,
            self._begin_effect,
        )

    # --- files ------------------------------------------------------------------------

    @property
    def config_file(self) -> Any:
        return self.layout.state_dir / "config.toml"

    @property
    def cursor_file(self) -> Any:
        return self.layout.state_dir / "dispatch_cursor.json"

    @property
    def seen_file(self) -> Any:
        return self.layout.state_dir / "dispatch_seen.json"

    @property
    def dead_dir(self) -> Any:
        return self.layout.state_dir / "dead_letters"

    def load_state(self) -> DispatchState:
        try:
            data = read_json(self.cursor_file)
        except FileNotFoundError:
            return DispatchState()
        except ValueError as exc:
            raise OperationFailed(f"{self.cursor_file} is unreadable: {exc}") from None
        state = DispatchState(
            offset=data["offset"],
            check=data.get("check"),
            dispatched=data.get("dispatched", 0),
            pending=[Pending.from_dict(p) for p in data.get("pending", [])],
            breakers=data.get("breakers", {}),
            lagging=data.get("lagging", {}),
            stats=data.get("stats", {}),
        )
        self._check_cursor(state)
        return state

    def _check_cursor(self, state: DispatchState) -> None:
        if state.check is None:
            return
        try:
            event = self.mesh.log.read_at(state.check["offset"])
        except (OSError, ValueError):
            event = {}
        if event.get("event_id") != state.check["event_id"]:
            raise OperationFailed(
                f"{self.cursor_file} belongs to another log (no event "
                f"{state.check['event_id']} at byte {state.check['offset']}); delete it to "
                "dispatch this log from the start (follow-ups already made are not repeated)"
            )

    def save_state(self, state: DispatchState) -> None:
        atomic_write_json(self.cursor_file, state.as_dict())

    def _load_seen(self) -> dict[str, dict[str, Any]]:
        try:
            return dict(read_json(self.seen_file).get("in_flight", {}))
        except FileNotFoundError:
            return {}

    def _save_seen(self) -> None:
        atomic_write_json(self.seen_file, {"in_flight": self._seen})

    # --- handler context --------------------------------------------------------------

    def _recorded(self, key: str) -> bool:
        tenant = (self._event or {}).get("tenant", "")
        return self.mesh.log.idempotent_hit(self.node_id, (tenant, key)) is not None

    def _begin_effect(self, key: str, event: Envelope, handler: str) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = {
            "event_id": event["event_id"],
            "handler": handler,
            "since": now_timestamp(),
        }
        self._save_seen()  # durable before the effect starts
        return True

    # --- running ----------------------------------------------------------------------

    def routes(self, key: str) -> list[Binding]:
        found = self._routes.get(key)
        if found is None:
            found = [b for b in self.bindings if b.pattern.matches(key)]
            self._routes[key] = found
        return found

    def run(self, max_events: int | None = None, wait: bool = False) -> DispatchReport:
        lock = FileLock(self.layout.locks_dir / "dispatch.lock", timeout=3600)
        if not lock.acquire(blocking=wait):
            return DispatchReport(skipped=True)
        try:
            # another process may have begun an outside effect since this object was made
            self._seen = self._load_seen()
            publish_lanes(self.layout, self.node_id, self.config)
            # tasks: record finished ones and re-request routable blocked routes, handle the
            # events, then start what this run queued (dispatch/tasks.py)
            self.tasks = advance_tasks(self.mesh, self.config)
            report = self._run(max_events)
            later = advance_tasks(self.mesh, self.config)
            self.tasks = {k: v + later.get(k, 0) for k, v in self.tasks.items()}
            return report
        finally:
            lock.release()

    def _run(self, max_events: int | None) -> DispatchReport:
        report = DispatchReport()
        state = self.load_state()
        now = self.clock()
        pause_broken(state.lagging, state.offset, self.broken, self.modules, self.layout.state_dir)
        self._close_breakers(state, now)
        budget = max_events if max_events is not None else -1

        # 1. retries that are due, and the events waiting behind them
        self._run_pending(state, report, now)
        # 2. handlers whose breaker closed again resume where they paused
        for name in sorted(n for n in state.lagging if not n.startswith(PAUSE_PREFIX)):
            if name not in state.breakers or state.breakers[name].get("open_until", 0) <= now:
                budget = self._run_range(state, report, now, budget, only=name)
        # 3. new events, chunk by chunk, including the follow-ups they cause
        while budget != 0:
            before = report.events
            budget = self._run_range(state, report, now, budget, only=None)
            if report.events == before:
                break
        report.pending = len(state.pending)
        report.paused = sorted(n for n, b in state.breakers.items() if b.get("open_until", 0) > now)
        report.paused += sorted(PAUSE_PREFIX + spec for spec in self.broken)
        tail = self.mesh.log.committed()
        report.lag_events = max(0, tail.count - state.dispatched)
        return report

    def _close_breakers(self, state: DispatchState, now: float) -> None:
        for breaker in state.breakers.values():
            if 0 < breaker.get("open_until", 0) <= now:
                # half open: one more failure opens it again, a success closes it
                breaker["open_until"] = 0
                breaker["failures"] = self.policy.breaker_failures - 1

    def _run_pending(self, state: DispatchState, report: DispatchReport, now: float) -> None:
        if not state.pending:
            return
        drafts: list[tuple[str, Draft]] = []
        blocked: set[tuple[str, str]] = set()  # (handler, partition key) still failing
        keep: list[Pending] = []
        for entry in sorted(state.pending, key=_pending_order):
            partition = (entry.handler, entry.partition_key or "")
            waiting = (
                (entry.partition_key is not None and partition in blocked)
                or entry.due > now
                or self._paused(state, entry.handler, now)
                or entry.handler not in self.by_name
            )
            if waiting:
                keep.append(entry)
                if entry.partition_key is not None:
                    blocked.add(partition)
                continue
            event = self.mesh.log.read_at(entry.offset)
            outcome = self._attempt(self.by_name[entry.handler], event, entry, state, report, now)
            if outcome is None:
                keep.append(entry)
                if entry.partition_key is not None:
                    blocked.add(partition)
            else:
                drafts.extend(outcome)
        state.pending = keep
        self._commit(state, report, drafts)

    def _run_range(
        self,
        state: DispatchState,
        report: DispatchReport,
        now: float,
        budget: int,
        only: str | None,
    ) -> int:
        """Handle one chunk of events from the cursor (or from a lagging handler's resume
        point when `only` names it). Returns the remaining event budget."""
        log = self.mesh.log
        start = state.lagging[only] if only else state.offset
        end = state.offset if only else log.committed().log_size
        limit = self.policy.batch if budget < 0 else min(budget, self.policy.batch)
        blocked = {(p.handler, p.partition_key) for p in state.pending if p.partition_key}
        drafts: list[tuple[str, Draft]] = []
        position = start
        count = 0
        last: tuple[int, str] | None = None
        stalled = False
        for offset, line in log.iter_lines(start, end):
            if count == limit or stalled:
                break
            event: Envelope = orjson.loads(line)
            position = offset + len(line)
            last = (offset, event["event_id"])
            count += 1
            bindings = self.routes(routing_key(event))
            if only:
                bindings = [b for b in bindings if b.name == only]
            for binding in bindings:
                if not binding.applies(event, self.node_id):
                    continue
                if not only and binding.name in state.lagging:
                    continue
                if self._paused(state, binding.name, now):
                    if only:  # it failed again while catching up: resume here next time
                        state.lagging[only] = offset
                        stalled = True
                        break
                    state.lagging.setdefault(binding.name, offset)
                    continue
                entry = Pending(
                    event["event_id"],
                    offset,
                    binding.name,
                    partition_key=event.get("partition_key") if binding.ordered else None,
                )
                if entry.partition_key and (binding.name, entry.partition_key) in blocked:
                    state.pending.append(entry)  # waits behind the failing one
                    continue
                outcome = self._attempt(binding, event, entry, state, report, now)
                if outcome is None:
                    state.pending.append(entry)
                    if entry.partition_key:
                        blocked.add((binding.name, entry.partition_key))
                else:
                    drafts.extend(outcome)
        if not count and not drafts and only is None:
            return budget  # nothing new: leave the state file alone (an idle loop writes nothing)
        if only:
            if stalled:
                pass  # lagging[only] already points at the event it could not run
            elif position >= end:
                del state.lagging[only]
            else:
                state.lagging[only] = position
        elif count:
            report.events += count
            state.dispatched += count
            state.offset = position
            if last is not None:
                state.check = {"offset": last[0], "event_id": last[1]}
        self._commit(state, report, drafts)
        return budget if budget < 0 else budget - count

    def _paused(self, state: DispatchState, handler: str, now: float) -> bool:
        return state.breakers.get(handler, {}).get("open_until", 0) > now

    def _attempt(
        self,
        binding: Binding,
        event: Envelope,
        entry: Pending,
        state: DispatchState,
        report: DispatchReport,
        now: float,
    ) -> list[tuple[str, Draft]] | None:
        """Run one handler on one event. The drafts to append, or None when it must run
        again later (the entry then carries the attempt)."""
        self._event = event
        try:
            drafts = [
                (binding.name, self.mesh.check_schema(make_followup(binding.name, event, fu)))
                for fu in _as_followups(binding.fn(event, self.ctx))
            ]
        except (Reject, BadInput) as exc:  # permanent: retrying cannot help
            report.failed += 1
            entry.attempts += 1
            state.count(binding.name, "failed")
            return self._dead_letter(binding, event, entry, exc, state, report)
        except Exception as exc:
            report.failed += 1
            entry.attempts += 1
            state.count(binding.name, "failed")
            self._trip(state, binding.name, now)
            if entry.attempts >= (binding.attempts or self.policy.max_attempts):
                return self._dead_letter(binding, event, entry, exc, state, report)
            delay = min(
                self.policy.backoff_seconds * 2 ** (entry.attempts - 1),
                self.policy.backoff_max_seconds,
            )
            # jitter spreads the retries of many events (and nodes) that failed together
            entry.due = now + delay * (1 - self.policy.backoff_jitter * random.random())
            entry.error = f"{type(exc).__name__}: {exc}"[:500]
            return None
        finally:
            self._event = None
        report.handled += 1
        state.count(binding.name, "ok")
        if binding.name in state.breakers:
            del state.breakers[binding.name]
        return drafts

    def _trip(self, state: DispatchState, handler: str, now: float) -> None:
        breaker = state.breakers.setdefault(handler, {"failures": 0, "open_until": 0})
        breaker["failures"] += 1
        if breaker["failures"] >= self.policy.breaker_failures:
            breaker["open_until"] = now + self.policy.breaker_open_seconds

    def _dead_letter(
        self,
        binding: Binding,
        event: Envelope,
        entry: Pending,
        exc: BaseException,
        state: DispatchState,
        report: DispatchReport,
    ) -> list[tuple[str, Draft]]:
        report.dead_lettered += 1
        state.count(binding.name, "dead_lettered")
        error = f"{type(exc).__name__}: {exc}"[:500]
        record = {
            "event_id": event["event_id"],
            "handler": binding.name,
            "routing_key": routing_key(event),
            "offset": entry.offset,
            "attempts": entry.attempts,
            "generation": entry.generation,
            "error": error,
            "traceback": "".join(traceback.format_exception(exc))[-TRACEBACK_TAIL_CHARS:],
            "dead_lettered_at": now_timestamp(),
        }
        if entry.partition_key:
            record["partition_key"] = entry.partition_key
        self.dead_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dead_dir / f"{event['event_id']}--{binding.name}.json", record)
        if routing_key(event) == DEAD_LETTERED:
            # A notice that could not be handled gets no notice of its own: a handler that
            # fails on every event (a webhook that is down, say) would otherwise feed itself.
            return []
        key = f"dlq:{binding.name}:{event['event_id']}:{entry.generation}"

        def notice(message: str) -> Draft:
            payload = {
                "event_id": event["event_id"],
                "handler": binding.name,
                "error": message,
                "attempts": entry.attempts,
            }
            fu = FollowUp("mesh", "dispatch.dead_lettered", payload, key=key)
            return make_followup("dispatcher", event, fu, system=True)

        try:
            draft = notice(error)
        except BadInput:  # the error text looks like a secret: it stays in the local record
            try:
                draft = notice(f"{type(exc).__name__} (message withheld: see mesh-dlq list)")
            except BadInput:  # so does the handler's name: the local record alone tells
                return []
        return [("dispatcher", draft)]

    def _commit(
        self, state: DispatchState, report: DispatchReport, drafts: list[tuple[str, Draft]]
    ) -> None:
        """Follow-ups first, then the cursor: a crash between re-handles, never loses."""
        if drafts:
            # make_followup has refused the reserved topic to every handler: the `mesh`
            # drafts here are the dispatcher's own dead-letter notices
            results = self.mesh.publish_drafts(
                [draft for _, draft in drafts], keep_envelopes=False, system=True
            )
            fresh = sum(1 for r in results if not r.duplicate)
            report.followups += fresh
            report.duplicates += len(results) - fresh
            done = {draft.idempotency_key for _, draft in drafts}
            if any(key in done for key in self._seen):
                self._seen = {k: v for k, v in self._seen.items() if k not in done}
                self._save_seen()
        self.save_state(state)

    # --- dead letters -----------------------------------------------------------------

    def dead_letters(self) -> list[dict[str, Any]]:
        if not self.dead_dir.exists():
            return []
        return sorted(
            (read_json(p) for p in self.dead_dir.glob("*.json")),
            key=lambda d: (d["dead_lettered_at"], d["event_id"], d["handler"]),
        )

    def _dead_matching(self, ref: str) -> list[dict[str, Any]]:
        event_id = self.mesh.resolve_event_id(ref)
        found = [d for d in self.dead_letters() if d["event_id"] == event_id]
        if not found:
            raise BadInput(f"no dead letter for event {event_id}")
        return found

    def retry_dead(self, ref: str) -> list[dict[str, Any]]:
        """Send an event's dead letters back to be handled at the next dispatch."""
        found = self._dead_matching(ref)
        with FileLock(self.layout.locks_dir / "dispatch.lock", timeout=3600):
            state = self.load_state()
            for record in found:
                state.pending.append(
                    Pending(
                        record["event_id"],
                        record["offset"],
                        record["handler"],
                        partition_key=record.get("partition_key"),
                        generation=record.get("generation", 0) + 1,
                    )
                )
                state.breakers.pop(record["handler"], None)
            self.save_state(state)
            for record in found:
                (self.dead_dir / f"{record['event_id']}--{record['handler']}.json").unlink()
        return found

    def drop_dead(self, ref: str) -> list[dict[str, Any]]:
        found = self._dead_matching(ref)
        for record in found:
            (self.dead_dir / f"{record['event_id']}--{record['handler']}.json").unlink()
        return found

    # --- replay -----------------------------------------------------------------------

    def replay(self, handler: str, from_seq: int = 1) -> DispatchReport:
        """Run one handler again over past events (this node's seq >= `from_seq` onwards).
        Unchanged logic gives the same keys, so nothing is appended twice."""
        binding = self.by_name.get(handler)
        if binding is None:
            raise BadInput(f"unknown handler {handler!r}; known: {', '.join(sorted(self.by_name))}")
        if from_seq < 1:
            raise BadInput(f"bad --from-seq {from_seq}: need a positive integer")
        report = DispatchReport()
        drafts: list[Draft] = []
        started = from_seq == 1
        for _, line in self.mesh.log.iter_lines(0, self.mesh.log.committed().log_size):
            event: Envelope = orjson.loads(line)
            if not started:
                started = event["node_id"] == self.node_id and event["seq"] >= from_seq
                if not started:
                    continue
            report.events += 1
            if not binding.pattern.matches(routing_key(event)):
                continue
            if not binding.applies(event, self.node_id):
                continue
            self._event = event
            try:  # a failure is counted, not dead-lettered: replay is for looking
                drafts.extend(
                    self.mesh.check_schema(make_followup(binding.name, event, fu))
                    for fu in _as_followups(binding.fn(event, self.ctx))
                )
                report.handled += 1
            except Exception:
                report.failed += 1
            finally:
                self._event = None
        if drafts:
            results = self.mesh.publish_drafts(drafts, keep_envelopes=False)
            report.followups = sum(1 for r in results if not r.duplicate)
            report.duplicates = len(results) - report.followups
        return report


def dispatch_status(layout: Layout, count: int) -> dict[str, Any]:
    """The dispatcher's figures for mesh-status: cursor, lag, retries, breakers, dead letters."""
    state_dir = layout.state_dir
    try:
        cursor = read_json(state_dir / "dispatch_cursor.json")
    except FileNotFoundError:
        cursor = {}
    dead_by_handler: dict[str, int] = {}
    for path in (state_dir / "dead_letters").glob("*.json"):
        handler = path.stem.partition("--")[2]  # <event_id>--<handler>.json
        dead_by_handler[handler] = dead_by_handler.get(handler, 0) + 1
    pending_by_handler: dict[str, int] = {}
    for entry in cursor.get("pending", []):
        pending_by_handler[entry["handler"]] = pending_by_handler.get(entry["handler"], 0) + 1
    now = time.time()
    return {
        "cursor": cursor.get("offset", 0),
        "dispatched": cursor.get("dispatched", 0),
        "lag_events": max(0, count - cursor.get("dispatched", 0)),
        "pending": len(cursor.get("pending", [])),
        "paused": sorted(
            name
            for name, breaker in cursor.get("breakers", {}).items()
            if breaker.get("open_until", 0) > now
        ),
        "dead_letters": sum(dead_by_handler.values()),
        "broken_modules": broken_modules(state_dir),  # paused: they failed to load
        "pending_by_handler": pending_by_handler,
        "dead_by_handler": dead_by_handler,
        "stats": cursor.get("stats", {}),
    }
