"""The exchange's protocol apart from the transport: subjects, headers and the message
body <-> envelope. Pure functions, so that they can be checked without a server.

    subject   <prefix>.<node_id with dots as _>.<topic>.<event_type>
    body      the envelope as one JSON object (the log's canonical line)
    header    Nats-Msg-Id: <event_id>   (JetStream drops repeats within its window)
"""

from __future__ import annotations

from typing import Any

import orjson

from ..envelope import MAX_EVENT_BYTES, Envelope, parse_envelope
from ..errors import BadInput
from .errors import BadMessage

MSG_ID = "Nats-Msg-Id"
# An admitted clock this high would leave this node no clock for its own events (as import).
CLOCK_CEILING = 2**63 - 1 - 2**32
DUPLICATE_WINDOW_SECONDS = 120.0


def node_token(node_id: str) -> str:
    """A node id as one subject token: NATS splits subjects at dots."""
    return node_id.replace(".", "_")


def subject_for(prefix: str, env: Envelope) -> str:
    return f"{prefix}.{node_token(env['node_id'])}.{env['topic']}.{env['event_type']}"


def stream_subjects(prefix: str) -> str:
    return f"{prefix}.>"


def durable_name(node_id: str) -> str:
    """The consumer of one node: named after it (durable names may not hold dots)."""
    return node_token(node_id)


def headers_for(env: Envelope) -> dict[str, str]:
    return {MSG_ID: env["event_id"]}


def body_for(env: Envelope) -> bytes:
    return orjson.dumps(env, option=orjson.OPT_SORT_KEYS)


def envelope_of(prefix: str, subject: str, body: bytes, headers: dict[str, str] | None) -> Envelope:
    """The event a message carries, checked as import checks a ledger file (format, id,
    size, secrets, clock); the subject and Nats-Msg-Id must agree with it. The signature
    and the chain are checked on admission (ledger/admit.py). BadMessage says why not."""
    if len(body) > MAX_EVENT_BYTES:
        raise BadMessage(f"body of {len(body)} bytes is over the 1 MiB event limit")
    try:
        env = parse_envelope(body)
    except BadInput as exc:
        raise BadMessage(exc.message) from None
    expected = subject_for(prefix, env)
    if subject != expected:
        raise BadMessage(f"subject {subject!r} does not match its event (need {expected!r})")
    msg_id = (headers or {}).get(MSG_ID)
    if msg_id != env["event_id"]:
        raise BadMessage(f"{MSG_ID} {msg_id!r} is not the event id {env['event_id']}")
    if env["clock"] > CLOCK_CEILING:
        raise BadMessage(f"clock {env['clock']} leaves no room for later events")
    return env


def describe(subject: str, headers: dict[str, str] | None) -> dict[str, Any]:
    """What a refused message is, for the report: printable, bounded."""
    from ..store.fsutil import printable

    return {
        "subject": printable(subject[:200]),
        "msg_id": printable(str((headers or {}).get(MSG_ID, ""))[:80]),
    }
