"""`orxaq-autonomy`: a thin command line over the library API in `mesh.py`.

Every command takes `--json` and then prints exactly one JSON object on stdout. Errors are
one line on stderr (and a JSON object on stdout with `--json`), with the SPEC's exit codes.
Library modules are imported inside the commands so that `--help` and completion stay fast.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    from .mesh import Mesh
    from .store.node import Node

app = typer.Typer(
    name="orxaq-autonomy",
    help="A decentralized, git-backed event mesh. Every command takes --json.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]


@dataclass
class _Globals:
    root: Path | None = None
    json: bool = False


_globals = _Globals()


@app.callback()
def _callback(
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="Mesh root (default: $ORXAQ_AUTONOMY_ROOT, else the current directory).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    _globals.root = root
    _globals.json = as_json


def _dumps(data: Any) -> str:
    import orjson

    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS).decode()


def _emit(as_json: bool, data: dict[str, Any], human: str) -> None:
    if as_json or _globals.json:
        sys.stdout.write(_dumps(data) + "\n")
    elif human:
        sys.stdout.write(human + ("" if human.endswith("\n") else "\n"))


def _open() -> Mesh:
    from .mesh import Mesh

    return Mesh.open(_globals.root)


def _open_node() -> Node:
    """The node alone (publish, log, trace): no wing is imported, so these commands start
    fast (a publish from a shell loop pays the start-up every time)."""
    from .store.node import Node

    return Node.open(_globals.root)


def _bad(message: str) -> NoReturn:
    from .errors import BadInput

    raise BadInput(message)


# --- mesh-init -----------------------------------------------------------------------------


@app.command("mesh-init")
def mesh_init(
    node_id: Annotated[
        str | None,
        typer.Option(
            "--node-id",
            help="Node id (default: $ORXAQ_AUTONOMY_NODE_ID, else the host name), normalised.",
            show_default=False,
        ),
    ] = None,
    capability: Annotated[
        list[str] | None,
        typer.Option("--capability", help="A capability this node offers (repeatable)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the layout, node identity, keys, manifest and .gitignore. Safe to rerun."""
    from .mesh import Mesh

    result = Mesh.init(_globals.root, node_id, capability or ())
    changes = result.created + result.updated
    human = f"node {result.node_id} at {result.root}: " + (
        ", ".join(changes) if changes else "already initialised, nothing changed"
    )
    _emit(as_json, result.as_dict(), human)


