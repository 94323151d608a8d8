"""mesh-serve over real HTTP: a uvicorn process on 127.0.0.1 and a real client."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import orjson

from conftest import log_lines, snapshot
from orxaq_autonomy import Mesh
from serving import child_pids, serving

CI_EVENT = {"type": "ci.result", "source": "jenkins", "payload": {"ok": True, "run": 7}}


def test_three_input_shapes_become_events(root: Path) -> None:
    with serving(root, "--dispatch-every", "0") as server, server.client() as http:
        mesh_shape = http.post(
            "/events",
            json={
                "topic": "routing",
                "event_type": "route.requested",
                "payload": {"task_id": "t-1"},
                "correlation": "deploy-1",
                "partition_key": "t-1",
                "tenant": "acme",
            },
        )
        assert mesh_shape.status_code == 201
        answer = mesh_shape.json()
        assert answer["duplicate"] is False
        event = answer["event"]
        assert event["correlation_id"] == "deploy-1" and event["tenant"] == "acme"
        assert mesh_shape.headers["location"] == f"/events/{answer['event_id']}"

        router = http.post("/events", json=CI_EVENT).json()["event"]
        assert (router["topic"], router["event_type"], router["source"]) == (
            "ci",
            "result",
            "jenkins",
        )
        cloud = {
            "specversion": "1.0",
            "id": "run-991",
            "source": "/ci/jenkins",
            "type": "ci.build.finished",
            "subject": "repo-1",
            "time": "2026-11-22T13:34:56+01:00",
            "datacontenttype": "application/json",
            "data": {"ok": False},
        }
        first = http.post(
            "/events",
            content=orjson.dumps(cloud),
            headers={"content-type": "application/cloudevents+json"},
        )
        assert first.status_code == 201
        ce = first.json()["event"]
        assert ce["event_type"] == "build.finished" and ce["partition_key"] == "repo-1"
        assert ce["timestamp"] == "2026-11-22T12:34:56.000000Z"
        assert ce["idempotency_key"] == "ce:11:/ci/jenkins#run-991"  # source length first
        again = http.post("/events", json=cloud)  # CloudEvents: same source and id, a duplicate
        assert again.status_code == 200
        assert again.json() == {"event_id": ce["event_id"], "seq": ce["seq"], "duplicate": True}

    held = Mesh.open(root)
    assert [e["event_id"] for e in held.events()] == [
        answer["event_id"],
        router["event_id"],
        ce["event_id"],
    ]
    assert held.get(ce["event_id"]) == ce  # what the client got is what the log holds


BAD_BODIES: list[tuple[Any, int, str | None]] = [
    ({"topic": "Bad", "event_type": "x"}, 422, "topic"),
    ({"topic": "ci", "event_type": "x", "payload": [1]}, 422, "payload"),
    ({"topic": "ci", "event_type": "x", "payload": {"api_key": "abc123456"}}, 422, "payload"),
    ({"topic": "ci", "event_type": "x", "colour": "red"}, 422, "colour"),
    ({"type": "nodot", "payload": {}}, 422, "type"),
    ({"type": "ci.result", "timestamp": "yesterday"}, 422, "timestamp"),
    ({"type": "ci.result", "causation": "evt_nope"}, 422, "causation"),
    ({"specversion": "0.3", "id": "1", "source": "s", "type": "a.b"}, 422, "specversion"),
    ({"specversion": "1.0", "id": "1", "source": "s", "type": "a.b", "data": "x"}, 422, "data"),
    (
        {"specversion": "1.0", "id": "1", "source": "s", "type": "a.b", "comexampleext": "t"},
        422,
        "comexampleext",
    ),
    ({"specversion": "1.0", "source": "s", "type": "a.b"}, 422, "id"),
    ([{"topic": "ci", "event_type": "x"}], 422, "body"),
    (b"{not json", 400, "body"),
    (
        b'{"topic": "ci", "event_type": "x", "payload": {"n": 123456789012345678901234}}',
        400,
        "body",
    ),
]


def test_bad_input_is_a_clear_error_and_writes_nothing(root: Path) -> None:
    with serving(root, "--dispatch-every", "0") as server, server.client() as http:
        http.post("/events", json=CI_EVENT).raise_for_status()
        before = snapshot(root)
        for body, status, field in BAD_BODIES:
            content = body if isinstance(body, bytes) else orjson.dumps(body)
            answer = http.post("/events", content=content)
            assert answer.status_code == status, (body, answer.text)
            error = answer.json()["error"]
            assert error["code"] == status and error.get("field") == field, (body, error)
            assert "\n" not in error["message"] and error["message"]
        assert snapshot(root) == before


def test_oversize_bodies_and_events_are_413(root: Path) -> None:
    with (
        serving(root, "--dispatch-every", "0", "--max-body", "100000") as server,
        server.client() as http,
    ):
        before = snapshot(root)
        huge = b'{"topic": "ci", "event_type": "x", "payload": {"b": "' + b"x" * (3 << 20) + b'"}}'
        assert http.post("/events", content=huge).status_code == 413
        # under the body limit, but the sealed event would pass 1 MiB
        big = {"topic": "ci", "event_type": "x", "payload": {"b": "y" * ((1 << 20) - 100)}}
        answer = http.post("/events", json=big)
        assert answer.status_code == 413 and "too large" in answer.json()["error"]["message"]
        batch = [{"topic": "ci", "event_type": "x", "payload": {"i": "z" * 1000}}] * 200
        assert http.post("/events/batch", json=batch).status_code == 413
        assert snapshot(root) == before


def test_the_token_is_checked_before_the_body_is_read(root: Path) -> None:
    with serving(root, "--dispatch-every", "0") as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            # headers announcing 50 MB that never come: the answer must not wait for them
            sock.sendall(
                b"POST /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token-xxxx\r\n"
                b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
            )
            started = time.monotonic()
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 401")
            assert b"www-authenticate: Bearer" in reply.lower().replace(b"bearer", b"Bearer")
            assert time.monotonic() - started < 5
        with server.client(token=None) as anonymous:
            assert anonymous.post("/events", json=CI_EVENT).status_code == 401
            assert anonymous.get("/events").status_code == 401  # reads need it too
            assert anonymous.get("/healthz").status_code == 200
        with server.client(token="not-the-right-token") as wrong:
            assert wrong.post("/events", json=CI_EVENT).status_code == 401
        with server.client() as http:
            refused = http.get("/events", params={"access_token": server.token})
            assert refused.status_code == 400 and "query string" in refused.text
            assert http.post("/events", json=CI_EVENT).status_code == 201
    assert len(log_lines(root)) == 1


def test_without_a_token_writes_are_refused_and_only_loopback_is_served(root: Path) -> None:
    with serving(root, "--dispatch-every", "0", token=False) as server, server.client() as http:
        refused = http.post("/events", json=CI_EVENT)
        assert refused.status_code == 403 and "no token" in refused.json()["error"]["message"]
        assert http.get("/events").json() == {"events": [], "next": None}
        assert http.get("/readiness").json()["writes"].startswith("refused")
    from conftest import run_process

    result = run_process("--root", str(root), "mesh-serve", "--host", "0.0.0.0", "--port", "0")
    assert result.code == 2 and "without a token" in result.err
    assert log_lines(root) == []


def test_rate_limit_answers_429_with_retry_after(root: Path) -> None:
    with (
        serving(root, "--dispatch-every", "0", "--rate-limit", "0.5", "--burst", "3") as server,
        server.client() as http,
    ):
        codes = [http.get("/events").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        limited = http.get("/events")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        for probe in ("/healthz", "/readiness", "/metrics"):  # probes are never limited
            assert http.get(probe).status_code == 200
        time.sleep(2.1)  # a token every 2 s
        assert http.get("/events").status_code == 200  # the bucket refills
        assert "orxaq_http_rate_limited_total 3.0" in http.get("/metrics").text


def test_batches_are_all_or_nothing(root: Path) -> None:
    with serving(root, "--dispatch-every", "0") as server, server.client() as http:
        good = [{"topic": "jobs", "event_type": "run", "payload": {"n": i}} for i in range(3)]
        before = snapshot(root)
        bad = http.post("/events/batch", json=[*good, {"topic": "jobs", "event_type": "Run!"}])
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "[3].event_type"
        assert snapshot(root) == before
        keyed = [*good, {**good[0], "idempotency_key": "k1"}, {**good[1], "idempotency_key": "k1"}]
        answer = http.post("/events/batch", json={"events": keyed})
        assert answer.status_code == 201
        data = answer.json()
        assert (data["published"], data["duplicates"]) == (4, 1)
        assert [r["seq"] for r in data["results"]] == [1, 2, 3, 4, 4]
        repeat = http.post("/events/batch", json=[{**good[2], "idempotency_key": "k1"}])
        assert repeat.status_code == 200 and repeat.json()["results"][0]["seq"] == 4
    assert [e["seq"] for e in log_lines(root)] == [1, 2, 3, 4]


def test_cursor_paging_and_lookup_by_prefix(root: Path) -> None:
    with serving(root, "--dispatch-every", "0") as server, server.client() as http:
        batch = [
            {"topic": "ci" if i % 3 else "ops", "event_type": "tick", "payload": {"i": i}}
            for i in range(25)
        ]
        http.post("/events/batch", json=batch).raise_for_status()
        seen, after, pages = [], "", 0
        while True:  # a client polls until the cursor stops moving
            page = http.get("/events", params={"after": after, "match": "ci.#", "limit": 4}).json()
            if page["next"] == (after or None):
                assert page["events"] == []
                break
            seen += [e["payload"]["i"] for e in page["events"]]
            after, pages = page["next"], pages + 1
        assert seen == [i for i in range(25) if i % 3] and pages == 5  # the last one is empty
        everything = http.get("/events", params={"limit": 1000}).json()["events"]
        assert len(everything) == 25
        target = everything[7]["event_id"]
        assert http.get(f"/events/{target[:14]}").json() == everything[7]
        resumed = http.get("/events", params={"after": target[:14], "limit": 2}).json()
        assert [e["payload"]["i"] for e in resumed["events"]] == [8, 9]
        assert http.get("/events/evt_0000").status_code == 404
        assert http.get("/events/not-hex").status_code == 400
        assert http.get("/events", params={"limit": 0}).json()["error"]["field"] == "limit"
        assert http.get("/events", params={"match": "a.#.#x"}).json()["error"]["field"] == "match"
        assert http.get("/events", params={"after": "evt_0000"}).status_code == 404
        unknown = http.get("/events", params={"colour": "red"})
        assert unknown.status_code == 400 and unknown.json()["error"]["field"] == "colour"
        missing = http.get("/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
        wrong = http.delete("/events")
        assert wrong.status_code == 405 and wrong.json()["error"]["code"] == 405
        assert "GET" in wrong.headers["allow"]


def test_health_readiness_and_metrics(root: Path) -> None:
    with serving(root) as server, server.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        for i in range(3):
            http.post("/events", json={**CI_EVENT, "payload": {"i": i}}).raise_for_status()
        http.post("/events", json={"topic": "x", "event_type": "y", "idempotency_key": "a"})
        http.post("/events", json={"topic": "x", "event_type": "y", "idempotency_key": "a"})
        http.post("/events", json={"topic": "X"})
        ready = http.get("/readiness")
        assert ready.status_code == 200
        checks = ready.json()["checks"]
        assert set(checks) == {"log", "disk", "committer", "dispatch"}
        assert all(check["ok"] and check["detail"] for check in checks.values())
        assert "4 events" in checks["log"]["detail"]
        text = http.get("/metrics").text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values["orxaq_gateway_events_published_total"] == 4
    assert values["orxaq_gateway_events_duplicate_total"] == 1
    assert values["orxaq_log_events"] == 4
    assert (
        values["orxaq_log_bytes"]
        == (root / "artifacts/autonomy/event_mesh/events.ndjson").stat().st_size
    )
    assert values['orxaq_http_requests_total{code="201",method="POST",route="/events"}'] == 4
    assert values['orxaq_http_requests_total{code="422",method="POST",route="/events"}'] == 1
    assert values['orxaq_http_request_duration_seconds_count{method="POST",route="/events"}'] == 6
    for name in (
        "orxaq_dispatch_events_total",
        "orxaq_dispatch_lag_events",
        "orxaq_import_rejected",
        "orxaq_log_quarantine_incidents_total",
    ):
        assert name in values


def test_load_loses_nothing_and_duplicates_nothing(root: Path) -> None:
    """5,000 requests at concurrency 32; every tenth repeats an idempotency key."""
    with serving(root, "--dispatch-every", "0", "--rate-limit", "0") as server:

        async def run() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=32)
            headers = {"Authorization": f"Bearer {server.token}"}
            async with httpx.AsyncClient(
                base_url=server.url, headers=headers, limits=limits, timeout=60
            ) as http:
                gate = asyncio.Semaphore(32)

                async def one(i: int) -> httpx.Response:
                    body: dict[str, Any] = {
                        "topic": "load",
                        "event_type": "hit",
                        "payload": {"i": i},
                    }
                    if i % 10 == 9:  # a retry of request i - 1, as a client would send it
                        body = {
                            "topic": "load",
                            "event_type": "hit",
                            "payload": {"i": i - 1},
                            "idempotency_key": f"k{i - 1}",
                        }
                    elif i % 10 == 8:
                        body["idempotency_key"] = f"k{i}"
                    async with gate:
                        return await http.post("/events", json=body)

                return await asyncio.gather(*(one(i) for i in range(5000)))

        answers = asyncio.run(run())
    codes = Counter(a.status_code for a in answers)
    assert codes == {201: 4500, 200: 500}, codes
    created = [a.json()["event_id"] for a in answers if a.status_code == 201]
    logged = [e["event_id"] for e in log_lines(root)]
    assert sorted(logged) == sorted(created) and len(set(logged)) == 4500
    assert [e["seq"] for e in log_lines(root)] == list(range(1, 4501))
    for i in range(8, 5000, 10):  # each repeat was answered with the first event
        assert answers[i + 1].json()["event_id"] == answers[i].json()["event_id"]


def test_sigkill_mid_load_keeps_every_acknowledged_event(root: Path) -> None:
    """Kill the gateway (and so its writer) while 32 clients write; every 201 is in the
    log once, the log is whole, and retrying the rest with their keys completes the set."""
    bodies = [
        {"topic": "load", "event_type": "hit", "payload": {"i": i}, "idempotency_key": f"r{i}"}
        for i in range(3000)
    ]
    acknowledged: dict[int, str] = {}
    with serving(root, "--dispatch-every", "0", "--rate-limit", "0") as server:

        async def run() -> None:
            headers = {"Authorization": f"Bearer {server.token}"}
            async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as http:
                gate = asyncio.Semaphore(32)

                async def one(i: int) -> None:
                    async with gate:
                        try:
                            answer = await http.post("/events", json=bodies[i])
                        except httpx.HTTPError:
                            return
                    if answer.status_code == 201:
                        acknowledged[i] = answer.json()["event_id"]

                async def killer() -> None:
                    deadline = time.monotonic() + 120  # fail below, never hang the suite
                    while len(acknowledged) < 800 and time.monotonic() < deadline:
                        await asyncio.sleep(0.005)
                    server.proc.send_signal(signal.SIGKILL)

                await asyncio.gather(killer(), *(one(i) for i in range(len(bodies))))

        asyncio.run(run())
        assert server.proc.wait(10) == -signal.SIGKILL
    assert 800 <= len(acknowledged) < len(bodies)
    time.sleep(0.5)  # the orphaned writer finishes the group it had read, then sees EOF
    logged = {e["event_id"] for e in log_lines(root)}
    assert set(acknowledged.values()) <= logged

    with (
        serving(root, "--dispatch-every", "0", "--rate-limit", "0") as server,
        server.client() as http,
    ):
        answers = [http.post("/events", json=body) for body in bodies]
    assert {a.status_code for a in answers} <= {200, 201}
    for i, event_id in acknowledged.items():
        assert answers[i].status_code == 200 and answers[i].json()["event_id"] == event_id
    ids = [e["event_id"] for e in log_lines(root)]
    assert len(ids) == len(set(ids)) == len(bodies)
    assert sorted(e["payload"]["i"] for e in log_lines(root)) == list(range(len(bodies)))
    assert Mesh.open(root).status()["quarantined"]["incidents"] == 0


def test_review_findings_give_clean_answers(root: Path) -> None:
    """Inputs that once gave 500, leaked queue capacity or collided (review of issue 6)."""
    with serving(root, "--dispatch-every", "0") as server, server.client() as http:
        before = snapshot(root)
        surrogate = (
            b'{"topic": "ci", "event_type": "x", '
            b'"payload": {"n": 12345678901234567890, "s": "\\ud800"}}'
        )
        deep = b"[" * 100_000 + b"12345678901234567890" + b"]" * 100_000
        for body in (surrogate, deep):
            for _ in range(3):
                answer = http.post("/events", content=body)
                assert answer.status_code == 400 and answer.json()["error"]["field"] == "body"
        assert "0 events waiting" in http.get("/readiness").json()["checks"]["committer"]["detail"]
        assert http.get("/events", params={"limit": "\u00b2"}).status_code == 400
        assert snapshot(root) == before

        # the CloudEvents key cannot be forged by a '#' in source or id
        one = {"specversion": "1.0", "source": "/a#b", "id": "c", "type": "ci.x"}
        two = {"specversion": "1.0", "source": "/a", "id": "b#c", "type": "ci.x"}
        assert http.post("/events", json=one).status_code == 201
        assert http.post("/events", json=two).status_code == 201
        traced = {**one, "id": "d", "dataschema": "https://x/s.json", "traceparent": "00-ab-cd-01"}
        assert http.post("/events", json=traced).status_code == 201

        with server.client(token=None) as anonymous:  # probes that tell about the node
            assert anonymous.get("/metrics").status_code == 401
            assert anonymous.get("/readiness").status_code == 401
            assert anonymous.get("/healthz").status_code == 200


def test_a_tokenless_server_refuses_foreign_host_names(root: Path) -> None:
    with serving(root, "--dispatch-every", "0", token=False) as server, server.client() as http:
        assert http.get("/events").status_code == 200
        assert http.get("/events", headers={"Host": "localhost"}).status_code == 200
        rebound = http.get("/events", headers={"Host": "attacker.example:8787"})
        assert rebound.status_code == 403 and "Host" in rebound.json()["error"]["message"]


def test_the_gateway_exits_1_when_its_writer_dies(root: Path) -> None:
    """A gateway that cannot write must not linger answering 503: it stops, exit 1, for
    its supervisor to restart it."""
    with serving(root, "--dispatch-every", "0") as server, server.client() as http:
        http.post("/events", json=CI_EVENT).raise_for_status()
        writers = child_pids(server.proc.pid, "orxaq_autonomy.gateway.writer")
        assert len(writers) == 1
        os.kill(writers[0], signal.SIGKILL)
        assert server.proc.wait(30) == 1
        assert server.proc.stderr is not None
        err = server.proc.stderr.read().decode()
        assert "stopped serving: the writer process exited" in err
        assert "Traceback" not in err
    assert len(log_lines(root)) == 1


def test_mesh_serve_refuses_bad_setups_before_listening(root: Path, tmp_path: Path) -> None:
    from conftest import run_process

    loose = tmp_path / "loose-token"
    loose.write_text("a-long-enough-token-value\n")
    os.chmod(loose, 0o644)
    short = tmp_path / "short-token"
    short.write_text("short\n")
    os.chmod(short, 0o600)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = [
            (["--token-file", str(loose)], "chmod 600"),
            (["--token-file", str(short)], "16+ characters"),
            (["--token-file", str(tmp_path / "missing")], "cannot read --token-file"),
            (["--port", port], "cannot listen"),
            (["--port", "70000"], "bad --port"),
            (["--rate-limit", "-1"], "--rate-limit"),
            (["--host", "no-such-host.invalid"], "bad --host"),
        ]
        for args, problem in cases:
            result = run_process("--root", str(root), "mesh-serve", "--json", *args, timeout=30)
            assert result.code == 2, (args, result.err)
            assert problem in result.err and result.err.count("\n") == 1, (args, result.err)
            assert result.json()["error"]["code"] == 2
    (root / "state/event_mesh/config.toml").write_text('[[forward]]\nname = "x"\nurl = "nope"\n')
    result = run_process("--root", str(root), "mesh-serve", "--port", "0")
    assert result.code == 2 and "forward.0.url" in result.err
    result = run_process("--root", str(tmp_path / "not-a-node"), "mesh-serve", "--port", "0")
    assert result.code == 2 and "mesh-init" in result.err
    assert log_lines(root) == []
