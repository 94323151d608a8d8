"""The event envelope, format v1: validation, canonical form, content-hash ids.

An envelope is a plain dict (it is JSON on disk and on the wire). `Draft` holds what a
publisher chooses; `seal` adds what the log assigns (seq, prev, clock, timestamp) and the
id. `parse_envelope` is the strict reader used for anything that did not come from `seal`.
See docs/format.md for the byte-exact canonical form.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple

import orjson

from .errors import BadInput, EventTooLarge
from .secretscan import is_placeholder, is_secret_key, looks_like_credential

FORMAT_VERSION = 1
MAX_EVENT_BYTES = 1024 * 1024
MAX_FIELD_CHARS = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Envelope = dict[str, Any]

NODE_ID_RE = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
TOPIC_RE = re.compile(r"[a-z0-9_-]+")
EVENT_TYPE_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
EVENT_ID_RE = re.compile(r"evt_[0-9a-f]{64}")
SIG_RE = re.compile(r"ed25519:[A-Za-z0-9_-]{86}")
TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_INVALID_NODE_CHARS_RE = re.compile(r"[^a-z0-9.-]")

REQUIRED_FIELDS = frozenset(
    {
        "v",
        "event_id",
        "node_id",
        "seq",
        "clock",
        "timestamp",
        "topic",
        "event_type",
        "source",
        "payload",
    }
)
# Optional publisher-chosen string fields, in the order the CLI documents them.
OPTIONAL_FIELDS = (
    "causation_id",
    "correlation_id",
    "target",
    "partition_key",
    "tenant",
    "idempotency_key",
    "subject",  # CloudEvents' subject, kept as given
)
# Set only by mesh-migrate (SPEC 12): the orxaq-ops id of a re-authored event, and of its
# cause where that is another node's event or unknown. Covered by the id and signature.
LEGACY_FIELDS = ("legacy_id", "legacy_causation_id")
LEGACY_ID_RE = re.compile(r"evt_[0-9a-f]{20}")
ALL_FIELDS = REQUIRED_FIELDS | set(OPTIONAL_FIELDS) | {"prev", "sig", "schema"} | set(LEGACY_FIELDS)
# `schema` (`<subject>/v<N>`: the version the payload was checked against) is set by the
# publisher's registry check (store/schemas.py), never by the caller: not a draft field.
SCHEMA_FIELD_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)+/v[1-9][0-9]{0,4}")
DRAFT_FIELDS = frozenset(
    {"topic", "event_type", "payload", "source", "timestamp", *OPTIONAL_FIELDS}
)

_DUMP_OPTS = orjson.OPT_SORT_KEYS

# The topic of the product's own events (key rotation, dead letters, fork detection,
# schema changes). Only the mesh itself publishes it (`system=True`); every way in for a
# user (mesh-publish, POST /events, handler follow-ups) refuses it. Import keeps it.
RESERVED_TOPIC = "mesh"
# Envelope strings whose format leaves no room for a credential (hex ids, a base64url
# signature, a fixed timestamp shape). Every other string of an event is scanned.
_FIXED_FORMAT_FIELDS = frozenset(
    {"event_id", "prev", "sig", "causation_id", "timestamp", *LEGACY_FIELDS}
)


class ReservedTopic(BadInput):
    """A publisher other than the mesh itself asked for the reserved topic."""


# --- field rules -------------------------------------------------------------------------


def refuse_credential(value: str, what: str) -> str:
    """`value`, unless it looks like a credential. The message never repeats the value."""
    if looks_like_credential(value):
        raise BadInput(f"refused {what}: it looks like a credential; keep secrets out of events")
    return value


def _bad_value(what: str, value: Any, need: str) -> BadInput:
    """The error for a value that fails its format. Built only on failure; a value that
    looks like a credential is refused as one, so that no message ever repeats it."""
    if isinstance(value, str):
        refuse_credential(value, what)
    return BadInput(f"bad {what} {value!r}: {need}")


def normalise_node_id(raw: str) -> str:
    """Lower-case and replace characters outside `[a-z0-9.-]` with `-`; refuse the rest."""
    norm = _INVALID_NODE_CHARS_RE.sub("-", raw.strip().lower())
    if not NODE_ID_RE.fullmatch(norm):
        raise _bad_value(
            "node id", raw, "need 1-63 characters of [a-z0-9.-], starting with a letter or digit"
        )
    return norm


def check_node_id(value: Any, what: str = "node_id") -> str:
    if not isinstance(value, str) or not NODE_ID_RE.fullmatch(value):
        raise _bad_value(what, value, "need 1-63 characters of [a-z0-9.-]")
    return value


def check_topic(value: Any) -> str:
    if not isinstance(value, str) or not TOPIC_RE.fullmatch(value):
        raise _bad_value("topic", value, "need one segment of [a-z0-9_-]+")
    return refuse_credential(value, "topic")


def check_not_reserved(topic: str, system: bool = False) -> str:
    """`topic`, unless it is the reserved `mesh` topic and the publisher is not the mesh."""
    if topic == RESERVED_TOPIC and not system:
        raise ReservedTopic(f"topic {RESERVED_TOPIC!r} is reserved for the mesh's own events")
    return topic


def check_event_type(value: Any) -> str:
    if not isinstance(value, str) or not EVENT_TYPE_RE.fullmatch(value):
        raise _bad_value("event type", value, "need dot-separated segments of [a-z0-9_-]+")
    return refuse_credential(value, "event type")


def check_event_id(value: Any, what: str = "event id") -> str:
    if not isinstance(value, str) or not EVENT_ID_RE.fullmatch(value):
        raise _bad_value(what, value, "need evt_ followed by 64 lower-case hex digits")
    return value


def check_text(value: Any, what: str) -> str:
    """A string of 1-256 characters without control characters or credentials."""
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD_CHARS:
        raise _bad_value(what, value, f"need a string of 1-{MAX_FIELD_CHARS} characters")
    if _CONTROL_RE.search(value):
        raise _bad_value(what, value, "control characters are not allowed")
    return refuse_credential(value, what)


def format_timestamp(moment: datetime) -> str:
    m = moment.astimezone(UTC)
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:"
        f"{m.second:02d}.{m.microsecond:06d}Z"
    )


def now_timestamp() -> str:
    return format_timestamp(datetime.now(UTC))


def normalise_timestamp(raw: Any, what: str = "timestamp") -> str:
    """Any RFC 3339 time with an offset becomes UTC with microseconds and `Z`."""
    try:
        if not isinstance(raw, str) or len(raw) < 20 or raw[10] not in "Tt ":
            raise ValueError
        moment = datetime.fromisoformat(raw.upper().replace("Z", "+00:00"))
        if moment.tzinfo is None:
            raise _bad_value(what, raw, "RFC 3339 needs an offset or Z")
        return format_timestamp(moment)
    except (ValueError, OverflowError):
        raise _bad_value(what, raw, "need an RFC 3339 time, e.g. 2026-11-22T12:34:56Z") from None


def check_payload(payload: Any) -> dict[str, Any]:
    if type(payload) is not dict:
        raise BadInput(f"bad payload: need a JSON object, got {_json_type(payload)}")
    problem = payload_problem(payload)
    if problem:
        raise BadInput(problem)
    return payload


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


def _holds_value(value: Any) -> bool:
    """Under a secret-looking key, anything but null, a flag, an empty value or a
    placeholder (`***`, `<redacted>`, `${TOKEN}`) counts as a secret."""
    if value is None or isinstance(value, bool):
        return False
    if isinstance(value, str):
        return not is_placeholder(value)
    if isinstance(value, list | dict):
        return bool(value)
    return True


_KEY_OK, _KEY_NAMES_SECRET, _KEY_IS_CREDENTIAL = 0, 1, 2


@lru_cache(maxsize=4096)  # payload keys repeat across events; values do not
def _key_verdict(key: str) -> int:
    if looks_like_credential(key):
        return _KEY_IS_CREDENTIAL
    return _KEY_NAMES_SECRET if is_secret_key(key) else _KEY_OK


def payload_problem(value: Any, path: str = "payload", depth: int = 0) -> str | None:
    """Why `value` may not go into an event, or None. One walk checks that it is
    canonical-safe JSON (string keys, signed 64-bit integers, finite floats, depth <= 64)
    and that it holds no secret: no key or value looks like a credential, no key that
    names a secret holds a value. Scalars are handled inline: this runs once per event."""
    kind = type(value)
    if kind is str:
        if looks_like_credential(value):
            return f"refused payload: {path} looks like a credential; keep secrets out of events"
        return None
    if kind is dict:
        if depth >= 64:
            return f"bad payload: {path} nests deeper than 64 levels"
        for key, item in value.items():
            if type(key) is not str:
                return f"bad payload: {path} has a non-string key {key!r}"
            item_kind = type(item)
            verdict = _key_verdict(key)
            if verdict:
                if verdict == _KEY_IS_CREDENTIAL:
                    return (
                        f"refused payload: a key in {path} looks like a credential; "
                        "keep secrets out of events"
                    )
                if _holds_value(item):
                    return (
                        f"refused payload: {path}.{key} is a secret-looking key holding a "
                        "value; keep secrets out of events"
                    )
            if item_kind is str:
                if looks_like_credential(item):
                    return (
                        f"refused payload: {path}.{key} looks like a credential; "
                        "keep secrets out of events"
                    )
            elif item_kind is bool or item is None:
                continue
            elif item_kind is int:
                if not INT64_MIN <= item <= INT64_MAX:
                    return f"bad payload: {path}.{key} is an integer outside signed 64 bit"
            else:
                problem = payload_problem(item, f"{path}.{key}", depth + 1)
                if problem:
                    return problem
        return None
    if kind is list or kind is tuple:
        if depth >= 64:
            return f"bad payload: {path} nests deeper than 64 levels"
        for i, item in enumerate(value):
            problem = payload_problem(item, f"{path}[{i}]", depth + 1)
            if problem:
                return problem
        return None
    if kind is int:
        if INT64_MIN <= value <= INT64_MAX:
            return None
        return f"bad payload: {path} is an integer outside signed 64 bit"
    if kind is float:
        return None if math.isfinite(value) else f"bad payload: {path} is not a finite number"
    if kind is bool or value is None:
        return None
    return f"bad payload: {path} is a {kind.__name__}, not JSON"


# --- reading JSON input ------------------------------------------------------------------

# orjson reads integers up to 2**64 - 1 and down to -2**63 exactly and turns anything
# beyond into a float silently. A run of 19 digits may be past either end of signed 64 bit:
# such text is read with the range check, so both ends are refused the same way.
_BIG_INT_RE = re.compile(rb"\d{19}")


def loads_json(raw: bytes | str) -> Any:
    """orjson, except where the text holds a 19+ digit run: orjson turns integers beyond
    64 bit into floats silently, so those inputs go through json with a range check, the
    same above the maximum and below the minimum.
    Raises orjson.JSONDecodeError (a ValueError) for anything that is not JSON."""
    data = raw.encode() if isinstance(raw, str) else raw
    if _BIG_INT_RE.search(data) is None:
        return orjson.loads(data)
    import json

    def checked(text: str) -> int:
        value = int(text)
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"integer {text[:30]} is outside signed 64 bit")
        return value

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(data, parse_int=checked, parse_constant=no_constants)
        orjson.dumps(value)  # what orjson would refuse (lone surrogates) is refused here too
        return value
    except (ValueError, TypeError, RecursionError) as exc:
        raise orjson.JSONDecodeError(str(exc), data.decode(errors="replace"), 0) from None


# --- drafts and sealing ------------------------------------------------------------------


class Draft(NamedTuple):
    """What a publisher chooses. Build with `Draft.create`, which validates everything.
    (A NamedTuple: it is made once per event, and batches make a hundred thousand.)"""

    topic: str
    event_type: str
    payload: dict[str, Any]
    source: str
    timestamp: str | None = None
    causation_id: str | None = None
    correlation_id: str | None = None
    target: str | None = None
    partition_key: str | None = None
    tenant: str | None = None
    idempotency_key: str | None = None
    subject: str | None = None
    schema: str | None = None  # set by the schema registry's check, not by the caller

    @classmethod
    def create(
        cls,
        topic: Any,
        event_type: Any,
        payload: Any = None,
        *,
        source: Any = "api",
        timestamp: Any = None,
        causation_id: Any = None,
        correlation_id: Any = None,
        target: Any = None,
        partition_key: Any = None,
        tenant: Any = None,
        idempotency_key: Any = None,
        subject: Any = None,
    ) -> Draft:
        """Every field checked, every string scanned for credentials. (Whether the topic
        may be published is the publisher's check: see `check_not_reserved`.)"""
        return cls(
            topic=check_topic(topic),
            event_type=check_event_type(event_type),
            payload=check_payload({} if payload is None else payload),
            source=check_text(source, "source"),
            timestamp=None if timestamp is None else normalise_timestamp(timestamp),
            causation_id=None
            if causation_id is None
            else check_event_id(causation_id, "causation id"),
            correlation_id=None
            if correlation_id is None
            else check_text(correlation_id, "correlation id"),
            target=None
            if target is None
            else refuse_credential(normalise_node_id(check_text(target, "target")), "target"),
            partition_key=None
            if partition_key is None
            else check_text(partition_key, "partition key"),
            tenant=None if tenant is None else check_text(tenant, "tenant"),
            idempotency_key=None
            if idempotency_key is None
            else check_text(idempotency_key, "idempotency key"),
            subject=None if subject is None else check_text(subject, "subject"),
        )

    @classmethod
    def from_mapping(cls, fields: dict[str, Any], default_source: str = "api") -> Draft:
        """A draft from a JSON object such as one `mesh-publish --stdin` line."""
        unknown = fields.keys() - DRAFT_FIELDS
        if unknown:
            raise BadInput(
                f"unknown field {min(unknown)!r}; allowed: {', '.join(sorted(DRAFT_FIELDS))}"
            )
        for name in ("topic", "event_type"):
            if fields.get(name) is None:  # absent, or null (which means unset)
                raise BadInput(f"missing field {name!r}")
        # Null means unset for the optional fields; a null payload is still refused.
        values = {k: v for k, v in fields.items() if v is not None or k == "payload"}
        if "payload" in values and values["payload"] is None:
            raise BadInput("bad payload: need a JSON object, got null")
        values.setdefault("source", default_source)
        return cls.create(**values)

    @property
    def routing_key(self) -> str:
        return f"{self.topic}.{self.event_type}"


def unreserved(drafts: Iterable[Draft]) -> Iterator[Draft]:
    """The drafts, refusing (lazily, so a batch still goes in whole or not at all) any on
    the reserved topic."""
    for draft in drafts:
        check_not_reserved(draft.topic)
        yield draft


def canonical_bytes(body: dict[str, Any]) -> bytes:
    """The canonical form: JSON, keys sorted, no whitespace, UTF-8 (docs/format.md)."""
    return orjson.dumps(body, option=_DUMP_OPTS)


def compute_event_id(envelope: dict[str, Any]) -> str:
    body = {k: v for k, v in envelope.items() if k != "event_id" and k != "sig"}
    return "evt_" + hashlib.sha256(canonical_bytes(body)).hexdigest()


def seal(
    draft: Draft,
    *,
    node_id: str,
    seq: int,
    prev: str | None,
    clock: int,
    timestamp: str,
    signer: Callable[[str], str] | None = None,
) -> tuple[Envelope, bytes]:
    """Assign the log's fields, the id and (with `signer`) the signature; return the
    envelope and its log line (no newline)."""
    if clock > INT64_MAX:
        raise BadInput(f"the Lamport clock would pass {INT64_MAX}")
    body: Envelope = {
        "v": FORMAT_VERSION,
        "node_id": node_id,
        "seq": seq,
        "clock": clock,
        "timestamp": draft.timestamp or timestamp,
        "topic": draft.topic,
        "event_type": draft.event_type,
        "source": draft.source,
        "payload": draft.payload,
    }
    if prev is not None:
        body["prev"] = prev
    for name in OPTIONAL_FIELDS:
        value = getattr(draft, name)
        if value is not None:
            body[name] = value
    if draft.schema is not None:
        body["schema"] = draft.schema
    body["event_id"] = "evt_" + hashlib.sha256(orjson.dumps(body, option=_DUMP_OPTS)).hexdigest()
    if signer is not None:
        body["sig"] = signer(body["event_id"])
    line = orjson.dumps(body, option=_DUMP_OPTS)
    if len(line) > MAX_EVENT_BYTES:
        raise EventTooLarge(
            f"event too large: {len(line)} bytes serialised, the limit is {MAX_EVENT_BYTES}"
        )
    return body, line


_WIDEST_ID = "evt_" + "f" * 64
_WIDEST_SIG = "ed25519:" + "A" * 86
_NEAR_LIMIT = MAX_EVENT_BYTES - 4096


def check_fits(draft: Draft) -> None:
    """Refuse a draft that could exceed MAX_EVENT_BYTES once sealed, whatever node, seq,
    clock, prev and signature the log gives it, so that the failure comes before an append.
    Only payloads near the limit pay for the trial seal."""
    if len(orjson.dumps(draft.payload)) > _NEAR_LIMIT:
        seal(
            draft,
            node_id="n" * 63,
            seq=INT64_MAX,
            prev=_WIDEST_ID,
            clock=INT64_MAX,
            timestamp="0000-01-01T00:00:00.000000Z",
            signer=lambda _: _WIDEST_SIG,
        )


def routing_key(envelope: Envelope) -> str:
    return f"{envelope['topic']}.{envelope['event_type']}"


# --- strict parsing ----------------------------------------------------------------------


class InvalidEnvelope(BadInput):
    """A serialised envelope that is not a valid v1 event."""


def parse_envelope(data: bytes | str) -> Envelope:
    """Parse and fully check one serialised envelope, including its content-hash id."""
    if len(data) > MAX_EVENT_BYTES:
        raise InvalidEnvelope(f"event too large: {len(data)} bytes, the limit is {MAX_EVENT_BYTES}")
    try:
        env = loads_json(data)  # an out-of-range integer is refused, not read as a float
    except orjson.JSONDecodeError as exc:
        raise InvalidEnvelope(f"not valid JSON: {exc}") from None
    check_envelope(env)
    return env  # type: ignore[no-any-return]


def check_envelope(env: Any) -> None:
    try:
        _check_envelope(env)
    except InvalidEnvelope:
        raise
    except BadInput as exc:
        raise InvalidEnvelope(exc.message) from None


def _check_envelope(env: Any) -> None:
    if not isinstance(env, dict):
        raise InvalidEnvelope(f"an envelope must be a JSON object, got {_json_type(env)}")
    missing = sorted(REQUIRED_FIELDS - env.keys())
    if missing:
        raise InvalidEnvelope(f"missing field {missing[0]!r}")
    unknown = sorted(env.keys() - ALL_FIELDS)
    if unknown:
        raise InvalidEnvelope(f"unknown field {unknown[0]!r}")
    nulls = sorted(k for k, v in env.items() if v is None)
    if nulls:
        raise InvalidEnvelope(f"field {nulls[0]!r} is null; unset fields must be omitted")
    if env["v"] != FORMAT_VERSION or isinstance(env["v"], bool):
        raise InvalidEnvelope(f"unsupported format version {env['v']!r}")
    check_node_id(env["node_id"])
    for name in ("seq", "clock"):
        value = env[name]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= INT64_MAX:
            raise InvalidEnvelope(f"bad {name} {value!r}: need a positive integer")
    if env["seq"] == 1:
        if "prev" in env:
            raise InvalidEnvelope("seq 1 must not have prev")
    elif "prev" not in env:
        raise InvalidEnvelope(f"seq {env['seq']} needs prev")
    else:
        check_event_id(env["prev"], "prev")
    stamp = env["timestamp"]
    if not isinstance(stamp, str) or not TIMESTAMP_RE.fullmatch(stamp):
        raise _bad_value("timestamp", stamp, "need UTC with microseconds")
    try:
        datetime.fromisoformat(stamp[:-1])
    except ValueError:
        raise _bad_value("timestamp", stamp, "no such date or time") from None
    check_topic(env["topic"])
    check_event_type(env["event_type"])
    check_text(env["source"], "source")
    check_payload(env["payload"])
    if "causation_id" in env:
        check_event_id(env["causation_id"], "causation id")
    if "target" in env:
        check_node_id(env["target"], "target")
    for name in LEGACY_FIELDS:
        if name in env and (type(env[name]) is not str or not LEGACY_ID_RE.fullmatch(env[name])):
            raise _bad_value(name.replace("_", " "), env[name], "need evt_ and 20 hex digits")
    for name in ("correlation_id", "partition_key", "tenant", "idempotency_key", "subject"):
        if name in env:
            check_text(env[name], name.replace("_", " "))
    if "schema" in env and not (
        type(env["schema"]) is str and SCHEMA_FIELD_RE.fullmatch(env["schema"])
    ):
        raise _bad_value("schema", env["schema"], "need <subject>/v<N>")
    # Every other string of the envelope, whatever its field (node_id, topic, subject, ...).
    for name, value in env.items():
        if type(value) is str and name not in _FIXED_FORMAT_FIELDS:
            refuse_credential(value, name.replace("_", " "))
    if "sig" in env and (not isinstance(env["sig"], str) or not SIG_RE.fullmatch(env["sig"])):
        raise InvalidEnvelope("bad sig: need ed25519: followed by 86 base64url characters")
    check_event_id(env["event_id"])
    expected = compute_event_id(env)
    if env["event_id"] != expected:
        raise InvalidEnvelope(f"event_id does not match content (content hashes to {expected})")
