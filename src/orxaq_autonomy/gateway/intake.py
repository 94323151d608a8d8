"""What the HTTP gateway accepts as "publish this", turned into one `Draft`.

Three shapes, told apart by their keys:

- the mesh's own fields, as in `mesh-publish --stdin` (`topic`, `event_type`, `payload`,
  `causation_id`, `correlation_id`, `target`, `partition_key`, `tenant`,
  `idempotency_key`, `source`, `timestamp`; `causation` and `correlation` are accepted
  as short names);
- the HTTP router format this project replaces: `{"type": "ci.result", "source", "payload",
  "timestamp"?, "correlation_id"?}` (the first segment of `type` is the topic, the rest the
  event type), plus any of the mesh's optional fields;
- a CloudEvents 1.0 event in structured JSON mode (it has `specversion`), or in binary
  mode (`ce-*` headers, the data in the body: `cloudevent_from_http` turns it into the
  structured form first).

Every problem is an `InvalidField` naming the request's own field (`type`, `data`, ...),
so a 422 tells the caller what to fix in the terms they used.
Every string of the request that reaches the event (CloudEvents `id` and `subject`
included) is checked for credentials, and the topic `mesh` is refused: it is the mesh's
own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from ..envelope import (
    DRAFT_FIELDS,
    MAX_EVENT_BYTES,
    OPTIONAL_FIELDS,
    Draft,
    ReservedTopic,
    check_fits,
    check_not_reserved,
)
from ..errors import BadInput, EventTooLarge

DEFAULT_SOURCE = "http"
_SMALL = MAX_EVENT_BYTES // 2  # a request this short cannot become an oversize event
ALIASES = {"causation": "causation_id", "correlation": "correlation_id"}
_MESH_FIELDS = DRAFT_FIELDS | ALIASES.keys()
_ROUTER_FIELDS = {"type", "source", "payload", "timestamp", *OPTIONAL_FIELDS, *ALIASES}

# CloudEvents context attributes and the draft fields they fill. `id` (with `source`)
# becomes the idempotency key: CloudEvents says the pair identifies an event, and that a
# repeated pair is a duplicate. The source's length goes first, so no two pairs share a key.
CE_ATTRIBUTES = {
    "specversion": None,
    "id": "idempotency_key",
    "source": "source",
    "type": "event_type",
    "time": "timestamp",
    "data": "payload",
    "datacontenttype": None,
    "subject": "subject",  # kept as given; also the partition key if none is given
    "partitionkey": "partition_key",  # the CloudEvents partitioning extension
    "correlationid": "correlation_id",
    "causationid": "causation_id",
    "tenant": "tenant",
    "target": "target",
    # Accepted and not kept: a schema URI and the distributed-tracing extension, which
    # CloudEvents SDKs add on their own. Any other attribute is refused, never dropped.
    "dataschema": None,
    "traceparent": None,
    "tracestate": None,
}


class InvalidField(BadInput):
    """A request field that cannot become (part of) an event."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def draft_from_request(body: Any, size_bound: int = MAX_EVENT_BYTES) -> Draft:
    """The draft for one event in any of the three shapes; raises `InvalidField`.
    `size_bound` is what the caller knows of its serialised size (the request's length):
    below the event limit, the trial seal for oversize events is skipped."""
    if not isinstance(body, dict):
        raise InvalidField("body", "need a JSON object for one event")
    if "specversion" in body:
        fields, names = _from_cloudevent(body)
    elif "type" in body and "topic" not in body:
        fields, names = _from_router(body)
    else:
        fields, names = _from_mesh(body)
    return _build(fields, names, size_bound)


def drafts_from_batch(body: Any, max_events: int, size_bound: int = MAX_EVENT_BYTES) -> list[Draft]:
    """Every draft of a batch (a JSON array, or `{"events": [...]}`), or the first
    problem, named by its index: `[3].type`."""
    if isinstance(body, dict) and set(body) == {"events"}:
        body = body["events"]
    if not isinstance(body, list):
        raise InvalidField("body", 'need a JSON array of events (or {"events": [...]})')
    if not body:
        raise InvalidField("body", "the batch is empty")
    if len(body) > max_events:
        raise InvalidField("body", f"{len(body)} events; a batch holds at most {max_events}")
    drafts = []
    for index, item in enumerate(body):
        try:
            drafts.append(draft_from_request(item, size_bound))
        except InvalidField as exc:
            raise InvalidField(f"[{index}].{exc.field}", exc.reason) from None
        except EventTooLarge as exc:
            raise EventTooLarge(f"[{index}]: {exc.message}") from None
    return drafts


