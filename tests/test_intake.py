"""Properties of the gateway's pure parts: request shapes, the rate limiter, the writer's
framing. The HTTP behaviour itself is tested against a real server in test_gateway.py."""

from __future__ import annotations

import string
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from orxaq_autonomy.envelope import Draft
from orxaq_autonomy.errors import EventTooLarge
from orxaq_autonomy.gateway.app import RateLimiter
from orxaq_autonomy.gateway.intake import InvalidField, draft_from_request, drafts_from_batch
from orxaq_autonomy.gateway.writer import frame, split_frames
from strategies import json_scalars, json_values

SEGMENT = st.text(string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=8)
TEXT = st.text(string.ascii_letters + string.digits + " ./:-", min_size=1, max_size=40)
PAYLOAD = st.dictionaries(
    st.sampled_from(["n", "ok", "task_id", "items"]), json_scalars, max_size=4
)


@settings(max_examples=400)
@given(json_values)
def test_any_json_becomes_a_draft_or_a_named_field_error(body: Any) -> None:
    """Whatever a client sends, the answer is a draft or a 4xx naming a field: never a crash."""
    try:
        draft = draft_from_request(body)
    except InvalidField as exc:
        assert isinstance(exc.field, str) and exc.reason  # the field may be any key sent
        return
    except EventTooLarge:
        return
    assert isinstance(draft, Draft)


@settings(max_examples=200)
@given(
    json_values,
    st.sampled_from(["topic", "event_type", "type", "payload", "data", "specversion", "id"]),
)
def test_shaped_bodies_with_one_bad_field_are_blamed_on_a_field(junk: Any, key: str) -> None:
    base: dict[str, Any] = {"topic": "ci", "event_type": "result", "payload": {}}
    if key in ("type",):
        base = {"type": "ci.result", "payload": {}}
    elif key in ("data", "specversion", "id"):
        base = {"specversion": "1.0", "id": "1", "source": "/s", "type": "ci.result", "data": {}}
    try:
        draft_from_request({**base, key: junk})
    except InvalidField as exc:
        assert exc.field in {
            key,
            "body",
            "type",
            "payload",
            "topic",
            "event_type",
            "data",
            "specversion",
            "id",
            "event",
        } or exc.field.startswith(key)


@given(SEGMENT, st.lists(SEGMENT, min_size=1, max_size=3), PAYLOAD, TEXT, TEXT)
def test_the_three_shapes_agree(
    topic: str, types: list[str], payload: dict[str, Any], source: str, correlation: str
) -> None:
    event_type = ".".join(types)
    mesh = draft_from_request(
        {
            "topic": topic,
            "event_type": event_type,
            "payload": payload,
            "source": source,
            "correlation_id": correlation,
        }
    )
    router = draft_from_request(
        {
            "type": f"{topic}.{event_type}",
            "payload": payload,
            "source": source,
            "correlation_id": correlation,
        }
    )
    cloud = draft_from_request(
        {
            "specversion": "1.0",
            "id": "x",
            "type": f"{topic}.{event_type}",
            "source": source,
            "data": payload,
            "correlationid": correlation,
        }
    )
    assert mesh == router
    assert cloud._replace(idempotency_key=None) == mesh
    assert cloud.idempotency_key == f"ce:{len(source)}:{source}#x"


@given(TEXT, TEXT, TEXT, TEXT)
def test_cloudevents_keys_differ_whenever_source_or_id_differ(
    s1: str, i1: str, s2: str, i2: str
) -> None:
    def key(source: str, ident: str) -> str | None:
        body = {"specversion": "1.0", "id": ident, "source": source, "type": "a.b"}
        return draft_from_request(body).idempotency_key

    assert (key(s1, i1) == key(s2, i2)) == ((s1, i1) == (s2, i2))


@given(st.lists(PAYLOAD, min_size=1, max_size=20), st.integers(0, 19))
def test_a_batch_names_the_first_bad_item(payloads: list[dict[str, Any]], bad: int) -> None:
    items: list[Any] = [{"topic": "ci", "event_type": "x", "payload": p} for p in payloads]
    assert len(drafts_from_batch(items, 100)) == len(items)
    bad %= len(items)
    items[bad] = {**items[bad], "topic": "Not Valid"}
    try:
        drafts_from_batch(items, 100)
        raise AssertionError("accepted a bad item")
    except InvalidField as exc:
        assert exc.field == f"[{bad}].topic"


@given(
    st.floats(0.5, 50),
    st.integers(1, 20),
    st.lists(st.floats(0, 0.5), min_size=1, max_size=200),
)
def test_the_rate_limiter_never_allows_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    now = [0.0]
    limiter = RateLimiter(rate, burst, clock=lambda: now[0])
    allowed = 0
    for gap in gaps:
        now[0] += gap
        wait = limiter.wait("client")
        if wait == 0:
            allowed += 1
        else:
            assert 0 < wait <= 1 / rate + 1e-9
    assert allowed <= burst + rate * now[0] + 1e-6
    assert limiter.wait("other-client") == 0  # buckets are per client


@given(
    st.lists(st.lists(json_values, max_size=3), min_size=1, max_size=8),
    st.lists(st.integers(1, 64), max_size=20),
)
def test_frames_survive_any_split_into_reads(messages: list[Any], cuts: list[int]) -> None:
    wire = b"".join(frame(m) for m in messages)
    buffer = bytearray()
    got: list[Any] = []
    position = 0
    for cut in [*cuts, len(wire)]:
        buffer += wire[position : position + cut]
        position += cut
        got += [orjson.loads(raw) for raw in split_frames(buffer)]
    buffer += wire[position:]
    got += [orjson.loads(raw) for raw in split_frames(buffer)]
    assert got == [orjson.loads(orjson.dumps(m)) for m in messages] and not buffer
