"""The handler API: bind a function to a topic pattern and a scope; return follow-ups.

    from orxaq_autonomy.handlers import FollowUp, handler

    @handler("ci.run.finished", scope="every")
    def notify(event, ctx):
        if not event["payload"].get("ok"):
            return FollowUp("alerts", "ci.failed", {"run": event["payload"].get("run")})

Handlers never write to the log: the dispatcher appends what they return, with
`causation_id`, `correlation_id`, `partition_key`, `tenant` and the timestamp taken from the
cause, and an idempotency key derived from the cause, the handler and the content, so that
handling a cause twice can never append a follow-up twice. A follow-up on the topic `mesh`
(the mesh's own events) or holding a credential in any string is refused: the cause is
dead-lettered, as for any other invalid follow-up.
Scopes: `origin` runs only on the node that authored the event (the default), `target` only
on the node named in `target` (the author when there is none), `every` on every node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from .envelope import Envelope
from .errors import BadInput
from .patterns import Pattern

if TYPE_CHECKING:
    from .config import Config
    from .store.paths import Layout

Scope = Literal["origin", "target", "every"]
SCOPES = ("origin", "target", "every")


class FollowUp(NamedTuple):
    """An event a handler asks for. `key` names it for deduplication; by default it is
    derived from the cause, the handler and this content."""

    topic: str
    event_type: str
    payload: dict[str, Any]
    target: str | None = None
    key: str | None = None


class Reject(Exception):
    """A permanent failure: the event is dead-lettered at once, without retries."""


HandlerResult = FollowUp | Iterable[FollowUp] | None
HandlerFn = Callable[[Envelope, "Context"], HandlerResult]


@dataclass(frozen=True)
class Binding:
    name: str
    pattern: Pattern
    scope: Scope
    fn: HandlerFn
    attempts: int | None = None  # None: the dispatch policy's max_attempts
    ordered: bool = True  # a failure holds back later events with its partition key

    def applies(self, event: Envelope, node_id: str) -> bool:
        if self.scope == "every":
            return True
        if self.scope == "origin":
            return bool(event["node_id"] == node_id)
        return bool(event.get("target", event["node_id"]) == node_id)


def handler(
    pattern: str, *, scope: Scope = "origin", name: str | None = None
) -> Callable[[HandlerFn], HandlerFn]:
    """Mark `fn` as a handler for routing keys matching `pattern` (`*`, `#` wildcards)."""
    if scope not in SCOPES:
        raise BadInput(f"bad handler scope {scope!r}: need one of {', '.join(SCOPES)}")
    compiled = Pattern(pattern)

    def mark(fn: HandlerFn) -> HandlerFn:
        binding = Binding(name or fn.__name__, compiled, scope, fn)
        fn.__orxaq_handler__ = binding  # type: ignore[attr-defined]
        return fn

    return mark


class Context:
    """What a handler may know and do besides reading its event."""

    def __init__(
        self,
        node_id: str,
        config: Config,
        layout: Layout,
        manifests: Callable[[], dict[str, dict[str, Any]]],
        recorded: Callable[[str], bool],
        begin_effect: Callable[[str, Envelope, str], bool],
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.layout = layout
        self._manifests = manifests
        self._cache: dict[str, dict[str, Any]] | None = None
        self.recorded = recorded
        """recorded(key): a follow-up with this key is already in the log."""
        self.begin_effect = begin_effect
        """begin_effect(key, event, handler): durably mark an outside effect as begun;
        False when it was begun before and its outcome was never recorded (a crash)."""

    def manifests(self) -> dict[str, dict[str, Any]]:
        """The node manifests in the ledger, read once per dispatch run."""
        if self._cache is None:
            self._cache = self._manifests()
        return self._cache
