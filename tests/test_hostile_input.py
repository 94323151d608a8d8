"""Hostile input, tried for real: anyone who can publish (the CLI, a gateway token holder,
a handler) tries to take over the reserved `mesh` topic (a forged key rotation would make
every reader switch to the attacker's key) or to slip a credential into an event through
a string that is not a payload value. Every attempt is refused and writes nothing."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Runner, log_lines, run_process, snapshot
from gitfleet import add_node, event_ids, git, make_remote
from orxaq_autonomy import Mesh
from orxaq_autonomy.dispatch.dispatcher import Dispatcher
from orxaq_autonomy.envelope import Draft, InvalidEnvelope, check_envelope, compute_event_id, seal
from orxaq_autonomy.errors import BadInput
from orxaq_autonomy.store.keys import Signer, b64url, signature_ok
from serving import serving

LEDGER = "state/github_coordination/event_mesh"
LOG = "artifacts/autonomy/event_mesh/events.ndjson"
RESERVED = "topic 'mesh' is reserved for the mesh's own events"

A36 = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"
GITHUB = "ghp_" + A36
# Credentials that also fit the narrow formats (node ids, topics, event types).
SLACK = "xoxb-123456789012-abcdefghijkl"
GITLAB = "glpat-xy3za5bc7de9fg1hj3kl"
CREDENTIALS = [
    GITHUB,
    SLACK,
    GITLAB,
    "AKIAIOSFODNN7EXAMPLE",
    "github_pat_11ABCDEFG0" + "aB3dE5fG7h" * 7,
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "AIzaSyA-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1x",
    "sk-proj-aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9",
    "npm_" + A36,
    "SG.aB3dE5fG7hJ9kL1mN3pQ5r.aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5bC7dE9",
    "-----BEGIN OPENSSH PRIVATE KEY-----",
    "PuTTY-User-Key-File-3: ssh-ed25519",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9Pl",
    "postgres://admin:hunter22@db.internal:5432/app",
    "Bearer aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1",
]
NARROW_CREDENTIALS = [SLACK, GITLAB, "sk-" + "a1b2c3d4" * 5]  # [a-z0-9.-] only


def log_bytes(root: Path) -> bytes:
    path = root / LOG
    return path.read_bytes() if path.exists() else b""


def attacker_key(tmp_path: Path) -> str:
    key = tmp_path / "attacker.key"
    key.write_text("ed25519:" + b64url(os.urandom(32)))
    return Signer(key).public_key


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- the reserved topic --------------------------------------------------------------------


def test_cli_cannot_publish_a_key_rotation(root: Path, tmp_path: Path, cli: Runner) -> None:
    cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "x")
    before, files = log_bytes(root), snapshot(root)
    forged = {"public_key": attacker_key(tmp_path), "previous_key": "whatever"}
    result = run_process(
        "--root",
        str(root),
        "mesh-publish",
        "--topic",
        "mesh",
        "--event-type",
        "trust.key_rotated",
        "--payload-json",
        orjson.dumps(forged).decode(),
    )
    assert result.code == 2
    assert RESERVED in one_line(result.err)
    assert log_bytes(root) == before and snapshot(root) == files
    # the node still signs with its own key
    assert cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "y").code == 0
    with Mesh.open(root) as mesh:
        key = mesh.manifests()["node-a"]["public_key"]
        assert all(signature_ok(e, key) for e in mesh.log.iter_events())
        assert not mesh.events(match="mesh.#")


def test_a_batch_with_one_mesh_line_appends_nothing(root: Path, cli: Runner) -> None:
    before, files = log_bytes(root), snapshot(root)
    lines = [
        {"topic": "ci", "event_type": "a"},
        {"topic": "mesh", "event_type": "trust.key_rotated", "payload": {"public_key": "x"}},
        {"topic": "ci", "event_type": "b"},
    ]
    stdin = "".join(orjson.dumps(line).decode() + "\n" for line in lines)
    result = cli("--root", str(root), "mesh-publish", "--stdin", stdin=stdin)
    assert result.code == 2
    assert "item 2: " + RESERVED in one_line(result.err)
    assert log_bytes(root) == before and snapshot(root) == files
    # a line cannot grant itself the system flag either
    sneaky = '{"topic": "mesh", "event_type": "x", "system": true}\n'
    result = cli("--root", str(root), "mesh-publish", "--stdin", stdin=sneaky)
    assert result.code == 2 and "unknown field 'system'" in one_line(result.err)
    assert log_bytes(root) == before


def test_the_library_refuses_it_unless_the_mesh_itself_publishes(root: Path) -> None:
    with Mesh.open(root) as mesh:
        with pytest.raises(BadInput, match=RESERVED):
            mesh.publish("mesh", "schema.changed", {})
        with pytest.raises(BadInput, match="item 1: " + RESERVED):
            mesh.publish_many([{"topic": "mesh", "event_type": "x"}])
        with pytest.raises(BadInput, match=RESERVED):
            mesh.publish_drafts([Draft.create("mesh", "x")])
        assert log_lines(root) == []
        rotated = mesh.rotate_key()  # the product's own emitter still works
        (event,) = mesh.events(match="mesh.trust.key_rotated")
        assert event["payload"]["public_key"] == rotated["public_key"]


def _post_mesh_bodies() -> list[tuple[str, Any, str]]:
    ce = {"specversion": "1.0", "id": "1", "source": "/x", "type": "mesh.trust.key_rotated"}
    return [
        ("/events", {"topic": "mesh", "event_type": "trust.key_rotated"}, "topic"),
        ("/events", {"type": "mesh.trust.key_rotated", "source": "jenkins"}, "type"),
        ("/events", {**ce, "data": {"public_key": "x"}}, "type"),
        (
            "/events/batch",
            [{"topic": "ci", "event_type": "a"}, {"topic": "mesh", "event_type": "x"}],
            "[1].topic",
        ),
    ]


def _post_credential_bodies() -> list[tuple[str, Any, str]]:
    ce = {"specversion": "1.0", "id": "run-1", "source": "/ci", "type": "ci.done"}
    return [
        ("/events", {**ce, "subject": GITHUB}, "subject"),
        ("/events", {**ce, "id": GITHUB}, "id"),
        ("/events", {**ce, "source": "/ci/" + GITHUB}, "source"),
        ("/events", {"type": "ci.result", "source": GITHUB}, "source"),
        ("/events", {"topic": "ci", "event_type": "x", "tenant": GITHUB}, "tenant"),
        ("/events", {"topic": "ci", "event_type": "x", "correlation": GITHUB}, "correlation"),
        ("/events", {"topic": "ci", "event_type": "x", "target": SLACK}, "target"),
        ("/events", {"topic": "ci", "event_type": "x", "payload": {GITHUB: 1}}, "payload"),
        ("/events", {"topic": SLACK, "event_type": "x"}, "topic"),
    ]


def test_http_cannot_publish_the_reserved_topic_or_a_credential(root: Path) -> None:
    with serving(root, "--dispatch-every", "0") as server, server.client() as http:
        http.post("/events", json={"topic": "ci", "event_type": "x"}).raise_for_status()
        before, files = log_bytes(root), snapshot(root)
        for path, body, field in _post_mesh_bodies() + _post_credential_bodies():
            answer = http.post(path, json=body)
            assert answer.status_code == 422, (body, answer.text)
            error = answer.json()["error"]
            assert error["field"] == field, (body, error)
            assert "\n" not in error["message"]
            if field.endswith(("topic", "type")) and "mesh" in str(body):
                assert RESERVED in error["message"]
            else:
                assert "credential" in error["message"]
            assert GITHUB not in answer.text and SLACK not in answer.text
        assert log_bytes(root) == before and snapshot(root) == files


# --- handler follow-ups ----------------------------------------------------------------------

HOSTILE_HANDLERS = textwrap.dedent(
    f"""
    from orxaq_autonomy.handlers import FollowUp, handler

    @handler("attack.rotate")
    def rotate(event, ctx):
        key = event["payload"]["key"]
        return FollowUp("mesh", "trust.key_rotated", {{"public_key": key, "previous_key": "x"}})

    @handler("attack.leak")
    def leak(event, ctx):
        kind = event["payload"]["kind"]
        if kind == "payload_key":
            return FollowUp("results", "x", {{"nested": {{{GITHUB!r}: 1}}}})
        if kind == "target":
            return FollowUp("results", "x", {{}}, target={SLACK!r})
        if kind == "key":
            return FollowUp("results", "x", {{}}, key={GITHUB!r})
        if kind == "topic":
            return FollowUp({SLACK!r}, "x", {{}})
        return FollowUp("results", {GITLAB!r}, {{}})

    @handler("attack.fine")
    def fine(event, ctx):
        return FollowUp("results", "fine", {{}})
    """
)


def test_handler_follow_ups_on_mesh_or_with_credentials_are_dead_lettered(
    root: Path, tmp_path: Path, cli: Runner
) -> None:
    (root / "hostile.py").write_text(HOSTILE_HANDLERS)
    (root / "state/event_mesh/config.toml").write_text('handlers = ["hostile.py"]\n')
    with Mesh.open(root) as mesh:
        mesh.publish("attack", "rotate", {"key": attacker_key(tmp_path)})
        for kind in ("payload_key", "target", "key", "topic", "event_type"):
            mesh.publish("attack", "leak", {"kind": kind})
        mesh.publish("attack", "fine", {})
    result = cli("--root", str(root), "mesh-dispatch", "--json")
    assert result.code == 0, result.err
    assert result.json()["dead_lettered"] == 6
    with Mesh.open(root) as mesh:
        dead = Dispatcher(mesh).dead_letters()
        errors = sorted(d["error"] for d in dead)
        assert sum(RESERVED in e for e in errors) == 1
        assert sum("credential" in e for e in errors) == 5
        assert not mesh.events(match="mesh.trust.#")
        notices = mesh.events(match="mesh.dispatch.dead_lettered")
        assert len(notices) == 6  # the dispatcher's own mesh events still go in
        assert len(mesh.events(match="results.fine")) == 1
        key = mesh.manifests()["node-a"]["public_key"]
        assert all(signature_ok(e, key) for e in mesh.log.iter_events())
    raw = log_bytes(root)
    assert GITHUB.encode() not in raw and SLACK.encode() not in raw
    assert GITLAB.encode() not in raw


# --- credentials in every string, at publish ---------------------------------------------------

FIELD_ATTACKS = [
    ("--source", "deploy " + GITHUB),
    ("--correlation-id", GITHUB),
    ("--partition-key", "AKIAIOSFODNN7EXAMPLE"),
    ("--tenant", "postgres://admin:hunter22@db/app"),
    ("--idempotency-key", GITHUB),
    ("--target", SLACK),
    ("--causation-id", GITHUB),
    ("--topic", SLACK),
    ("--event-type", "build." + GITLAB),
]


@pytest.mark.parametrize(("option", "value"), FIELD_ATTACKS, ids=[a[0] for a in FIELD_ATTACKS])
def test_a_credential_in_any_envelope_field_is_refused(
    root: Path, cli: Runner, option: str, value: str
) -> None:
    cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "x")
    before, files = log_bytes(root), snapshot(root)
    args = {"--topic": "ci", "--event-type": "x", option: value}
    flat = [item for pair in args.items() for item in pair]
    result = cli("--root", str(root), "mesh-publish", *flat)
    assert result.code == 2
    line = one_line(result.err)
    assert "credential" in line and value not in line
    assert log_bytes(root) == before and snapshot(root) == files


@pytest.mark.parametrize(
    "payload",
    [{GITHUB: "x"}, {"deep": [{"deeper": {"Bearer aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1": True}}]}],
    ids=["top", "nested"],
)
def test_a_credential_as_a_payload_key_is_refused(
    root: Path, cli: Runner, payload: dict[str, Any]
) -> None:
    before = log_bytes(root)
    raw = orjson.dumps(payload).decode()
    single = cli(
        "--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "x",
        "--payload-json", raw,
    )  # fmt: skip
    assert single.code == 2 and "a key in payload" in one_line(single.err)
    assert GITHUB not in single.err
    line = orjson.dumps({"topic": "ci", "event_type": "x", "payload": payload}).decode()
    batch = cli("--root", str(root), "mesh-publish", "--stdin", stdin=line + "\n")
    assert batch.code == 2 and "item 1: refused payload" in one_line(batch.err)
    assert log_bytes(root) == before


embedded = st.builds(
    lambda before, cred, after: f"{before} {cred} {after}".strip(),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
    st.sampled_from(CREDENTIALS),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
)
TEXT_FIELDS = ["source", "correlation_id", "partition_key", "tenant", "idempotency_key"]


@settings(max_examples=300, deadline=None)
@given(
    value=embedded,
    where=st.sampled_from([*TEXT_FIELDS, "payload_key", "payload_value", "deep_key"]),
)
def test_any_credential_in_any_string_of_a_draft_is_refused(value: str, where: str) -> None:
    fields: dict[str, Any] = {}
    payload: dict[str, Any] = {"ok": 1}
    if where in TEXT_FIELDS:
        fields[where] = value
    elif where == "payload_key":
        payload[value] = 1
    elif where == "payload_value":
        payload["note"] = [value]
    else:
        payload["a"] = {"b": [{value: None}]}
    with pytest.raises(BadInput) as caught:
        Draft.create("ci", "x", payload, **fields)
    assert "credential" in caught.value.message
    assert value not in caught.value.message


def _sealed(**changes: Any) -> dict[str, Any]:
    draft = Draft.create("ci", "x", {"ok": 1}, source="cli")
    env, _ = seal(
        draft, node_id="node-a", seq=1, prev=None, clock=1, timestamp="2026-01-01T00:00:00.000000Z"
    )
    out = {**env, **changes}
    out["event_id"] = compute_event_id(out)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    where=st.sampled_from(
        [*TEXT_FIELDS, "payload_key", "node_id", "topic", "event_type", "target"]
    ),
)
def test_any_credential_in_any_string_of_an_envelope_fails_the_shared_check(
    data: st.DataObject, where: str
) -> None:
    """The check import and mesh-verify use: a correctly hashed envelope carrying a
    credential anywhere is invalid, whatever field holds it."""
    if where in TEXT_FIELDS:
        changes: dict[str, Any] = {where: data.draw(embedded)}
    elif where == "payload_key":
        changes = {"payload": {"x": {data.draw(embedded): "v"}}}
    else:
        cred = data.draw(st.sampled_from(NARROW_CREDENTIALS))
        changes = {where: cred if where != "event_type" else "run." + cred}
    env = _sealed(**changes)
    with pytest.raises(InvalidEnvelope) as caught:
        check_envelope(env)
    assert "credential" in caught.value.message
    check_envelope(_sealed())  # the same envelope without it is fine


# --- credentials at import ---------------------------------------------------------------------


def test_import_and_verify_refuse_a_signed_event_with_a_credential_in_source(
    tmp_path: Path, cli: Runner
) -> None:
    remote = make_remote(tmp_path)
    a, b = add_node(tmp_path, remote, "node-a"), add_node(tmp_path, remote, "node-b")
    with Mesh.open(a) as mesh:
        mesh.rotate_key()  # seq 1: a `mesh` event, which import must still take
        mesh.publish_many([{"topic": "ci", "event_type": "x", "payload": {"i": i}} for i in (2, 3)])
        signer = mesh.current_signer()
    assert run_process("--root", str(a), "mesh-sync", "--json").code == 0
    git(b, "pull", "-q", "--rebase", "origin", "main")
    files = sorted(
        (b / LEDGER / "outbox" / "node-a").rglob("*.json"),
        key=lambda p: orjson.loads(p.read_bytes())["seq"],
    )
    last = orjson.loads(files[-1].read_bytes())
    # node-a's own, current key signs seq 3 with a token in `source`: only the content
    # check stands between it and every node's log (and the public ledger)
    forged = {k: v for k, v in last.items() if k != "sig"}
    forged["source"] = "ci " + GITHUB
    forged["event_id"] = compute_event_id(forged)
    forged["sig"] = signer(forged["event_id"])
    files[-1].unlink()
    (files[-1].parent / f"{forged['event_id']}.json").write_bytes(orjson.dumps(forged))

    result = cli("--root", str(b), "mesh-import", "--json")
    assert result.code == 3
    data = result.json()
    assert data["imported"] == 2
    (rejected,) = data["rejected"]
    assert "credential" in rejected["reason"] and GITHUB not in rejected["reason"]
    ids = event_ids(b)
    assert forged["event_id"] not in ids
    with Mesh.open(b) as mesh:
        assert len(mesh.events(match="mesh.trust.key_rotated", node="node-a")) == 1
    assert GITHUB.encode() not in log_bytes(b)

    verify = cli("--root", str(b), "mesh-verify", "--json")
    assert verify.code == 3
    assert any("credential" in p["reason"] for p in verify.json()["problems"])
