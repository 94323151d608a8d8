"""The v1 envelope: canonical form, ids, field rules, strict parsing (with hypothesis)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orxaq_autonomy.envelope import (
    ALL_FIELDS,
    MAX_EVENT_BYTES,
    Draft,
    InvalidEnvelope,
    canonical_bytes,
    compute_event_id,
    normalise_node_id,
    normalise_timestamp,
    parse_envelope,
    seal,
)
from orxaq_autonomy.errors import BadInput
from strategies import json_values

# --- an independent implementation of docs/format.md, to check the doc against the code ----


def doc_float(value: float) -> str:
    """Floats as docs/format.md specifies: shortest round-trip digits; positional for
    decimal exponents -5..15, otherwise d.ddde±X with no padding."""
    if value == 0:
        return "-0.0" if math.copysign(1, value) < 0 else "0.0"
    exponent = f"{value:.16e}".split("e")[1]
    text = repr(value)
    mantissa, _, exp_text = text.partition("e")
    if exp_text:
        exponent_value = int(exp_text)
    else:
        exponent_value = int(exponent)
        # repr chose positional: that happens for exponents -4..15, all inside the doc's range
        return text
    if -5 <= exponent_value <= 15:
        # repr uses an exponent for 1e-05 territory; the doc wants positional there
        sign = "-" if mantissa.startswith("-") else ""
        digits_only = mantissa.lstrip("-").replace(".", "")
        return f"{sign}0.{'0' * (-exponent_value - 1)}{digits_only.rstrip('0') or '0'}"
    sign = "+" if exponent_value > 0 else "-"
    return f"{mantissa}e{sign}{abs(exponent_value)}"


def doc_canonical(value: Any) -> str:
    """docs/format.md's canonical JSON, written from the doc with the standard library."""
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(f"{doc_canonical(k)}:{doc_canonical(v)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(doc_canonical(v) for v in value) + "]"
    if isinstance(value, float):
        return doc_float(value)
    return json.dumps(value, ensure_ascii=False)


payloads = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
segment = st.from_regex(r"[a-z0-9_-]{1,8}", fullmatch=True)


@st.composite
def drafts(draw: st.DrawFn) -> Draft:
    optional = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "correlation_id": st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True),
                "target": st.from_regex(r"[a-z0-9][a-z0-9.-]{0,10}", fullmatch=True),
                "partition_key": st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True),
                "tenant": st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True),
                "idempotency_key": st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True),
                "causation_id": st.from_regex(r"evt_[0-9a-f]{64}", fullmatch=True),
            },
        )
    )
    try:
        return Draft.create(
            draw(segment),
            ".".join(draw(st.lists(segment, min_size=1, max_size=3))),
            draw(payloads),
            source="test",
            **optional,
        )
    except BadInput as exc:  # a generated payload that looks like a secret
        assert "secret" in exc.message or "credential" in exc.message
        from hypothesis import reject

        reject()


def test_event_id_is_sha256_of_canonical_form_without_id_and_sig() -> None:
    draft = Draft.create("routing", "route.requested", {"task_id": "task-17", "n": 1.5})
    env, line = seal(
        draft, node_id="node-a", seq=1, prev=None, clock=1, timestamp="2026-11-22T12:34:56.789012Z"
    )
    body = {k: v for k, v in env.items() if k != "event_id"}
    expected = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    assert env["event_id"] == "evt_" + expected
    assert parse_envelope(line) == env
    # a signature is not part of the hash
    assert compute_event_id({**env, "sig": "ed25519:" + "A" * 86}) == env["event_id"]


def test_known_vector_stays_stable() -> None:
    """A fixed envelope and its id, also given in docs/format.md: changing it breaks ledgers."""
    env = {
        "v": 1,
        "node_id": "node-a",
        "seq": 1,
        "clock": 1,
        "timestamp": "2026-11-22T12:34:56.789012Z",
        "topic": "routing",
        "event_type": "route.requested",
        "source": "cli",
        "payload": {"task_id": "task-17", "score": 0.5, "n": 3},
    }
    # written by hand from docs/format.md; the id was computed with `sha256sum`
    assert canonical_bytes(env) == (
        b'{"clock":1,"event_type":"route.requested","node_id":"node-a",'
        b'"payload":{"n":3,"score":0.5,"task_id":"task-17"},"seq":1,"source":"cli",'
        b'"timestamp":"2026-11-22T12:34:56.789012Z","topic":"routing","v":1}'
    )
    assert compute_event_id(env) == KNOWN_VECTOR_ID


KNOWN_VECTOR_ID = "evt_a31553ebf3b2f296ad2de84c0086adc2d03b3b303f5730085dd36ae2116a3842"


@given(payloads)
def test_canonical_form_matches_the_documented_rules(payload: dict[str, Any]) -> None:
    assert canonical_bytes(payload).decode() == doc_canonical(payload)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_format_matches_the_documented_rule(value: float) -> None:
    assert canonical_bytes({"x": value}).decode() == '{"x":' + doc_float(value) + "}"


@given(drafts(), st.randoms())
@settings(max_examples=200)
def test_id_is_stable_under_key_order_and_envelopes_round_trip(draft: Draft, rnd: Any) -> None:
    env, line = seal(
        draft,
        node_id="node-a",
        seq=3,
        prev="evt_" + "ab" * 32,
        clock=9,
        timestamp="2026-11-22T00:00:00.000000Z",
    )
    items = list(env.items())
    rnd.shuffle(items)
    shuffled = dict(items)
    assert compute_event_id(shuffled) == env["event_id"]
    # re-serialised in any key order, the envelope parses back to itself
    assert parse_envelope(orjson.dumps(shuffled)) == env
    assert parse_envelope(line) == env


