"""Webhook forwarding through the dispatcher, against a real receiver on 127.0.0.1 that
fails, hangs and recovers; and through mesh-serve's background dispatcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from conftest import ENV_VARS, Runner, run_process
from orxaq_autonomy import Mesh
from orxaq_autonomy.dispatch.dispatcher import Dispatcher
from serving import Receiver, receiving, serving


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def configure(
    root: Path, receiver: Receiver, extra: str = "", dispatch: str = "", timeout: float = 0.5
) -> None:
    (root / "state/event_mesh/config.toml").write_text(
        "[dispatch]\nbackoff_seconds = 10\nbreaker_failures = 50\n"
        f"{dispatch}\n"
        f'[[forward]]\nname = "hook"\nurl = "{receiver.url}"\nmatch = "ci.#"\n'
        f'timeout = {timeout}\nheaders = {{ X-Team = "infra" }}\n{extra}\n'
    )


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    Mesh.init(tmp_path / "node", node_id="node-a")
    return Mesh.open(tmp_path / "node")


def test_failed_deliveries_wait_durably_and_arrive_once_the_receiver_recovers(
    mesh: Mesh, cli: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = mesh.layout.root
    monkeypatch.setenv("HOOK_AUTH", "Bearer hook-secret")
    with receiving("fail") as receiver:
        configure(root, receiver, 'headers_env = { Authorization = "HOOK_AUTH" }')
        sent = [mesh.publish("ci", "build.done", {"n": i}).event_id for i in range(3)]
        mesh.publish("ops", "other", {})  # does not match ci.#
        clock = Clock()
        report = Dispatcher(mesh, clock=clock).run()
        assert (report.failed, report.pending) == (3, 3)
        status = cli("--root", str(root), "mesh-status", "--json").json()["dispatch"]
        assert status["pending_by_handler"] == {"forward:hook": 3}

        receiver.mode = "hang"  # now it times out
        receiver.hang_seconds = 1.5
        clock.now += 10
        report = Dispatcher(mesh, clock=clock).run()
        assert report.failed == 3 and report.pending == 3
        state = orjson.loads((root / "state/event_mesh/dispatch_cursor.json").read_bytes())
        assert all(
            p["attempts"] == 2 and "no answer within 0.5s" in p["error"] for p in state["pending"]
        )
        assert Dispatcher(mesh, clock=clock).run().failed == 0  # not due yet

        receiver.mode = "ok"
        clock.now += 20
        report = Dispatcher(mesh, clock=clock).run()
        assert (report.failed, report.pending, report.handled) == (0, 0, 3)
        assert Dispatcher(mesh, clock=clock).run().handled == 0  # delivered once
    assert receiver.ids() == sent  # in order, each once, nothing else
    first = receiver.received[0]
    assert first["headers"]["idempotency-key"] == sent[0]
    assert first["headers"]["authorization"] == "Bearer hook-secret"
    assert first["headers"]["x-team"] == "infra"
    assert first["headers"]["x-orxaq-routing-key"] == "ci.build.done"
    assert first["body"] == mesh.get(sent[0])
    status = cli("--root", str(root), "mesh-status", "--json").json()
    assert status["dispatch"]["stats"]["forward:hook"] == {"failed": 6, "ok": 3}
    assert status["forwarding"] == {
        "hook": {"delivered": 3, "failed_attempts": 6, "pending": 0, "dead_letters": 0}
    }
    human = cli("--root", str(root), "mesh-status").out
    assert "forward     hook: 3 delivered, 0 pending, 6 failed attempts, 0 dead letters" in human


def test_spent_attempts_are_dead_lettered_and_can_be_retried(mesh: Mesh, cli: Runner) -> None:
    root = mesh.layout.root
    with receiving("fail") as receiver:
        configure(root, receiver, "attempts = 2")
        sent = mesh.publish("ci", "build.done", {"n": 1}).event_id
        clock = Clock()
        Dispatcher(mesh, clock=clock).run()
        clock.now += 10
        assert Dispatcher(mesh, clock=clock).run().dead_lettered == 1
        listed = cli("--root", str(root), "mesh-dlq", "list", "--json").json()["dead_letters"]
        assert [(d["handler"], d["attempts"]) for d in listed] == [("forward:hook", 2)]
        assert "answered 500" in listed[0]["error"]
        notice = mesh.events(match="mesh.dispatch.dead_lettered")
        assert [e["payload"]["handler"] for e in notice] == ["forward:hook"]

        receiver.mode = "ok"
        assert cli("--root", str(root), "mesh-dlq", "retry", sent[:12]).code == 0
        assert Dispatcher(mesh, clock=clock).run().handled >= 1
    assert receiver.ids() == [sent]
    assert cli("--root", str(root), "mesh-dlq", "stats", "--json").json()["count"] == 0


def test_a_receiver_that_refuses_the_event_dead_letters_it_at_once(mesh: Mesh) -> None:
    with receiving("reject") as receiver:
        configure(mesh.layout.root, receiver)
        mesh.publish("ci", "build.done", {"n": 1})
        report = Dispatcher(mesh).run()
    assert (report.dead_lettered, report.pending) == (1, 0)
    assert receiver.attempts == 1


def test_critical_consumers_keep_partition_order_best_effort_ones_do_not(mesh: Mesh) -> None:
    root = mesh.layout.root
    with receiving("fail") as receiver:
        (root / "state/event_mesh/config.toml").write_text(
            "[dispatch]\nbackoff_seconds = 10\nbreaker_failures = 50\n"
            f'[[forward]]\nname = "strict"\nurl = "{receiver.url}?c=strict"\nmatch = "ci.#"\n'
            f'[[forward]]\nname = "loose"\nurl = "{receiver.url}?c=loose"\nmatch = "ci.#"\n'
            "critical = false\n"
        )
        mesh.publish("ci", "step", {"n": 1}, partition_key="repo-1")
        clock = Clock()
        Dispatcher(mesh, clock=clock).run()  # both fail on event 1
        receiver.mode = "ok"
        mesh.publish("ci", "step", {"n": 2}, partition_key="repo-1")
        Dispatcher(mesh, clock=clock).run()  # event 1 not due again yet
        clock.now += 10
        Dispatcher(mesh, clock=clock).run()

    def order(consumer: str) -> list[int]:
        return [d["body"]["payload"]["n"] for d in receiver.received if consumer in d["path"]]

    assert order("strict") == [1, 2]  # event 2 waited behind the failing event 1
    assert order("loose") == [2, 1]  # best effort: event 2 went ahead


def test_a_dispatcher_killed_mid_delivery_loses_nothing(mesh: Mesh) -> None:
    """SIGKILL mesh-dispatch while the receiver holds a delivery; the next run delivers
    every event (at least once: the receiver deduplicates by event id)."""
    root = mesh.layout.root
    sent = [mesh.publish("ci", "build.done", {"n": i}).event_id for i in range(20)]
    with receiving("ok") as receiver:
        configure(root, receiver, timeout=30)
        receiver.mode = "hang"
        receiver.hang_seconds = 3
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        proc = subprocess.Popen(
            [sys.executable, "-m", "orxaq_autonomy", "--root", str(root), "mesh-dispatch"],
            env=env,
        )
        deadline = time.monotonic() + 20
        while receiver.attempts == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert receiver.attempts == 1, "the dispatcher never reached the receiver"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        receiver.mode = "ok"
        result = run_process("--root", str(root), "mesh-dispatch", "--json")
        assert result.code == 0, result.err
    assert set(receiver.ids()) == set(sent)
    assert len(receiver.ids()) == len(sent)  # the hung one never answered: not counted


def test_mesh_serve_forwards_what_it_accepts(tmp_path: Path) -> None:
    Mesh.init(tmp_path / "node", node_id="node-a")
    root = tmp_path / "node"
    with receiving("ok") as receiver:
        configure(root, receiver, dispatch="")
        with serving(root, "--dispatch-every", "0.2") as server, server.client() as http:
            ids = [
                http.post("/events", json={"type": "ci.build.done", "payload": {"i": i}}).json()[
                    "event_id"
                ]
                for i in range(10)
            ]
            http.post("/events", json={"type": "ops.noise"}).raise_for_status()
            assert sorted(receiver.wait_for(10)) == sorted(ids)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                metrics = http.get("/metrics").text
                if 'orxaq_forward_delivered_total{consumer="hook"} 10.0' in metrics:
                    break
                time.sleep(0.1)
            assert 'orxaq_forward_delivered_total{consumer="hook"} 10.0' in metrics
            assert 'orxaq_forward_pending{consumer="hook"} 0.0' in metrics


def test_a_consumer_that_refuses_everything_does_not_feed_itself(mesh: Mesh) -> None:
    """Review of issue 6: with match "#", the dead-letter notice of a refused delivery
    matched the same consumer, was refused in turn, and so on without end."""
    root = mesh.layout.root
    with receiving("reject") as receiver:
        (root / "state/event_mesh/config.toml").write_text(
            f'[[forward]]\nname = "all"\nurl = "{receiver.url}?token=s3cr3t-in-query"\n'
        )
        sent = mesh.publish("ci", "build.done", {"n": 1}).event_id
        Dispatcher(mesh).run()
        Dispatcher(mesh).run()
    assert receiver.attempts == 2  # the event, then its notice; nothing more
    (notice,) = mesh.events(match="mesh.dispatch.dead_lettered")
    assert notice["causation_id"] == sent
    assert "s3cr3t" not in orjson.dumps(notice).decode()  # the URL's query stays out
    assert mesh.status()["dispatch"]["dead_letters"] == 2
    assert mesh.status()["dispatch"]["lag_events"] == 0


def test_consumer_config_mistakes_are_refused_up_front(mesh: Mesh, cli: Runner) -> None:
    root = mesh.layout.root
    config = root / "state/event_mesh/config.toml"
    for table, problem in (
        ('url = "http://user:pw@example.com/hook"', "credentials in the url"),
        ('url = "http://example.com:99999/hook"', "Port out of range"),
        ('url = "ftp://example.com/hook"', "url"),
        ('url = "http://e.com/h"\nheaders = { Idempotency-Key = "x" }', "set by the forwarder"),
        ('url = "http://e.com/h"\nmatch = "a.#x"', "match"),
    ):
        config.write_text(f'[[forward]]\nname = "hook"\n{table}\n')
        result = cli("--root", str(root), "mesh-dispatch")
        assert result.code == 2 and problem in result.err, (table, result.err)


def test_a_handler_error_that_looks_like_a_secret_is_withheld_from_the_ledger(
    mesh: Mesh,
) -> None:
    root = mesh.layout.root
    (root / "leaky.py").write_text(
        "from orxaq_autonomy.handlers import Reject, handler\n"
        "@handler('ci.#')\n"
        "def leaky(event, ctx):\n"
        "    raise Reject('login failed for AKIAIOSFODNN7EXAMPLE')\n"
    )
    (root / "state/event_mesh/config.toml").write_text('handlers = ["leaky.py"]\n')
    mesh.publish("ci", "build.done", {"n": 1})
    mesh.publish("ops", "later", {})
    report = Dispatcher(mesh).run()
    assert report.dead_lettered == 1 and report.lag_events == 0  # and dispatch went on
    (notice,) = mesh.events(match="mesh.dispatch.dead_lettered")
    assert notice["payload"]["error"] == "Reject (message withheld: see mesh-dlq list)"
    (letter,) = Dispatcher(mesh).dead_letters()
    assert "AKIAIOSFODNN7EXAMPLE" in letter["error"]  # kept in the node-private record


def test_a_long_lived_dispatcher_sees_effects_another_process_began(mesh: Mesh) -> None:
    """Review of issue 6: mesh-serve keeps one Dispatcher; a lane command begun by a cron
    mesh-dispatch that then crashed must not run again from the server's dispatcher."""
    event = mesh.get(mesh.publish("ops", "x", {}).event_id)
    server_side = Dispatcher(mesh)
    cron_side = Dispatcher(mesh)
    assert cron_side.ctx.begin_effect("lane:start:1", event, "lanes") is True
    server_side.run()
    assert server_side.ctx.begin_effect("lane:start:1", event, "lanes") is False
    seen = orjson.loads((mesh.layout.state_dir / "dispatch_seen.json").read_bytes())
    assert "lane:start:1" in seen["in_flight"]