@app.command("mesh-migrate")
def mesh_migrate(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Report what it would do; change nothing.")
    ] = False,
    node_id: Annotated[
        str | None,
        typer.Option(
            "--node-id",
            help="The old node's id (default: $ORXAQ_AUTONOMY_NODE_ID, else the old root's).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a root that orxaq-ops wrote a node of this mesh (idempotent, resumable)."""
    from .mesh import Mesh

    report = Mesh.migrate(_globals.root, node_id, dry_run)
    others = ", ".join(f"{n} {c}" for n, c in sorted(report.left_out.items()))
    if report.dry_run:
        verb = "would migrate"
    elif report.changed:
        verb = "migrated"
    else:
        verb = "already migrated:"
    human = (
        f"node {report.node_id}: {verb} {report.migrated} events "
        f"({report.handled} already handled, {report.causes_mapped} causes mapped, "
        f"{report.causes_legacy} kept as legacy_causation_id)"
        + (f"; left out other nodes' events ({others})" if others else "")
        + f"; old files {'go' if report.dry_run else 'kept'} under {report.archive}"
    )
    _emit(as_json, report.as_dict(), human)


# --- mesh-publish --------------------------------------------------------------------------


def _read_payload(mesh: Node, payload_json: str | None, payload_file: str | None) -> Any:
    import orjson

    from .envelope import loads_json
    from .store.paths import resolve_input_file

    if payload_json is not None and payload_file is not None:
        _bad("give --payload-json or --payload-file, not both")
    if payload_file is not None:
        if payload_file == "-":
            raw, where = sys.stdin.buffer.read(), "stdin"
        else:
            path = resolve_input_file(mesh.layout, payload_file)
            try:
                raw, where = path.read_bytes(), payload_file
            except OSError as exc:
                _bad(f"cannot read --payload-file {payload_file}: {exc.strerror}")
    elif payload_json is not None:
        raw, where = payload_json.encode(), "--payload-json"
    else:
        return {}
    try:
        return loads_json(raw)
    except orjson.JSONDecodeError as exc:
        _bad(f"invalid JSON in {where}: {exc}")


def _read_batch(defaults: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Stdin lines as objects, lazily: the log validates and seals as it reads them."""
    import orjson

    from .envelope import loads_json

    # Read everything before the log lock is taken: a slow producer must not block others.
    data = sys.stdin.buffer.read()

    def items() -> Iterator[dict[str, Any]]:
        count = 0
        for number, line in enumerate(io.BytesIO(data), 1):  # lazily, line by line
            if not line.strip():
                continue
            try:
                item = loads_json(line)
            except orjson.JSONDecodeError as exc:
                _bad(f"stdin line {number}: invalid JSON: {exc}")
            if not isinstance(item, dict):
                _bad(f"stdin line {number}: need a JSON object per line")
            count += 1
            yield {**defaults, **item} if defaults else item
        if not count:
            _bad("--stdin gave no events")

    return items()


@app.command("mesh-publish")
def mesh_publish(
    topic: Annotated[str | None, typer.Option("--topic", help="One segment, e.g. routing.")] = None,
    event_type: Annotated[
        str | None, typer.Option("--event-type", help="Dot-separated, e.g. route.requested.")
    ] = None,
    payload_json: Annotated[
        str | None, typer.Option("--payload-json", help="The payload, a JSON object.")
    ] = None,
    payload_file: Annotated[
        str | None,
        typer.Option("--payload-file", help="Read the payload from a file in the root, or -."),
    ] = None,
    causation_id: Annotated[
        str | None, typer.Option("--causation-id", help="The event that caused this one.")
    ] = None,
    correlation_id: Annotated[str | None, typer.Option("--correlation-id")] = None,
    source: Annotated[str, typer.Option("--source", help="Who publishes.")] = "cli",
    target: Annotated[str | None, typer.Option("--target", help="Node meant to act.")] = None,
    partition_key: Annotated[
        str | None, typer.Option("--partition-key", help="Events with one key run in order.")
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant")] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="A repeat returns the first event, appends none."),
    ] = None,
    stdin: Annotated[
        bool,
        typer.Option("--stdin", help="Batch: one JSON object per line; all appended or none."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Append one event (or a batch with --stdin) to this node's log, durably."""
    mesh = _open_node()
    options: dict[str, Any] = {
        "topic": topic,
        "event_type": event_type,
        "causation_id": causation_id,
        "correlation_id": correlation_id,
        "source": source,
        "target": target,
        "partition_key": partition_key,
        "tenant": tenant,
        "idempotency_key": idempotency_key,
    }
    if stdin:
        if payload_json is not None or payload_file is not None:
            _bad("--stdin reads payloads from its lines; drop --payload-json/--payload-file")
        defaults = {k: v for k, v in options.items() if v is not None}
        results = mesh.publish_many(_read_batch(defaults), default_source=source)
        fresh = [r for r in results if not r.duplicate]
        summary = {
            "count": len(results),
            "appended": len(fresh),
            "duplicates": len(results) - len(fresh),
            "first_seq": fresh[0].seq if fresh else None,
            "last_seq": fresh[-1].seq if fresh else None,
            "events": [
                {"event_id": r.event_id, "seq": r.seq, "duplicate": r.duplicate} for r in results
            ],
        }
        human = f"appended {len(fresh)} events" + (
            f" (seq {fresh[0].seq}-{fresh[-1].seq})" if fresh else ""
        )
        if len(results) != len(fresh):
            human += f", {len(results) - len(fresh)} duplicates skipped"
        _emit(as_json, summary, human)
        return
    if topic is None or event_type is None:
        _bad("mesh-publish needs --topic and --event-type (or --stdin)")
    payload = _read_payload(mesh, payload_json, payload_file)
    fields = {
        k: v for k, v in options.items() if v is not None and k not in ("topic", "event_type")
    }
    result = mesh.publish(topic, event_type, payload, **fields)
    data: dict[str, Any] = {
        "event_id": result.event_id,
        "seq": result.seq,
        "duplicate": result.duplicate,
    }
    if result.envelope is not None:
        data["event"] = result.envelope
    suffix = " (duplicate: already published)" if result.duplicate else ""
    _emit(as_json, data, f"{result.event_id} seq {result.seq}{suffix}")


# --- mesh-log ------------------------------------------------------------------------------


def _one_line(event: dict[str, Any]) -> str:
    payload = _dumps(event["payload"])
    if len(payload) > 80:
        payload = payload[:77] + "..."
    return (
        f"{event['timestamp']}  {event['node_id']}#{event['seq']}  "
        f"{event['topic']}.{event['event_type']}  {event['event_id'][:16]}  {payload}"
    )


@app.command("mesh-log")
def mesh_log(
    match: Annotated[
        str | None,
        typer.Option("--match", help="Routing-key pattern: * one segment, # zero or more."),
    ] = None,
    node: Annotated[str | None, typer.Option("--node", help="Only events by this node.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only events at or after this RFC 3339 time.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Only the most recent N matching events.")
    ] = None,
    output: Annotated[
        str,
        typer.Option(
            "--format",
            help="text (one line each), json (like --json) or cloudevents (one CloudEvents "
            "1.0 structured JSON event a line).",
        ),
    ] = "text",
    topic: Annotated[str | None, typer.Option("--topic", help="Only events of this topic.")] = None,
    correlation_id: Annotated[
        str | None, typer.Option("--correlation-id", help="Only events of this correlation id.")
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Only this tenant's events.")
    ] = None,
    target: Annotated[
        str | None, typer.Option("--target", help="Only events addressed to this node.")
    ] = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="After the matching events, print new ones as they arrive, until interrupted "
            "(--json: one object a line).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Query the local log, oldest first."""
    if output not in ("text", "json", "cloudevents"):
        _bad(f"bad --format {output!r}: need text, json or cloudevents")
    fields = {"topic": topic, "correlation_id": correlation_id, "tenant": tenant}
    fields["target"] = target
    wanted = {k: v for k, v in fields.items() if v is not None}
    if output == "text" and (as_json or _globals.json):
        output = "json"
    mesh = _open_node()
    if "target" in wanted:
        from .envelope import normalise_node_id

        wanted["target"] = normalise_node_id(wanted["target"])
    end = mesh.log.committed().log_size
    events = mesh.events(match=match, node=node, since=since, limit=limit, fields=wanted, end=end)
    if output == "cloudevents":
        from .gateway.intake import to_cloudevent

        _write_lines(_dumps(to_cloudevent(e)) for e in events)
    elif output == "json" and not follow:
        sys.stdout.write(_dumps({"events": events}) + "\n")
    elif output == "json":
        _write_lines(_dumps(e) for e in events)
    else:
        _write_lines(_one_line(e) for e in events)
    if follow:
        _follow(mesh, mesh.event_filter(match, node, since, wanted), end, output)


def _write_lines(lines: Iterator[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()  # a follower reads each event as it comes


def _follow(mesh: Node, keep: Callable[[dict[str, Any]], bool], end: int, output: str) -> None:
    """Poll the log's committed size and print what was appended, until interrupted
    (Ctrl-C or a closed pipe end it with exit 0). Polling, not inotify: the log is one
    append-only file, and a 0.2 s poll reads nothing but a size while nothing happens."""
    import time

    render: Callable[[dict[str, Any]], str] = _one_line
    if output == "json":
        render = _dumps
    elif output == "cloudevents":
        from .gateway.intake import to_cloudevent

        def render(event: dict[str, Any]) -> str:
            return _dumps(to_cloudevent(event))

    try:
        while True:
            size = mesh.log.committed().log_size
            if size > end:
                _write_lines(render(e) for e in mesh.log.iter_events(end, size) if keep(e))
                end = size
            time.sleep(0.2)
    except (KeyboardInterrupt, BrokenPipeError):
        with suppress(BrokenPipeError):
            sys.stdout.flush()
        # a closed pipe: point stdout at /dev/null so the exit does not complain again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# --- mesh-status ---------------------------------------------------------------------------


@app.command("mesh-status")
def mesh_status(as_json: JsonOpt = False) -> None:
    """Node, counts, heads, unexported events and quarantined items."""
    status = _open().status()
    log = status["log"]
    lines = [
        f"node        {status['node_id']}  ({status['root']})",
        f"log         {log['events']} events, {log['bytes']} bytes, clock {log['clock']}",
        f"own         seq {status['own']['seq']}, {status['unexported']} not yet exported",
        f"authors     {len(status['authors'])} nodes in the log",
        f"dispatch    {status['dispatch']['lag_events']} events to dispatch, "
        f"{status['dispatch']['pending']} pending, "
        f"{status['dispatch']['dead_letters']} dead letters"
        + (
            f", paused: {', '.join(status['dispatch']['paused'])}"
            if status["dispatch"]["paused"]
            else ""
        ),
        f"import      {status['import_rejected']} files rejected at the last import",
        *(
            f"handlers    {spec} paused: {why}"
            for spec, why in sorted(status["dispatch"].get("broken_modules", {}).items())
        ),
        *(
            f"migration   {node} waits for its mesh-migrate ({count} orxaq-ops files)"
            for node, count in sorted(status.get("awaiting_migration", {}).items())
        ),
        *(
            [
                f"uncommitted {log['uncommitted_bytes']} bytes past the log's end (the next "
                "write quarantines them)"
            ]
            if log.get("uncommitted_bytes")
            else []
        ),
        "sync        "
        + (
            f"last {status['last_sync']['last_sync']}, "
            + ("push pending" if status["last_sync"]["push_pending"] else "pushed")
            if status["last_sync"]
            else "never synced"
        ),
        f"quarantined {status['quarantined']['incidents']} incidents"
        + (f" in {status['quarantined']['dir']}" if status["quarantined"]["incidents"] else ""),
    ]
    exchange = status.get("exchange")
    if exchange:
        lines.append(
            f"exchange    {exchange['url']} stream {exchange['stream']}: "
            + ("connected" if exchange["connected"] else "not connected")
            + f", stream at {exchange['stream_position'].get('last_seq', '?')}"
            + f", lag {exchange['lag'] if exchange['lag'] is not None else '?'}"
            + f", published seq {exchange['published_seq']}"
        )
    for lane, counts in status.get("tasks", {}).items():
        lines.append(
            f"tasks       lane {lane}: {counts['running']} running, {counts['queued']} queued, "
            f"{counts['completed']} completed, {counts['failed']} failed"
        )
    for consumer, counts in status["forwarding"].items():
        lines.append(
            f"forward     {consumer}: {counts['delivered']} delivered, {counts['pending']} "
            f"pending, {counts['failed_attempts']} failed attempts, "
            f"{counts['dead_letters']} dead letters"
        )
    for node_id, info in status["nodes"].items():
        lines.append(f"  manifest  {node_id}: head seq {info['head'].get('seq', 0)}")
    _emit(as_json, status, "\n".join(lines))


# --- dispatch ------------------------------------------------------------------------------


def _dispatcher() -> Any:
    from .dispatch.dispatcher import Dispatcher

    return Dispatcher(_open())


@app.command("mesh-dispatch")
def mesh_dispatch(
    max_events: Annotated[
        int | None, typer.Option("--max-events", help="Stop after this many new events.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for a running dispatch instead of skipping.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run handlers over new events in the local log, exactly once."""
    if max_events is not None and max_events < 1:
        _bad(f"bad --max-events {max_events}: need a positive integer")
    dispatcher = _dispatcher()
    report = dispatcher.run(max_events=max_events, wait=wait)
    if report.skipped:
        sys.stderr.write("orxaq-autonomy: another mesh-dispatch is running; skipped\n")
        human = ""
    else:
        human = (
            f"dispatched {report.events} events: {report.handled} handler runs, "
            f"{report.followups} follow-ups"
            + (f" ({report.duplicates} already there)" if report.duplicates else "")
            + (f", {report.failed} failures" if report.failed else "")
            + (f", {report.dead_lettered} dead-lettered" if report.dead_lettered else "")
            + (f", {report.pending} pending" if report.pending else "")
            + (f", paused: {', '.join(report.paused)}" if report.paused else "")
            + "".join(f", {n} tasks {what}" for what, n in sorted(dispatcher.tasks.items()) if n)
        )
    _emit(as_json, {**report.as_dict(), "tasks": dispatcher.tasks}, human)


@app.command("mesh-replay")
def mesh_replay(
    handler: Annotated[str, typer.Option("--handler", help="The handler to run again.")],
    from_seq: Annotated[
        int, typer.Option("--from-seq", help="Start at this node's event with this seq.")
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Run one handler again over past events; unchanged logic appends nothing."""
    report = _dispatcher().replay(handler, from_seq)
    human = (
        f"replayed {handler} over {report.events} events: {report.handled} runs, "
        f"{report.followups} new follow-ups, {report.duplicates} unchanged"
        + (f", {report.failed} failures" if report.failed else "")
    )
    data = {k: v for k, v in report.as_dict().items() if k not in ("skipped", "paused")}
    _emit(as_json, data, human)


@app.command("mesh-trace")
def mesh_trace(
    event_id: Annotated[str, typer.Argument(help="An event id or a unique prefix.")],
    as_json: JsonOpt = False,
) -> None:
    """The causal chain of an event: its causes and its follow-ups."""
    trace = _open_node().trace(event_id)
    lines = []
    for cause in reversed(trace["causes"]):
        lines.append(
            "cause    "
            + (_one_line(cause) if "v" in cause else f"{cause['event_id']} (not in the local log)")
        )
    lines.append("event  > " + _one_line(trace["event"]))

    def walk(nodes: list[dict[str, Any]], depth: int) -> None:
        for node in nodes:
            lines.append("  " * depth + "follow-up " + _one_line(node["event"]))
            walk(node["followups"], depth + 1)

    walk(trace["followups"], 1)
    _emit(as_json, trace, "\n".join(lines))


@app.command("mesh-dlq")
def mesh_dlq(
    action: Annotated[str, typer.Argument(help="list, retry ID, drop ID or stats")],
    event_id: Annotated[
        str | None, typer.Argument(help="For retry and drop: an event id or prefix.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The dead letters of this node: list, retry ID, drop ID, stats."""
    if action not in ("list", "retry", "drop", "stats"):
        _bad(f"bad mesh-dlq action {action!r}: need list, retry ID, drop ID or stats")
    if action in ("retry", "drop") and event_id is None:
        _bad(f"mesh-dlq {action} needs an event id")
    if action in ("list", "stats") and event_id is not None:
        _bad(f"mesh-dlq {action} takes no event id")
    dispatcher = _dispatcher()
    if action == "list":
        letters = dispatcher.dead_letters()
        human = (
            "\n".join(
                f"{d['event_id'][:16]}  {d['handler']}  {d['routing_key']}  attempts "
                f"{d['attempts']}  {d['error']}"
                for d in letters
            )
            or "no dead letters"
        )
        _emit(as_json, {"dead_letters": letters}, human)
    elif action == "stats":
        letters = dispatcher.dead_letters()
        by_handler: dict[str, int] = {}
        for d in letters:
            by_handler[d["handler"]] = by_handler.get(d["handler"], 0) + 1
        human = f"{len(letters)} dead letters" + "".join(
            f"\n  {name}: {n}" for name, n in sorted(by_handler.items())
        )
        _emit(as_json, {"count": len(letters), "by_handler": by_handler}, human)
    else:
        assert event_id is not None
        done = (dispatcher.retry_dead if action == "retry" else dispatcher.drop_dead)(event_id)
        verb = "queued for the next mesh-dispatch" if action == "retry" else "dropped"
        human = "\n".join(f"{d['event_id']} {d['handler']}: {verb}" for d in done)
        _emit(
            as_json,
            {action: [{"event_id": d["event_id"], "handler": d["handler"]} for d in done]},
            human,
        )


@app.command("mesh-tasks")
def mesh_tasks(
    action: Annotated[str, typer.Argument(help="list, show ID or cancel ID")] = "list",
    ref: Annotated[
        str | None,
        typer.Argument(help="For show and cancel: a task id or route.selected event id/prefix."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Tasks this node runs or ran: list, show ID, cancel ID (list and show write nothing)."""
    if action not in ("list", "show", "cancel"):
        _bad(f"bad mesh-tasks action {action!r}: need list, show ID or cancel ID")
    if action != "list" and ref is None:
        _bad(f"mesh-tasks {action} needs a task id or a route.selected event id")
    if action == "list" and ref is not None:
        _bad("mesh-tasks list takes no id")
    mesh = _open()
    if action == "list":
        tasks = mesh.tasks()
        human = "\n".join(_task_line(t) for t in tasks) or "no tasks"
        _emit(as_json, {"tasks": tasks}, human)
        return
    assert ref is not None
    if action == "show":
        task = mesh.task(ref)
        human = _task_line(task) + "".join(
            f"\n  {key}: {value}" for key, value in task.items() if key != "output_tail"
        )
        if task.get("output_tail"):
            human += "\n  output (tail):\n" + task["output_tail"]
        _emit(as_json, task, human)
        return
    done = mesh.cancel_task(ref)
    _emit(as_json, done, f"{done['task_id']} ({done['event_id'][:16]}): cancelled")


@app.command("mesh-schema")
def mesh_schema(
    action: Annotated[str, typer.Argument(help="add SUBJECT FILE, check SUBJECT FILE, list, show")],
    subject: Annotated[
        str | None, typer.Argument(help="A routing key, e.g. scheduling.task.enqueued.")
    ] = None,
    file: Annotated[
        str | None, typer.Argument(help="For add and check: a JSON Schema file (- for stdin).")
    ] = None,
    compatibility: Annotated[
        str | None,
        typer.Option("--compatibility", help="backward (default), forward, full or none."),
    ] = None,
    version: Annotated[int | None, typer.Option("--version", help="For show: version N.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-subject JSON Schemas in the ledger: add, check, list, show."""
    takes = {"add": 2, "check": 2, "list": 0, "show": 1}
    if action not in takes:
        _bad(f"bad mesh-schema action {action!r}: need add, check, list or show")
    given = [a for a in (subject, file) if a is not None]
    if len(given) != takes[action]:
        usage = {"add": "SUBJECT FILE", "check": "SUBJECT FILE", "list": "", "show": "SUBJECT"}
        _bad(f"usage: mesh-schema {action} {usage[action]}".rstrip())
    if compatibility is not None and action not in ("add", "check"):
        _bad(f"--compatibility is for add and check, not {action}")
    if version is not None and action != "show":
        _bad(f"--version is for show, not {action}")
    node = _open_node()
    if action == "list":
        found = node.schema_list()
        human = (
            "\n".join(
                f"{s['subject']}  v{s['latest']}  {s['compatibility']}"
                + ("  (built in)" if s["builtin"] else "")
                for s in found
            )
            or "no schemas"
        )
        _emit(as_json, {"subjects": found}, human)
        return
    assert subject is not None
    if action == "show":
        shown = node.schema_show(subject, version)
        _emit(as_json, shown, _dumps(shown["schema"]))
        return
    assert file is not None
    raw = _read_schema_file(node, file)
    if action == "check":
        result = node.schema_check(subject, raw, compatibility)
        _emit(
            as_json,
            {**result, "compatible": True},
            f"{subject}: compatible ({result['compatibility']}); it would be v{result['version']}",
        )
        return
    added = node.schema_add(subject, raw, compatibility)
    _emit(
        as_json,
        {"subject": added["subject"], "version": added["version"]},
        f"{subject} v{added['version']}",
    )


def _read_schema_file(node: Node, file: str) -> bytes:
    from .store.fsutil import UnsafeFile, read_regular
    from .store.paths import resolve_input_file
    from .store.schemas import MAX_SCHEMA_BYTES

    if file == "-":
        raw = sys.stdin.buffer.read(MAX_SCHEMA_BYTES + 1)
    else:
        try:
            raw = read_regular(resolve_input_file(node.layout, file), MAX_SCHEMA_BYTES)
        except UnsafeFile as exc:
            _bad(f"schema file {file} {exc.message}")
        except OSError as exc:
            _bad(f"cannot read schema file {file}: {exc.strerror or exc}")
    if len(raw) > MAX_SCHEMA_BYTES:
        _bad(f"schema file {file} is over the limit of {MAX_SCHEMA_BYTES} bytes")
    return raw


def _task_line(task: dict[str, Any]) -> str:
    extra = task.get("failure") or task.get("result") or ""
    return (
        f"{task['event_id'][:16]}  {task['task_id']}  lane {task.get('lane') or '-'}  "
        f"{task['state']}{'  ' + extra if extra else ''}"
    )


# --- ledger and sync -------------------------------------------------------------------


@contextmanager
def _progress(label: str, as_json: bool) -> Iterator[Callable[[int], None]]:
    """A live count on stderr when it is a terminal; nothing otherwise."""
    if as_json or _globals.json or not sys.stderr.isatty():
        yield lambda _: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description} {task.completed:,}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda n: bar.advance(task, n)


def _exit_partial(rejected: list[dict[str, str]]) -> None:
    from .errors import EXIT_PARTIAL

    for problem in rejected:
        sys.stderr.write(f"orxaq-autonomy: rejected {problem['path']}: {problem['reason']}\n")
    if rejected:
        sys.exit(EXIT_PARTIAL)


def _check_max(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        _bad(f"bad {option} {value}: need a positive integer")


@app.command("mesh-export")
def mesh_export(
    max_events: Annotated[int | None, typer.Option("--max-events")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write this node's new events to its outbox and update its manifest head."""
    from .ledger.export import export_events

    _check_max(max_events, "--max-events")
    mesh = _open()
    with _progress("exporting", as_json) as advance:
        report = export_events(mesh, max_events, advance)
    human = f"exported {report.exported} events" + (
        f" (seq {report.first_seq}-{report.last_seq})" if report.exported else ""
    )
    _emit(as_json, report.as_dict(), human)


@app.command("mesh-import")
def mesh_import(
    max_events: Annotated[int | None, typer.Option("--max-events")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Append new, verified events from the other nodes' outboxes (exit 3 if any rejected)."""
    from .ledger.importer import import_events

    _check_max(max_events, "--max-events")
    mesh = _open()
    with _progress("importing", as_json) as advance:
        report = import_events(mesh, max_events, advance)
    human = (
        f"imported {report.imported} events"
        + "".join(f"\n  {node}: {n}" for node, n in sorted(report.nodes.items()))
        + (f"\n{report.waiting} waiting for an earlier event" if report.waiting else "")
        + _legacy_lines(report.legacy)
    )
    data = report.as_dict()
    _emit(as_json, data, human)
    _exit_partial(data["rejected"])


def _legacy_lines(legacy: dict[str, int]) -> str:
    """Old-layout outboxes, named: they are reported, never skipped silently."""
    return "".join(
        f"\n  {node}: {count} orxaq-ops event files not imported: waiting for {node}'s mesh-migrate"
        for node, count in sorted(legacy.items())
    )


@app.command("mesh-sync")
def mesh_sync(
    no_push: Annotated[bool, typer.Option("--no-push", help="Commit locally only.")] = False,
    max_retries: Annotated[
        int, typer.Option("--max-retries", help="Retries of a rejected push.")
    ] = 5,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for a running sync instead of skipping.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Pull (rebase), import, dispatch, export, commit the ledger, push with retries."""
    from .ledger.sync import Syncer

    mesh = _open()
    with _progress("syncing", as_json) as advance:
        report = Syncer(mesh, advance).run(push=not no_push, max_retries=max_retries, wait=wait)
    if report.skipped:
        sys.stderr.write("orxaq-autonomy: another mesh-sync is running; skipped\n")
        _emit(as_json, report.as_dict(), "")
        return
    if report.remote is None:
        where = "no remote"
    elif report.pushed:
        where = f"pushed to {report.remote}/{report.branch}"
    elif no_push:
        where = "push skipped (--no-push)"
    else:
        where = f"push pending ({report.offline_reason or 'remote unreachable'})"
    human = (
        f"imported {report.imported}, dispatched {report.dispatched} "
        f"({report.followups} follow-ups), exported {report.exported}; "
        + (f"committed {report.commit[:10]}; " if report.commit else "nothing to commit; ")
        + where
    )
    for path in report.handler_files_changed:
        sys.stderr.write(f"orxaq-autonomy: the pull changed handler module {path}: review it\n")
    for what in report.repaired:
        sys.stderr.write(f"orxaq-autonomy: repaired: {what}\n")
    if report.legacy:
        sys.stderr.write(_legacy_lines(report.legacy).lstrip("\n") + "\n")
    _emit(as_json, report.as_dict(), human)
    _exit_partial([*report.rejected, *report.refused_paths])


@app.command("mesh-verify")
def mesh_verify(
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only nodes touched since this git revision (a PR base)."),
    ] = None,
    policy_key: Annotated[
        list[str] | None,
        typer.Option(
            "--policy-key",
            help="A key whose signature makes trust.json count (besides the node's config).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the ledger as a PR check; works on any checkout (exit 3 on problems)."""
    from .config import load_config
    from .ledger.verify import verify_ledger
    from .store.keys import public_key_bytes
    from .store.paths import resolve_layout

    layout = resolve_layout(_globals.root)
    if not layout.ledger_dir.is_dir():
        _bad(f"no ledger at {layout.ledger_dir}")
    changed, base = None, None
    if since is not None:
        from .ledger.sync import changed_since

        changed, base = changed_since(layout.root, layout.ledger_dir, since)
    keys = [*load_config(layout.state_dir / "config.toml").trust.policy_keys, *(policy_key or [])]
    for key in policy_key or []:
        public_key_bytes(key)
    report = verify_ledger(layout, changed, base, keys)
    human = f"checked {report.checked} files of {report.nodes} nodes: " + (
        "ok" if report.ok else f"{len(report.problems)} problems"
    )
    data = report.as_dict()
    _emit(as_json, data, human)
    _exit_partial(data["problems"])


@app.command("mesh-rotate-key")
def mesh_rotate_key(as_json: JsonOpt = False) -> None:
    """Switch this node to a new Ed25519 key, announced by an event signed with the old one."""
    result = _open().rotate_key()
    human = (
        f"rotated: {result['previous_key']} -> {result['public_key']} "
        f"(announced by {result['event_id'][:16]}, seq {result['seq']}); sync to publish it"
    )
    _emit(as_json, result, human)


@app.command("mesh-sign-policy")
def mesh_sign_policy(
    policy_file: Annotated[str, typer.Argument(help='JSON: {"nodes": {node: {"keys": [...]}}}')],
    as_json: JsonOpt = False,
) -> None:
    """Sign a trust policy with this node's key and write it as the ledger's trust.json."""
    mesh = _open()
    policy = _read_payload(mesh, None, policy_file)
    result = mesh.sign_policy(policy)
    human = (
        f"wrote {result['path']} signed by {result['signed_by']}; nodes that pin this key "
        "in [trust] policy_keys believe it"
    )
    _emit(as_json, result, human)


@app.command("mesh-listen")
def mesh_listen(
    seconds: Annotated[
        float | None,
        typer.Option(
            "--for",
            help="Stop after this many seconds (default: until interrupted).",
            show_default=False,
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Exchange events in real time over NATS JetStream ([nats] in the config). With --json,
    one JSON object per line of progress."""
    from .exchange.listener import human

    if seconds is not None and not 0 < seconds < float("inf"):
        _bad(f"bad --for {seconds}: need seconds > 0")
    lines = as_json or _globals.json

    def progress(line: dict[str, Any]) -> None:
        if lines:
            sys.stdout.write(_dumps(line) + "\n")
            sys.stdout.flush()
        else:
            sys.stderr.write(f"mesh-listen: {human(line)}\n")

    _open().listen(seconds, progress)


@app.command("mesh-serve")
def mesh_serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free one).")] = 8787,
    token_file: Annotated[
        str | None,
        typer.Option(
            "--token-file",
            help="File holding the bearer token (mode 600). Default: $ORXAQ_AUTONOMY_SERVE_TOKEN."
            " Without a token, writes are refused.",
            show_default=False,
        ),
    ] = None,
    rate_limit: Annotated[
        float, typer.Option("--rate-limit", help="Requests per second per client (0: off).")
    ] = 1000.0,
    burst: Annotated[
        int | None,
        typer.Option("--burst", help="Requests a client may make at once.", show_default="2x rate"),
    ] = None,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest batch body in bytes.")] = 16
    * 1024
    * 1024,
    dispatch_every: Annotated[
        float,
        typer.Option(
            "--dispatch-every",
            help="Run the dispatcher (handlers, forwarding) this often, and soon after new "
            "events (0: never; leave it to mesh-dispatch).",
        ),
    ] = 1.0,
    max_connections: Annotated[
        int,
        typer.Option(
            "--max-connections",
            help="Connections open at once; beyond, the oldest idle one is closed, or 503.",
        ),
    ] = 1024,
    max_connections_per_client: Annotated[
        int,
        typer.Option(
            "--max-connections-per-client",
            help="Connections open at once from one address (0: no cap); beyond: 503.",
        ),
    ] = 64,
    header_timeout: Annotated[
        float,
        typer.Option(
            "--header-timeout",
            help="Seconds a connection has to send a request's headers (from connecting, or"
            " from the last answer); then it is closed.",
        ),
    ] = 10.0,
    body_timeout: Annotated[
        float,
        typer.Option(
            "--body-timeout",
            help="Seconds a request has to send its body, after its headers; then 408.",
        ),
    ] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Serve the HTTP API (POST /events, GET /events, /metrics, ...) until interrupted."""
    from .gateway.app import TOKEN_ENV, Gateway, Settings, listen, load_token, serve

    if not 0 <= port <= 65535:
        _bad(f"bad --port {port}: need 0-65535")
    if rate_limit < 0 or (burst is not None and burst < 1) or max_body < 1024:
        _bad("need --rate-limit >= 0, --burst >= 1 and --max-body >= 1024")
    if dispatch_every < 0:
        _bad(f"bad --dispatch-every {dispatch_every}: need seconds >= 0")
    if max_connections < 1 or max_connections_per_client < 0:
        _bad("need --max-connections >= 1 and --max-connections-per-client >= 0")
    if not (0 < header_timeout < float("inf") and 0 < body_timeout < float("inf")):
        _bad("need --header-timeout and --body-timeout > 0 seconds")
    mesh = _open()
    token = load_token(token_file)
    os.environ.pop(TOKEN_ENV, None)  # lane commands and handlers need not inherit it
    settings = Settings(
        token=token,
        rate_limit=rate_limit,
        burst=burst if burst is not None else max(1, int(2 * rate_limit)),
        max_body=max_body,
        dispatch_every=dispatch_every,
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
        header_timeout=header_timeout,
        body_timeout=body_timeout,
    )
    gateway = Gateway(mesh, settings)
    sock = listen(host, port, token)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{bound_host if ':' not in bound_host else f'[{bound_host}]'}:{bound_port}"
    info = {
        "url": url,
        "host": bound_host,
        "port": bound_port,
        "node_id": mesh.node_id,
        "writes": token is not None,
        "pid": os.getpid(),
    }
    writes = "writes need the bearer token" if token else "no token: writes are refused"
    if as_json or _globals.json:
        _emit(True, info, "")
    else:
        sys.stderr.write(f"node {mesh.node_id} serving on {url} ({writes}); Ctrl-C stops\n")
    sys.stdout.flush()
    serve(gateway, sock)


# --- entry point ---------------------------------------------------------------------------


def _fail(code: int, message: str, as_json: bool) -> NoReturn:
    message = " ".join(message.split())  # always one line
    if as_json:
        sys.stdout.write(_dumps({"error": {"code": code, "message": message}}) + "\n")
    sys.stderr.write(f"orxaq-autonomy: error: {message}\n")
    sys.exit(code)


class _Warnings(logging.Handler):
    """The library's warnings (e.g. a write that repaired the log) as one stderr line
    each, written to whatever sys.stderr is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"orxaq-autonomy: warning: {' '.join(record.getMessage().split())}\n")


def main(argv: list[str] | None = None) -> None:
    from .errors import EXIT_BAD_INPUT, MeshError

    library = logging.getLogger("orxaq_autonomy")
    if not any(isinstance(h, _Warnings) for h in library.handlers):
        library.addHandler(_Warnings(logging.WARNING))
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        code = app(args=args, prog_name="orxaq-autonomy", standalone_mode=False)
    except MeshError as exc:
        _fail(exc.exit_code, exc.message, as_json)
    except typer.TyperException as exc:
        _fail(exc.exit_code or EXIT_BAD_INPUT, exc.format_message(), as_json)
    except (typer.Abort, KeyboardInterrupt):
        _fail(130, "interrupted", as_json)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as exc:
        if os.environ.get("ORXAQ_AUTONOMY_DEBUG"):
            raise
        _fail(1, f"internal error: {type(exc).__name__}: {exc}", as_json)
    sys.exit(code if isinstance(code, int) else 0)
