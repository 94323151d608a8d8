"""Forwarding: post matching events to webhooks, through the dispatcher.

Each consumer in the config's `[[forward]]` list becomes one handler, `forward:<name>`,
with scope `every`. That one choice gives forwarding everything the dispatcher already
guarantees, per consumer: the cursor and the pending list are the durable record of what
is still to deliver (a crash loses nothing), retries back off exponentially with jitter,
a consumer that keeps failing is paused by its circuit breaker without burning attempts,
and spent attempts end in the dead letters (`mesh-dlq`, `mesh-status`, `/metrics`).

Delivery is at least once: a crash after the receiver answered and before the cursor was
saved delivers again. Every delivery carries the event id (`X-Orxaq-Event-Id` and
`Idempotency-Key`) so the receiver can drop repeats.

A receiver's answer decides what happens next: 2xx is delivered; 400, 413, 415 and 422 say
the event itself is unacceptable, so it is dead-lettered at once; anything else (5xx, 429,
a timeout, a refused connection, 401 from a token not yet set) is retried.
"""

from __future__ import annotations

import http.client
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from ..envelope import Envelope, routing_key
from ..handlers import Binding, Context, Reject
from ..patterns import Pattern

if TYPE_CHECKING:
    from ..config import Consumer

FORWARD_PREFIX = "forward:"
PERMANENT_STATUSES = frozenset({400, 413, 415, 422})
_USER_AGENT = "orxaq-autonomy-forwarder/1"
_MAX_ANSWER = 64 * 1024  # the answer's body is not used; reading it keeps the connection


class DeliveryFailed(Exception):
    """A delivery that may succeed later: it is retried with backoff."""


class Deliverer:
    """Posts events to one consumer's URL over a kept-alive connection."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        parts = urlsplit(consumer.url)
        # Errors name the URL without its query: a token there must not reach a dead-letter
        # notice, which is an event in the ledger.
        self.where = f"{parts.scheme}://{parts.netloc}{parts.path}"
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._conn: http.client.HTTPConnection | None = None

    def __call__(self, event: Envelope, ctx: Context) -> None:
        body = orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": _USER_AGENT,
            "X-Orxaq-Event-Id": event["event_id"],
            "Idempotency-Key": event["event_id"],
            "X-Orxaq-Routing-Key": routing_key(event),
            "X-Orxaq-Node": ctx.node_id,
            **self.consumer.headers,
            **self._env_headers(),
        }
        status = self._post(body, headers)
        if 200 <= status < 300:
            return
        where = f"{self.where} answered {status}"
        if status in PERMANENT_STATUSES:
            raise Reject(f"{where}: the receiver refuses this event")
        raise DeliveryFailed(where)

    def _env_headers(self) -> dict[str, str]:
        found = {}
        for header, variable in self.consumer.headers_env.items():
            value = os.environ.get(variable)
            if value is None:
                raise DeliveryFailed(f"header {header}: environment variable {variable} is unset")
            found[header] = value
        return found

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self.consumer.timeout)

    def _post(self, body: bytes, headers: dict[str, str]) -> int:
        # A kept-alive connection the receiver has closed fails on first use: try once more
        # on a fresh one. A repeat is harmless (the receiver deduplicates by event id).
        for fresh in (self._conn is None, True):
            if fresh or self._conn is None:
                self.close()
                self._conn = self._connect()
            try:
                self._conn.request("POST", self._path, body, headers)
                response = self._conn.getresponse()
                response.read(_MAX_ANSWER)
                if response.will_close or not response.isclosed():
                    self.close()  # closed, or an answer too long to read: a fresh connection
                return response.status
            except TimeoutError as exc:
                self.close()
                raise DeliveryFailed(
                    f"{self.where}: no answer within {self.consumer.timeout:g}s"
                ) from exc
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if fresh:
                    raise DeliveryFailed(f"{self.where}: connection dropped") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise DeliveryFailed(f"{self.where}: {exc}") from None
        raise DeliveryFailed(f"{self.where}: connection dropped")  # pragma: no cover

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def forward_bindings(consumers: tuple[Consumer, ...]) -> list[Binding]:
    """One `every` handler per consumer. Critical consumers keep partition order (a failing
    delivery holds back later events with its partition key); best-effort ones do not."""
    return [
        Binding(
            FORWARD_PREFIX + consumer.name,
            Pattern(consumer.match),
            "every",
            Deliverer(consumer),
            attempts=consumer.attempts,
            ordered=consumer.critical,
        )
        for consumer in consumers
    ]


def forwarding_status(dispatch: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per webhook consumer: deliveries made, failed attempts, waiting, dead-lettered."""
    names = {
        name
        for table in ("stats", "pending_by_handler", "dead_by_handler")
        for name in dispatch[table]
        if name.startswith(FORWARD_PREFIX)
    }
    return {
        name.removeprefix(FORWARD_PREFIX): {
            "delivered": dispatch["stats"].get(name, {}).get("ok", 0),
            "failed_attempts": dispatch["stats"].get(name, {}).get("failed", 0),
            "pending": dispatch["pending_by_handler"].get(name, 0),
            "dead_letters": dispatch["dead_by_handler"].get(name, 0),
        }
        for name in sorted(names)
    }
