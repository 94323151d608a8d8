"""Standards conformance: CloudEvents 1.0 over HTTP (requests built and output read by the
official `cloudevents` SDK, against a real mesh-serve) and signed 64-bit integers refused
alike at both ends."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Runner, log_lines, snapshot
from orxaq_autonomy.envelope import (
    INT64_MAX,
    INT64_MIN,
    InvalidEnvelope,
    loads_json,
    parse_envelope,
    payload_problem,
)
from orxaq_autonomy.gateway.intake import is_json_media_type
from serving import serving

# --- integers: both ends of signed 64 bit ----------------------------------------------------

outside = st.one_of(
    st.integers(max_value=INT64_MIN - 1),
    st.integers(min_value=INT64_MAX + 1),
    st.sampled_from([INT64_MIN - 1, INT64_MAX + 1, -(2**64), 2**64, -(10**19)]),
)
inside = st.one_of(
    st.integers(min_value=INT64_MIN, max_value=INT64_MAX),
    st.sampled_from([INT64_MIN, INT64_MAX, INT64_MIN + 1, -(10**18), 0]),
)


@given(outside)
def test_json_integers_outside_64_bit_are_refused_at_both_ends(value: int) -> None:
    text = f'{{"n": {value}, "nested": [1, {{"m": {value}}}]}}'
    with pytest.raises(orjson.JSONDecodeError, match="outside signed 64 bit"):
        loads_json(text)
    assert payload_problem({"n": value}) is not None
    assert payload_problem({"a": [value]}) is not None


@given(inside)
def test_json_integers_inside_64_bit_stay_integers(value: int) -> None:
    parsed = loads_json(f'{{"n": {value}, "l": [{value}]}}')
    assert parsed == {"n": value, "l": [value]}
    assert type(parsed["n"]) is int
    assert payload_problem(parsed) is None


@pytest.mark.parametrize("value", [INT64_MIN - 1, INT64_MAX + 1])
def test_publish_refuses_both_ends_alike(root: Path, cli: Runner, value: int) -> None:
    before = snapshot(root)
    result = cli(
        "--root", str(root), "mesh-publish", "--topic", "t", "--event-type", "e",
        "--payload-json", f'{{"n": {value}}}',
    )  # fmt: skip
    assert result.code == 2
    assert "outside signed 64 bit" in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) == 1
    batch = cli(
        "--root", str(root), "mesh-publish", "--stdin",
        stdin=f'{{"topic": "t", "event_type": "e", "payload": {{"n": {value}}}}}\n',
    )  # fmt: skip
    assert batch.code == 2 and "outside signed 64 bit" in batch.err
    assert snapshot(root) == before


def test_an_imported_line_below_the_minimum_is_refused_not_read_as_float(
    root: Path, cli: Runner
) -> None:
    assert cli("--root", str(root), "mesh-publish", "--topic", "t", "--event-type", "e").code == 0
    (line,) = [orjson.dumps(e) for e in log_lines(root)]
    tampered = line.replace(b'"payload":{}', b'"payload":{"n":-9223372036854775809}')
    assert tampered != line
    with pytest.raises(InvalidEnvelope, match="outside signed 64 bit"):
        parse_envelope(tampered)


# --- CloudEvents media types --------------------------------------------------------------

JSON_TYPES = [
    "application/json",
    "text/json",
    "application/json; charset=utf-8",
    "Application/JSON",
    "application/cloudevents+json",
    "application/vnd.example.order+json; version=2",
    "text/json;charset=UTF-8",
]
NOT_JSON = ["text/plain", "application/xml", "application/+json", "image/json", "json", ""]


def test_json_media_types() -> None:
    assert all(is_json_media_type(t) for t in JSON_TYPES)
    assert not any(is_json_media_type(t) for t in NOT_JSON)


# --- CloudEvents over HTTP against a real mesh-serve ----------------------------------------


def _event(data: Any = None, **attributes: Any) -> CloudEvent:
    base = {"type": "ci.build.finished", "source": "/ci/jenkins", "id": "run-1"}
    return CloudEvent({**base, **attributes}, data)


def _post(http: Any, message: Any) -> Any:
    return http.post("/events", content=message.body, headers=dict(message.headers))


def test_sdk_binary_and_structured_requests_keep_every_attribute(root: Path) -> None:
    when = datetime(2026, 11, 22, 12, 34, 56, 789012, tzinfo=UTC)
    full = {
        "subject": "repo-1",
        "partitionkey": "lane-7",
        "correlationid": "deploy-9",
        "tenant": "acme",
        "time": when,
    }
    with serving(root, "--dispatch-every", "0") as server, server.client() as http:
        for mode, to_http in (("b", ce_http.to_binary_event), ("s", ce_http.to_structured_event)):
            for i, media in enumerate(JSON_TYPES):
                if mode == "b" and media == "application/cloudevents+json":
                    continue  # that Content-Type means structured mode (the HTTP binding)
                if mode == "s" and media == "Application/JSON":
                    continue  # the SDK 2.2 writes data of this spelling as Python's repr
                event = _event(
                    {"ok": True, "mode": mode, "n": i},
                    id=f"{mode}-{i}",
                    datacontenttype=media,
                    **full,
                )
                message = to_http(event)
                if mode == "b":
                    assert "ce-specversion" in message.headers, "the SDK sent binary mode"
                else:
                    assert message.headers["content-type"] == "application/cloudevents+json"
                answer = _post(http, message)
                assert answer.status_code == 201, (mode, media, answer.text)
                kept = answer.json()["event"]
                assert kept["topic"] == "ci" and kept["event_type"] == "build.finished"
                assert kept["payload"] == {"ok": True, "mode": mode, "n": i}
                assert kept["source"] == "/ci/jenkins"
                assert kept["subject"] == "repo-1", "subject kept beside partitionkey"
                assert kept["partition_key"] == "lane-7"
                assert kept["correlation_id"] == "deploy-9" and kept["tenant"] == "acme"
                assert kept["timestamp"] == "2026-11-22T12:34:56.789012Z"
                assert kept["idempotency_key"] == f"ce:11:/ci/jenkins#{mode}-{i}"
                # CloudEvents: the same source and id again is the same event
                again = _post(http, to_http(event))
                assert again.status_code == 200 and again.json()["duplicate"] is True

        # media types are case-blind (the SDK's structured writer is not, so by hand)
        upper = {"specversion": "1.0", "id": "u", "source": "/s", "type": "a.b",
                 "datacontenttype": "Application/JSON", "data": {"up": 1}}  # fmt: skip
        answer = http.post(
            "/events", json=upper, headers={"content-type": "application/cloudevents+json"}
        )
        assert answer.status_code == 201 and answer.json()["event"]["payload"] == {"up": 1}
        # subject alone still orders by subject; a binary event may carry no data at all
        alone = _post(http, ce_http.to_binary_event(_event({"x": 1}, id="s1", subject="r-2")))
        assert alone.json()["event"]["partition_key"] == "r-2"
        assert alone.json()["event"]["subject"] == "r-2"
        empty = _post(http, ce_http.to_binary_event(_event(None, id="empty")))
        assert empty.status_code == 201 and empty.json()["event"]["payload"] == {}
        # percent-encoded header values are decoded (the HTTP binding's rule)
        odd = _post(http, ce_http.to_binary_event(_event({}, id="odd", subject="a b%c\u00e9")))
        assert odd.json()["event"]["subject"] == "a b%c\u00e9"

        before = snapshot(root)
        refusals = [
            # binary mode with data that is not JSON
            ({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "a.b",
              "content-type": "text/plain"}, b"42", "datacontenttype"),
            # binary mode missing a required attribute
            ({"ce-specversion": "1.0", "ce-source": "/s", "ce-type": "a.b",
              "content-type": "application/json"}, b"{}", "id"),
            # structured mode whose body is no CloudEvent
            ({"content-type": "application/cloudevents+json"},
             b'{"topic": "t", "event_type": "e"}', "specversion"),
            # an unknown extension is refused, not dropped
            ({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "a.b",
              "ce-colour": "red", "content-type": "application/json"}, b"{}", "colour"),
            # a credential in a header attribute
            ({"ce-specversion": "1.0", "ce-id": "x", "ce-source": "/s", "ce-type": "a.b",
              "ce-subject": "ghp_" + "aB3dE5fG7h" * 4, "content-type": "application/json"},
             b"{}", "subject"),
        ]  # fmt: skip
        for headers, body, field in refusals:
            answer = http.post("/events", content=body, headers=headers)
            assert answer.status_code == 422, (field, answer.text)
            assert answer.json()["error"]["field"] == field
        assert snapshot(root) == before


def test_mesh_log_format_cloudevents_is_read_back_by_the_sdk(root: Path, cli: Runner) -> None:
    base = ["--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "build.done"]
    assert cli(*base, "--payload-json", '{"ok": true, "n": 1}', "--partition-key", "p").code == 0
    assert cli(*base, "--correlation-id", "c-1", "--tenant", "acme").code == 0
    out = cli("--root", str(root), "mesh-log", "--format", "cloudevents")
    assert out.code == 0
    rows = out.out.splitlines()
    envelopes = log_lines(root)
    assert len(rows) == len(envelopes) == 2
    fmt = JSONFormat()
    for row, env in zip(rows, envelopes, strict=True):
        event = fmt.read(None, row.encode())
        assert event.get_specversion() == "1.0"
        assert event.get_id() == env["event_id"]
        assert event.get_source() == env["source"]
        assert event.get_type() == f"{env['topic']}.{env['event_type']}"
        assert event.get_time() == datetime.fromisoformat(env["timestamp"])
        assert event.get_data() == env["payload"]
        assert event.get_extension("partitionkey") == env.get("partition_key")
        assert event.get_extension("correlationid") == env.get("correlation_id")
        assert event.get_extension("tenant") == env.get("tenant")
    bad = cli("--root", str(root), "mesh-log", "--format", "xml")
    assert bad.code == 2 and "--format" in bad.err and "Traceback" not in bad.err


def test_mesh_log_cloudevents_post_into_another_mesh(
    root: Path, tmp_path: Path, cli: Runner
) -> None:
    """The output feeds CloudEvents tools, this mesh's own gateway among them."""
    assert cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "x",
               "--payload-json", '{"k": "v"}', "--partition-key", "p").code == 0  # fmt: skip
    (row,) = cli("--root", str(root), "mesh-log", "--format", "cloudevents").out.splitlines()
    other = tmp_path / "other"
    assert cli("--root", str(other), "mesh-init", "--node-id", "node-b").code == 0
    with serving(other, "--dispatch-every", "0") as server, server.client() as http:
        event = JSONFormat().read(None, row.encode())
        answer = _post(http, ce_http.to_structured_event(event))
        assert answer.status_code == 201, answer.text
        kept = answer.json()["event"]
        assert kept["payload"] == {"k": "v"} and kept["partition_key"] == "p"


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text(st.characters(codec="utf-8"), max_size=8),
        st.one_of(st.integers(INT64_MIN, INT64_MAX), st.text(max_size=12), st.booleans()),
        max_size=4,
    ),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789 -_/%é", min_size=1, max_size=20),
)
def test_binary_mode_round_trip_of_headers_and_data(data: dict[str, Any], subject: str) -> None:
    """What the SDK writes as headers and body, the intake reads back as the same event."""
    from orxaq_autonomy.gateway.intake import cloudevent_from_http, draft_from_request

    message = ce_http.to_binary_event(_event(data, subject=subject))
    headers = {k.lower(): v for k, v in message.headers.items()}
    body = loads_json(message.body)
    try:
        draft = draft_from_request(cloudevent_from_http(headers, body, has_data=True))
    except Exception as exc:  # only credential-shaped or over-long values may be refused
        assert "credential" in str(exc) or "secret" in str(exc), exc
        return
    assert draft.payload == data and draft.subject == subject