# --- the three shapes ----------------------------------------------------------------------

Fields = dict[str, Any]
Names = dict[str, str]  # draft field -> the request's name for it


def _from_mesh(body: dict[str, Any]) -> tuple[Fields, Names]:
    unknown = sorted(body.keys() - _MESH_FIELDS)
    if unknown:
        raise InvalidField(
            unknown[0], f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(DRAFT_FIELDS))}"
        )
    if body.keys().isdisjoint(ALIASES):
        return body, {}  # the common case: the request's names are the draft's
    return _renamed(body)


def _from_router(body: dict[str, Any]) -> tuple[Fields, Names]:
    unknown = sorted(body.keys() - _ROUTER_FIELDS)
    if unknown:
        raise InvalidField(
            unknown[0],
            f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_ROUTER_FIELDS))}",
        )
    rest = {k: v for k, v in body.items() if k != "type"}
    fields, names = _renamed(rest)
    fields["topic"], fields["event_type"] = _split_type(body["type"], "type")
    names["topic"] = names["event_type"] = "type"
    return fields, names


def _from_cloudevent(body: dict[str, Any]) -> tuple[Fields, Names]:
    if body["specversion"] != "1.0":
        raise InvalidField("specversion", f"{body['specversion']!r} is not supported; need '1.0'")
    if "data_base64" in body:
        raise InvalidField("data_base64", "binary data is not supported; send JSON in data")
    unknown = sorted(body.keys() - CE_ATTRIBUTES.keys())
    if unknown:
        raise InvalidField(
            unknown[0],
            f"unsupported CloudEvents attribute {unknown[0]!r}; supported: "
            + ", ".join(sorted(CE_ATTRIBUTES)),
        )
    for name in ("id", "source", "type"):
        if not isinstance(body.get(name), str) or not body[name]:
            raise InvalidField(name, "required: a non-empty string")
    content_type = body.get("datacontenttype", "application/json")
    if not is_json_media_type(content_type):
        raise InvalidField("datacontenttype", f"{content_type!r}: only JSON data is supported")
    fields: Fields = {}
    names: Names = {}
    for attribute, target in CE_ATTRIBUTES.items():
        if target is None or attribute not in body or attribute in ("id", "type"):
            continue
        fields[target], names[target] = body[attribute], attribute
    if "subject" in body and "partitionkey" not in body:
        # events about one subject stay in order, as before `subject` was kept
        fields["partition_key"], names["partition_key"] = body["subject"], "subject"
    fields["topic"], fields["event_type"] = _split_type(body["type"], "type")
    names["topic"] = names["event_type"] = "type"
    fields["idempotency_key"] = f"ce:{len(body['source'])}:{body['source']}#{body['id']}"
    names["idempotency_key"] = "id"
    return fields, names


def is_json_media_type(value: Any) -> bool:
    """`application/json`, `text/json`, `application/<anything>+json` (CloudEvents' own
    `application/cloudevents+json` among them), parameters and case aside: the media types
    the CloudEvents JSON format treats as JSON data."""
    if not isinstance(value, str):
        return False
    media = value.split(";", 1)[0].strip().lower()
    kind, _, sub = media.partition("/")
    return (kind, sub) in {("application", "json"), ("text", "json")} or (
        kind == "application" and sub.endswith("+json") and len(sub) > len("+json")
    )


def is_structured_cloudevent(content_type: str | None) -> bool:
    """CloudEvents' structured mode media type (with parameters, any case)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/cloudevents+json"


def is_binary_cloudevent(headers: Mapping[str, str]) -> bool:
    """A request in CloudEvents' binary mode: `ce-specversion` given, and a Content-Type
    other than the structured mode's (which wins, as the HTTP binding says)."""
    return "ce-specversion" in headers and not is_structured_cloudevent(headers.get("content-type"))


