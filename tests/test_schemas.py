"""Schemas (SPEC 9): the registry in the ledger, validation at every entry, compatibility
versioning, import and mesh-verify. Real CLI processes, real git, a real mesh-serve."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Runner, log_lines, run_process, snapshot
from gitfleet import add_node, git, make_remote
from orxaq_autonomy import Mesh
from orxaq_autonomy.store.compat import MODES, incompatibilities
from serving import serving

LEDGER = "state/github_coordination/event_mesh"
SUBJECT = "orders.order.placed"
V1: dict[str, Any] = {
    "type": "object",
    "properties": {"task_id": {"type": "string"}, "size": {"enum": ["s", "m", "b"]}},
    "required": ["task_id"],
}
V2 = {**V1, "properties": {**V1["properties"], "note": {"type": "string"}}}  # optional added
BREAKING = {
    "type": "object",
    "properties": {
        "task_id": {"type": "integer"},
        "size": {"enum": ["s", "m"]},
        "priority": {"type": "integer"},
    },
    "required": ["task_id", "priority"],
}


def write(root: Path, name: str, schema: Any) -> str:
    path = root / name
    path.write_bytes(orjson.dumps(schema) if not isinstance(schema, bytes) else schema)
    return name


def one_line_error(result: Any) -> str:
    assert result.code == 2, (result.code, result.out, result.err)
    assert result.err.count("\n") == 1 and "Traceback" not in result.err, result.err
    return str(result.err)


def test_walkthrough_add_publish_evolve(root: Path) -> None:
    r = str(root)
    added = run_process("--root", r, "mesh-schema", "add", SUBJECT, write(root, "v1.json", V1))
    assert added.code == 0 and added.out.strip() == f"{SUBJECT} v1", added.err
    ok = run_process(
        "--root", r, "mesh-publish", "--topic", "orders", "--event-type", "order.placed",
        "--payload-json", '{"task_id": "t-1", "size": "m"}', "--json",
    )  # fmt: skip
    assert ok.code == 0, ok.err
    event = ok.json()["event"]
    assert event["schema"] == f"{SUBJECT}/v1" and event["payload"] == {
        "task_id": "t-1",
        "size": "m",
    }

    write(root, "b.json", BREAKING)
    before = snapshot(root)
    bad = run_process(
        "--root", r, "mesh-publish", "--topic", "orders", "--event-type", "order.placed",
        "--payload-json", '{"task_id": 42}',
    )  # fmt: skip
    assert "payload.task_id: 42 is not of type 'string'" in one_line_error(bad)
    batch = b'{"topic":"orders","event_type":"order.placed","payload":{"task_id":"a"}}\n'
    batch += (
        b'{"topic":"orders","event_type":"order.placed","payload":{"task_id":"b","size":"xl"}}\n'
    )
    refused = run_process("--root", r, "mesh-publish", "--stdin", stdin=batch)
    message = one_line_error(refused)
    assert "item 2: payload.size: " in message and "'xl'" in message
    assert snapshot(root) == before  # nothing written

    check = run_process("--root", r, "mesh-schema", "check", SUBJECT, "b.json")
    message = one_line_error(check)
    for words in (
        "new required property 'priority'",
        "'task_id' type changed from string to integer",
        "enum value 'b' of 'size' removed",
        "stored event",
    ):
        assert words in message, message
    assert snapshot(root) == before
    assert run_process("--root", r, "mesh-schema", "add", SUBJECT, "b.json").code == 2
    assert snapshot(root) == before

    fine = run_process("--root", r, "mesh-schema", "check", SUBJECT, write(root, "v2.json", V2))
    assert fine.code == 0 and "it would be v2" in fine.out
    two = run_process("--root", r, "mesh-schema", "add", SUBJECT, "v2.json", "--json")
    assert two.json() == {"subject": SUBJECT, "version": 2}
    folder = root / LEDGER / "schemas" / SUBJECT
    assert sorted(p.name for p in folder.iterdir()) == ["v1.json", "v2.json"]
    shown = run_process("--root", r, "mesh-schema", "show", SUBJECT, "--version", "1", "--json")
    assert shown.json()["schema"] == V1 and shown.json()["version"] == 1
    listed = run_process("--root", r, "mesh-schema", "list", "--json").json()["subjects"]
    mine = next(s for s in listed if s["subject"] == SUBJECT)
    assert mine == {
        "subject": SUBJECT,
        "versions": [1, 2],
        "latest": 2,
        "compatibility": "backward",
        "builtin": False,
    }
    # the built-in chain's subjects come with schemas
    builtin = {s["subject"] for s in listed if s["builtin"]}
    assert {"scheduling.task.enqueued", "routing.route.selected"} <= builtin
    # the registry's own change events, on the reserved topic
    changes = [e for e in log_lines(root) if e["topic"] == "mesh"]
    assert [(e["event_type"], e["payload"]["version"]) for e in changes] == [
        ("schema.added", 1),
        ("schema.added", 2),
    ]
    latest = run_process(
        "--root", r, "mesh-publish", "--topic", "orders", "--event-type", "order.placed",
        "--payload-json", '{"task_id": "t-2", "note": "rush"}', "--json",
    )  # fmt: skip
    assert latest.json()["event"]["schema"] == f"{SUBJECT}/v2"


BAD_SCHEMAS: list[tuple[list[str], bytes | None, str]] = [
    ([SUBJECT], b"{not json", "schema is not valid JSON"),
    ([SUBJECT], b"[1]", "schema must be a JSON object"),
    ([SUBJECT], b'{"type": 5}', "not a valid JSON Schema"),
    ([SUBJECT], b'{"type": "string", "pattern": "("}', "not a valid JSON Schema"),
    ([SUBJECT], b'{"$ref": "https://example.com/s.json"}', "only local references"),
    ([SUBJECT], b'{"properties": {"a": {"$ref": "other.json#/x"}}}', "only local references"),
    (
        [SUBJECT],
        b'{"$schema": "http://json-schema.org/draft-07/schema#"}',
        "need https://json-schema.org/draft/2020-12/schema",
    ),
    (["Orders.x"], b"{}", "bad subject"),
    (["orders"], b"{}", "bad subject"),
    (["mesh.schema.added"], b"{}", "is the mesh's own"),
    ([SUBJECT, "--compatibility", "sideways"], b"{}", "bad compatibility mode"),
    ([SUBJECT, "missing.json"], None, "cannot read schema file"),
    ([SUBJECT, "../missing-outside.json"], None, "cannot read schema file"),
]


def test_bad_schemas_are_refused_with_one_line_and_nothing_written(root: Path, cli: Runner) -> None:
    before = snapshot(root)
    for args, content, words in BAD_SCHEMAS:
        if content is not None:
            write(root, "s.json", content)
            argv = [args[0], "s.json", *args[1:]]
        else:
            argv = args
        for action in ("add", "check"):
            result = cli("--root", str(root), "mesh-schema", action, *argv)
            assert words in one_line_error(result), (args, result.err)
        (root / "s.json").unlink(missing_ok=True)
        assert snapshot(root) == before, args
    usage = [
        (["mesh-schema", "drop"], "bad mesh-schema action"),
        (["mesh-schema", "add", SUBJECT], "usage: mesh-schema add SUBJECT FILE"),
        (["mesh-schema", "show"], "usage: mesh-schema show SUBJECT"),
        (["mesh-schema", "show", SUBJECT], "has no schema"),
        (["mesh-schema", "list", "--version", "2"], "--version is for show"),
    ]
    for argv, words in usage:
        assert words in one_line_error(cli("--root", str(root), *argv)), argv
    assert snapshot(root) == before


def test_events_already_in_the_log_decide_backward_compatibility(root: Path) -> None:
    with Mesh.open(root) as mesh:
        mesh.publish("orders", "order.placed", {"task_id": 7})  # before any schema
        strict = orjson.dumps(V1)
        refused = run_process(
            "--root", str(root), "mesh-schema", "add", SUBJECT, write(root, "a.json", V1)
        )
        assert "stored event" in one_line_error(refused) and "payload.task_id" in refused.err
        # forward and none ask nothing of the stored events; the event keeps no schema
        assert mesh.schema_add(SUBJECT, strict, "forward")["version"] == 1
        assert mesh.schemas.mode(SUBJECT) == "forward"
        assert "schema" not in mesh.events(match=SUBJECT)[0]
        # the mode is kept: v2 is checked forward (old accepts what new accepts)
        narrower: dict[str, Any] = {
            **V1,
            "properties": {**V1["properties"], "size": {"enum": ["s"]}},
        }
        assert mesh.schema_check(SUBJECT, orjson.dumps(narrower))["compatibility"] == "forward"


# --- the compatibility rules, as properties -----------------------------------------------

NAMES = st.text("abcdefgh", min_size=1, max_size=6)
LEAF = st.sampled_from(
    [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"enum": ["a", "b", "c"]},
        {"type": "string", "maxLength": 10},
        {},
    ]
)


@st.composite
def object_schemas(draw: st.DrawFn, depth: int = 0) -> dict[str, Any]:
    props = draw(
        st.dictionaries(
            NAMES, LEAF if depth >= 1 else st.one_of(LEAF, object_schemas(depth + 1)), max_size=5
        )
    )
    schema: dict[str, Any] = {"type": "object", "properties": props}
    required = draw(st.lists(st.sampled_from(sorted(props)), unique=True)) if props else []
    if required:
        schema["required"] = required
    if draw(st.booleans()):
        schema["additionalProperties"] = False
    return schema


@settings(max_examples=200, deadline=None)
@given(object_schemas())
def test_a_schema_is_compatible_with_itself_in_every_mode(schema: dict[str, Any]) -> None:
    for mode in MODES:
        assert incompatibilities(copy.deepcopy(schema), schema, mode) == []


@settings(max_examples=200, deadline=None)
@given(object_schemas(), NAMES, LEAF)
def test_adding_an_optional_property_to_an_open_object_is_backward_compatible(
    old: dict[str, Any], name: str, leaf: dict[str, Any]
) -> None:
    old.pop("additionalProperties", None)
    if name in old["properties"]:
        return
    new = copy.deepcopy(old)
    new["properties"][name] = leaf
    assert incompatibilities(new, old, "backward") == []
    assert incompatibilities(new, old, "forward") == []  # the old, open object accepts it


@settings(max_examples=200, deadline=None)
@given(object_schemas(), NAMES, LEAF)
def test_a_new_required_property_is_never_backward_compatible(
    old: dict[str, Any], name: str, leaf: dict[str, Any]
) -> None:
    if name in old.get("required", []):
        return
    new = copy.deepcopy(old)
    new["properties"][name] = leaf
    new["required"] = [*old.get("required", []), name]
    found = incompatibilities(new, old, "backward")
    assert f"new required property '{name}'" in found
    assert incompatibilities(new, old, "full") != []
    assert incompatibilities(new, old, "none") == []
    # the same change seen from the other side: making it optional again is forward-breaking
    assert any("made optional or removed" in p for p in incompatibilities(old, new, "forward"))


@settings(max_examples=200, deadline=None)
@given(object_schemas())
def test_removing_a_property_or_closing_the_object_breaks_backward(old: dict[str, Any]) -> None:
    if old["properties"]:
        gone = sorted(old["properties"])[0]
        new = copy.deepcopy(old)
        del new["properties"][gone]
        new["required"] = [n for n in new.get("required", []) if n != gone]
        assert f"property '{gone}' removed" in incompatibilities(new, old, "backward")
    if old.get("additionalProperties") is not False:
        closed = {**copy.deepcopy(old), "additionalProperties": False}
        assert any("closed" in p for p in incompatibilities(closed, old, "backward"))
        assert incompatibilities(closed, old, "forward") == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from("abcdef"), min_size=2, max_size=6, unique=True))
def test_enum_values_may_be_added_backward_and_removed_forward(values: list[str]) -> None:
    old = {"type": "object", "properties": {"k": {"enum": values[:-1]}}}
    new = {"type": "object", "properties": {"k": {"enum": values}}}
    assert incompatibilities(new, old, "backward") == []
    assert incompatibilities(new, old, "forward") == [f"enum value {values[-1]!r} of 'k' added"]
    assert incompatibilities(old, new, "backward") == [f"enum value {values[-1]!r} of 'k' removed"]
    assert incompatibilities(new, old, "full") != []


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(NAMES, st.one_of(st.integers(), st.text(max_size=5), st.none()), max_size=5))
def test_the_validator_never_changes_the_payload(payload: Any) -> None:
    from orxaq_autonomy.store.schemas import compile_validator, first_error

    schema = {
        "type": "object",
        "properties": {"filled": {"type": "string", "default": "x"}},
        "additionalProperties": {"default": 0},
    }
    before = copy.deepcopy(payload)
    first_error(compile_validator(schema), payload)
    assert payload == before  # no default filled in, nothing coerced


# --- every other entry: HTTP, follow-ups, import, verify, config -----------------------------


def test_http_publish_of_an_invalid_payload_is_422_naming_the_path(root: Path) -> None:
    with Mesh.open(root) as mesh:
        mesh.schema_add(SUBJECT, orjson.dumps(V1))
    with serving(root, "--dispatch-every", "0") as server, server.client() as http:
        good = http.post(
            "/events",
            json={"topic": "orders", "event_type": "order.placed", "payload": {"task_id": "a"}},
        )
        assert good.status_code == 201 and good.json()["event"]["schema"] == f"{SUBJECT}/v1"
        before = snapshot(root)
        bad = http.post(
            "/events",
            json={"topic": "orders", "event_type": "order.placed", "payload": {"task_id": 1}},
        )
        assert bad.status_code == 422, bad.text
        assert "payload.task_id: 1 is not of type 'string'" in bad.json()["error"]["message"]
        batch = http.post(
            "/events/batch",
            json=[
                {"topic": "ci", "event_type": "x"},
                {"topic": "orders", "event_type": "order.placed", "payload": {}},
            ],
        )
        assert batch.status_code == 422
        assert "'task_id' is a required property" in batch.json()["error"]["message"]
        assert snapshot(root) == before


def test_a_follow_up_that_breaks_its_schema_is_dead_lettered(root: Path, cli: Runner) -> None:
    strict = {
        "type": "object",
        "properties": {"task_id": {"type": "string"}, "state": {"const": "queued"}},
    }
    with Mesh.open(root) as mesh:
        mesh.schema_add("scheduling.task.scheduled", orjson.dumps(strict), "none")
        # the shipped v1 went into the ledger first, so that v2 travels with it
        assert mesh.schemas.versions("scheduling.task.scheduled") == [1, 2]
        mesh.publish("scheduling", "task.enqueued", {"task_id": "t-9"})
    dispatched = cli("--root", str(root), "mesh-dispatch", "--json")
    assert dispatched.code == 0, dispatched.err
    letters = cli("--root", str(root), "mesh-dlq", "list", "--json").json()["dead_letters"]
    assert [d["handler"] for d in letters] == ["task_schedule"]
    assert "payload.state" in letters[0]["error"]
    kinds = [e["event_type"] for e in log_lines(root)]
    assert "task.scheduled" not in kinds and "dispatch.dead_lettered" in kinds


def push_schemas(root: Path) -> None:
    """Schemas are reviewed in pull requests: mesh-sync commits only the node's outbox and
    manifest, so the registry goes in as a commit of its own (here straight to main)."""
    git(root, "add", f"{LEDGER}/schemas")
    git(root, "commit", "-q", "-m", "schemas")
    git(root, "push", "-q", "origin", "HEAD:main")


def test_import_waits_for_a_schema_version_that_has_not_arrived(
    tmp_path: Path, cli: Runner
) -> None:
    remote = make_remote(tmp_path)
    a, b = add_node(tmp_path, remote, "node-a"), add_node(tmp_path, remote, "node-b")
    with Mesh.open(a) as mesh:
        mesh.schema_add(SUBJECT, orjson.dumps(V1))
        mesh.publish("orders", "order.placed", {"task_id": "t-1"})
    push_schemas(a)
    assert run_process("--root", str(a), "mesh-sync").code == 0
    git(b, "pull", "-q", "--rebase", "origin", "main")
    folder = b / LEDGER / "schemas" / SUBJECT
    held = (folder / "v1.json").read_bytes()
    (folder / "v1.json").unlink()  # the version has not arrived yet
    first = cli("--root", str(b), "mesh-import", "--json").json()
    assert (first["imported"], first["waiting"], first["rejected"]) == (1, 1, [])
    (folder / "v1.json").write_bytes(held)
    second = cli("--root", str(b), "mesh-import", "--json").json()
    assert (second["imported"], second["waiting"]) == (1, 0)
    with Mesh.open(b) as mesh:
        assert mesh.events(match=SUBJECT)[0]["schema"] == f"{SUBJECT}/v1"
    # an import with and without schema checks counts the same events
    assert run_process("--root", str(b), "mesh-verify", "--json").json()["ok"]


def test_verify_checks_the_registry_and_refuses_changed_versions(tmp_path: Path) -> None:
    remote = make_remote(tmp_path)
    a = add_node(tmp_path, remote, "node-a")
    with Mesh.open(a) as mesh:
        mesh.schema_add(SUBJECT, orjson.dumps(V1))
        mesh.publish("orders", "order.placed", {"task_id": "t-1"})
    push_schemas(a)
    assert run_process("--root", str(a), "mesh-sync").code == 0
    checkout = tmp_path / "pr"
    git(tmp_path, "clone", "-q", "-b", "main", str(remote), str(checkout))
    assert run_process("--root", str(checkout), "mesh-verify", "--json").json()["ok"]
    base = git(checkout, "rev-parse", "HEAD").strip()
    folder = checkout / LEDGER / "schemas" / SUBJECT
    edited = {**V1, "properties": {**V1["properties"], "task_id": {"type": "integer"}}}
    (folder / "v1.json").write_bytes(orjson.dumps(edited))  # history edited
    (folder / "v2.json").write_bytes(orjson.dumps(BREAKING))  # pushed without mesh-schema
    (folder / "v4.json").write_bytes(orjson.dumps(V1))  # a gap
    git(checkout, "add", "-A")
    git(checkout, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q", "-m", "pr")
    result = run_process("--root", str(checkout), "mesh-verify", "--since", base, "--json")
    assert result.code == 3, result.err
    text = str(result.json()["problems"])
    assert "published schema versions are immutable" in text
    assert "not backward compatible with v1: new required property 'priority'" in text
    assert "are not 1..N without gaps" in text
    # a full check reads every event too: the stored one no longer matches the edited v1
    full = run_process("--root", str(checkout), "mesh-verify", "--json")
    assert "schema: payload.task_id: 't-1' is not of type 'integer'" in str(full.json())


def test_config_requires_schemas_and_naming_rules(root: Path) -> None:
    (root / "state/event_mesh/config.toml").write_text(
        '[schemas]\nrequired = true\n\n[[naming]]\ntenant = "acme"\npattern = "acme\\\\..+"\n'
    )
    before = snapshot(root)
    r = str(root)
    free = run_process("--root", r, "mesh-publish", "--topic", "ci", "--event-type", "run.done")
    assert "has no schema and the config says [schemas] required = true" in one_line_error(free)
    with Mesh.open(root) as mesh:
        mesh.schema_add("ci.run.done", b'{"type": "object"}')
        mesh.schema_add("acme.run.done", b'{"type": "object"}')
    before = snapshot(root)
    named = run_process(
        "--root", r, "mesh-publish", "--topic", "ci", "--event-type", "run.done",
        "--tenant", "acme",
    )  # fmt: skip
    assert "breaks the naming rule of tenant 'acme'" in one_line_error(named)
    assert snapshot(root) == before
    fine = run_process(
        "--root", r, "mesh-publish", "--topic", "acme", "--event-type", "run.done",
        "--tenant", "acme",
    )  # fmt: skip
    assert fine.code == 0, fine.err
    other = run_process("--root", r, "mesh-publish", "--topic", "ci", "--event-type", "run.done")
    assert other.code == 0, other.err  # no tenant: no naming rule applies


def test_hostile_registry_files_are_reported_and_never_followed(root: Path) -> None:
    r = str(root)
    with Mesh.open(root) as mesh:
        mesh.schema_add(SUBJECT, orjson.dumps(V1))
    version = root / LEDGER / "schemas" / SUBJECT / "v1.json"
    outside = root.parent / "outside.json"
    outside.write_bytes(orjson.dumps({"type": "object"}))
    version.unlink()
    version.symlink_to(outside)  # pushed as a symlink: never read through
    publish = ["mesh-publish", "--topic", "orders", "--event-type", "order.placed"]
    assert "is a symlink" in one_line_error(run_process("--root", r, *publish))
    listed = run_process("--root", r, "mesh-schema", "list", "--json")
    assert listed.code == 0  # the registry is listed by name; nothing is read through
    verified = run_process("--root", r, "mesh-verify", "--json")
    assert verified.code == 3 and "is a symlink" in str(verified.json()["problems"])
    version.unlink()
    version.write_bytes(b'{"$ref": "http://127.0.0.1:9/steal.json"}')  # never fetched
    assert "only local references" in one_line_error(run_process("--root", r, *publish))
    verified = run_process("--root", r, "mesh-verify", "--json")
    assert "only local references" in str(verified.json()["problems"])
    (root / LEDGER / "schemas" / "Not A Subject").mkdir()
    verified = run_process("--root", r, "mesh-verify", "--json")
    assert "is not named after a subject" in str(verified.json()["problems"])