# --- mesh-log filters and --follow ------------------------------------------------------


def _publish(cli: Runner, root: Path, topic: str, *extra: str) -> str:
    result = cli("--root", str(root), "mesh-publish", "--topic", topic, "--event-type", "e",
                 "--json", *extra)  # fmt: skip
    assert result.code == 0, result.err
    return str(result.json()["event_id"])


def test_mesh_log_filters(root: Path, cli: Runner) -> None:
    a = _publish(cli, root, "ci", "--correlation-id", "c1", "--tenant", "acme")
    b = _publish(cli, root, "ops", "--correlation-id", "c1", "--target", "node-b")
    c = _publish(cli, root, "ci", "--tenant", "other", "--target", "Node-B")

    def ids(*args: str) -> list[str]:
        out = cli("--root", str(root), "mesh-log", "--json", *args)
        assert out.code == 0, out.err
        return [e["event_id"] for e in out.json()["events"]]

    assert ids("--correlation-id", "c1") == [a, b]
    assert ids("--tenant", "acme") == [a]
    assert ids("--target", "NODE-B") == [b, c]  # node ids are normalised
    assert ids("--topic", "ci") == [a, c]
    assert ids("--topic", "ci", "--limit", "1") == [c]
    assert ids("--correlation-id", "c1", "--topic", "ops") == [b]
    bad = cli("--root", str(root), "mesh-log", "--tenant", "x", "--since", "yesterday")
    assert bad.code == 2 and "Traceback" not in bad.err