@given(st.binary(max_size=300))
def test_parser_refuses_garbage_with_invalid_envelope_only(data: bytes) -> None:
    with contextlib.suppress(InvalidEnvelope):
        parse_envelope(data)


@given(drafts(), st.sampled_from(["payload", "seq", "clock", "topic", "node_id", "timestamp"]))
@settings(max_examples=100)
def test_any_tampering_changes_the_id(draft: Draft, field: str) -> None:
    env, _ = seal(
        draft,
        node_id="node-a",
        seq=2,
        prev="evt_" + "cd" * 32,
        clock=5,
        timestamp="2026-11-22T00:00:00.000000Z",
    )
    tampered = dict(env)
    tampered[field] = {
        "payload": {**env["payload"], "tampered": True},
        "seq": 7,
        "clock": 6,
        "topic": "other",
        "node_id": "node-z",
        "timestamp": "2026-11-22T00:00:00.000001Z",
    }[field]
    with pytest.raises(InvalidEnvelope, match="does not match content"):
        parse_envelope(orjson.dumps(tampered))


def test_optional_fields_are_omitted_not_null() -> None:
    env, line = seal(
        Draft.create("ci", "result", {}),
        node_id="n1",
        seq=1,
        prev=None,
        clock=1,
        timestamp="2026-11-22T00:00:00.000000Z",
    )
    assert b"null" not in line
    assert "prev" not in env and "target" not in env
    with pytest.raises(InvalidEnvelope, match="null"):
        parse_envelope(orjson.dumps({**env, "target": None}))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Node_A", "node-a"),
        ("  Build Box 7 ", "build-box-7"),
        ("ci.runner-3", "ci.runner-3"),
        ("Ünïcode", None),
        ("web_01", "web-01"),
        ("-leading", None),
        ("", None),
        ("a" * 64, None),
    ],
)
def test_node_id_normalisation(raw: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(BadInput, match="bad node id"):
            normalise_node_id(raw)
    else:
        assert normalise_node_id(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-11-22T12:34:56Z", "2026-11-22T12:34:56.000000Z"),
        ("2026-11-22T14:34:56.5+02:00", "2026-11-22T12:34:56.500000Z"),
        ("2026-11-22t12:34:56.123456z", "2026-11-22T12:34:56.123456Z"),
        ("2026-11-21T23:00:00-05:30", "2026-11-22T04:30:00.000000Z"),
    ],
)
def test_timestamps_are_normalised_to_utc_micro_z(raw: str, expected: str) -> None:
    assert normalise_timestamp(raw) == expected


@pytest.mark.parametrize("raw", ["2026-11-22", "2026-11-22T12:34:56", "yesterday", "", 5])
def test_bad_timestamps_are_refused(raw: Any) -> None:
    with pytest.raises(BadInput, match="timestamp"):
        normalise_timestamp(raw)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"topic": "Routing"}, "bad topic"),
        ({"topic": "a.b"}, "bad topic"),
        ({"event_type": "route..requested"}, "bad event type"),
        ({"event_type": ""}, "bad event type"),
        ({"payload": [1, 2]}, "need a JSON object"),
        ({"payload": {"n": 2**63}}, "signed 64 bit"),
        ({"payload": {"x": float("nan")}}, "finite"),
        ({"payload": {"password": "hunter2!"}}, "secret"),
        ({"payload": {"note": "AKIAIOSFODNN7EXAMPLE"}}, "credential"),
        ({"causation_id": "evt_123"}, "causation id"),
        ({"correlation_id": "a\nb"}, "control characters"),
        ({"tenant": "x" * 300}, "tenant"),
    ],
)
def test_bad_drafts_are_refused_with_the_field_named(kwargs: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {"topic": "ci", "event_type": "result", "payload": {}}
    fields.update(kwargs)
    with pytest.raises(BadInput, match=re.escape(message)):
        Draft.create(fields.pop("topic"), fields.pop("event_type"), **fields)


def test_oversize_events_are_refused() -> None:
    draft = Draft.create("ci", "result", {"blob": "x" * MAX_EVENT_BYTES})
    with pytest.raises(BadInput, match="too large"):
        seal(draft, node_id="n", seq=1, prev=None, clock=1, timestamp="2026-11-22T00:00:00.000000Z")


def test_secret_placeholders_and_counters_pass() -> None:
    Draft.create(
        "llm",
        "call",
        {
            "max_tokens": 4096,
            "token_count": 12,
            "password": "***",
            "api_key": "${API_KEY}",
            "sha": "ab" * 32,
        },
    )


@given(drafts(), st.sampled_from(sorted(ALL_FIELDS | {"extra"})), json_values)
@settings(max_examples=300)
def test_mutated_envelopes_are_refused_cleanly_or_verified(
    draft: Draft, field: str, value: Any
) -> None:
    """Any field replaced by any JSON value: the parser refuses it with InvalidEnvelope, or
    accepts it only when the id still matches the content."""
    env, _ = seal(
        draft,
        node_id="node-a",
        seq=2,
        prev="evt_" + "cd" * 32,
        clock=5,
        timestamp="2026-11-22T00:00:00.000000Z",
    )
    mutated = {**env, field: value}
    try:
        parsed = parse_envelope(orjson.dumps(mutated))
    except InvalidEnvelope:
        return
    assert compute_event_id(parsed) == parsed["event_id"]