def cloudevent_from_http(headers: Mapping[str, str], data: Any, has_data: bool) -> Any:
    """The request body as `draft_from_request` reads it. In CloudEvents' binary mode, the
    structured event: every `ce-<name>` header is the attribute `<name>` (values
    percent-decoded, as the HTTP binding says), the Content-Type is `datacontenttype` and
    the body is `data`. In structured mode the body must be a CloudEvent. Any other
    request comes back as it was."""
    if not is_binary_cloudevent(headers):
        if (
            is_structured_cloudevent(headers.get("content-type"))
            and isinstance(data, dict)
            and "specversion" not in data
        ):
            raise InvalidField("specversion", "required in application/cloudevents+json")
        return data
    event: dict[str, Any] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith("ce-") and len(lower) > 3:
            attribute = lower[3:]
            if attribute in ("data", "data_base64"):
                raise InvalidField(name, "not a CloudEvents attribute header")
            event[attribute] = unquote(value)
    content_type = headers.get("content-type")
    if content_type is not None:
        event["datacontenttype"] = content_type
    if has_data:
        event["data"] = data
    return event


def _renamed(body: dict[str, Any]) -> tuple[Fields, Names]:
    fields: Fields = {}
    names: Names = {}
    for name, value in body.items():
        target = ALIASES.get(name, name)
        if target in fields:
            raise InvalidField(name, f"given twice (as {names[target]!r} too)")
        fields[target], names[target] = value, name
    return fields, names


def _split_type(value: Any, name: str) -> tuple[str, str]:
    if not isinstance(value, str) or "." not in value.strip("."):
        raise InvalidField(name, f"{value!r}: need <topic>.<event type>, e.g. ci.result")
    topic, _, event_type = value.partition(".")
    return topic, event_type


# --- validation ----------------------------------------------------------------------------


def _build(fields: Fields, names: Names, size_bound: int) -> Draft:
    try:
        draft = Draft.from_mapping(fields, DEFAULT_SOURCE)
        # the mesh's own topic (key rotation, dead letters, ...) is never published over HTTP
        check_not_reserved(draft.topic)
        if size_bound > _SMALL:
            check_fits(draft)
        return draft
    except EventTooLarge:
        raise
    except BadInput as exc:
        field = "topic" if isinstance(exc, ReservedTopic) else _blame(fields)
        reason = exc.message
        raise InvalidField(names.get(field, field), reason) from None


def _blame(fields: Fields) -> str:
    """The field behind a validation error: each field is checked on its own. This runs
    only after a failure, so the happy path validates once."""
    for name in ("topic", "event_type"):
        if fields.get(name) is None:
            return name
    if "payload" in fields and fields["payload"] is None:
        return "payload"
    base = {"topic": "t", "event_type": "e"}
    for name, value in fields.items():
        if value is None:
            continue
        try:
            Draft.create(**{**base, name: value})
        except BadInput:
            return name
    return "event"


# --- the other way: an event as a CloudEvent ------------------------------------------------

# Envelope fields and the CloudEvents extension attributes that carry them, the same names
# the intake reads: an event written out can be posted to another mesh as it is.
_CE_EXTENSIONS = {
    "partition_key": "partitionkey",
    "correlation_id": "correlationid",
    "causation_id": "causationid",
    "tenant": "tenant",
    "target": "target",
}


def to_cloudevent(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """One event as a CloudEvents 1.0 event in structured JSON form: `id` is the event id,
    `type` the routing key, `time` the timestamp, `data` the payload; `subject` and the
    extensions above when the event has them."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": envelope["event_id"],
        "source": envelope["source"],
        "type": f"{envelope['topic']}.{envelope['event_type']}",
        "time": envelope["timestamp"],
        "datacontenttype": "application/json",
    }
    if "subject" in envelope:
        event["subject"] = envelope["subject"]
    for field, attribute in _CE_EXTENSIONS.items():
        if field in envelope:
            event[attribute] = envelope[field]
    event["data"] = envelope["payload"]
    return event