def test_mesh_log_follow_prints_new_matching_events_until_interrupted(
    root: Path, cli: Runner
) -> None:
    import os
    import select
    import signal
    import subprocess
    import sys
    import time

    from conftest import ENV_VARS

    first = _publish(cli, root, "ci", "--correlation-id", "c1")
    _publish(cli, root, "ci", "--correlation-id", "c2")
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "orxaq_autonomy", "--root", str(root), "mesh-log",
         "--follow", "--json", "--correlation-id", "c1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout, proc.stderr
    buffer = b""

    def next_line(timeout: float = 15) -> dict[str, Any]:
        nonlocal buffer
        deadline = time.monotonic() + timeout
        while b"\n" not in buffer:
            left = deadline - time.monotonic()
            assert left > 0, "mesh-log --follow printed nothing in time"
            ready, _, _ = select.select([out], [], [], left)
            if ready:
                chunk = os.read(out.fileno(), 65536)
                assert chunk, f"mesh-log --follow ended: {err.read().decode()}"
                buffer += chunk
        line, _, buffer = buffer.partition(b"\n")
        parsed: dict[str, Any] = orjson.loads(line)
        return parsed

    try:
        assert next_line()["event_id"] == first  # the backlog, one object a line
        _publish(cli, root, "ci", "--correlation-id", "c2")  # filtered out
        later = _publish(cli, root, "ops", "--correlation-id", "c1")
        event = next_line()
        assert event["event_id"] == later and event["topic"] == "ops"
        assert "seq" in event and "sig" in event  # the whole envelope
        time.sleep(0.5)
        assert not select.select([out], [], [], 0)[0], "nothing else printed"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert b"Traceback" not in err.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()
