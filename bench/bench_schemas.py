"""Schema benchmarks (SPEC 9). Prints figures; asserts nothing (timed tests flake).

    python bench/bench_schemas.py            # full run (~1 minute)
    python bench/bench_schemas.py --quick    # smaller sizes, for a smoke run

Figures:
- validators: jsonschema (the reference) vs jsonschema-rs on the 10-property schema,
  import time and payloads checked per second (why the registry uses jsonschema-rs)
- batch: `mesh-publish --stdin` end to end, signed, payloads that match a 10-property
  schema, next to the same batch on a subject without a schema (target >= 15,000/s)
- single: wall time of one `mesh-publish` process, with and without a schema (<= 130 ms)
- import: events/s imported from another node's outbox, events that name a schema
  version (checked) vs the same events without one (target: checks cost <= 10 %)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

CLI = [sys.executable, "-m", "orxaq_autonomy"]
LEDGER = "state/github_coordination/event_mesh"
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "task_id": {"type": "string", "minLength": 1},
        "lane": {"type": "string"},
        "status": {"enum": ["ok", "failed", "skipped"]},
        "attempt": {"type": "integer", "minimum": 1},
        "note": {"type": "string", "maxLength": 200},
        "duration": {"type": "number"},
        "retried": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "owner": {"type": "string"},
        "exit_code": {"type": "integer"},
    },
    "required": ["task_id", "lane", "status", "attempt"],
}


def payload(i: int) -> dict[str, Any]:
    return {
        "task_id": f"task-{i:08d}",
        "lane": "lane-3",
        "status": "ok",
        "attempt": 1,
        "note": f"build {i} passed",
        "duration": 1.5,
        "retried": False,
        "tags": ["ci"],
        "owner": "ops",
        "exit_code": 0,
    }


def run(root: Path, *args: str, stdin: bytes | None = None) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORXAQ_AUTONOMY_")}
    start = time.perf_counter()
    subprocess.run(
        [*CLI, "--root", str(root), *args],
        input=stdin,
        check=True,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    return time.perf_counter() - start


def fresh_root(base: Path, name: str, schema: bool) -> Path:
    root = base / name
    run(root, "mesh-init", "--node-id", name)
    if schema:
        (root / "schema.json").write_bytes(orjson.dumps(SCHEMA))
        run(root, "mesh-schema", "add", "bench.item.done", "schema.json")
    return root


def batch(n: int) -> bytes:
    return b"".join(
        orjson.dumps({"topic": "bench", "event_type": "item.done", "payload": payload(i)}) + b"\n"
        for i in range(n)
    )


def validators(n: int) -> None:
    start = time.perf_counter()
    import jsonschema  # type: ignore[import-untyped]  # the reference, for comparison

    mid = time.perf_counter()
    import jsonschema_rs

    end = time.perf_counter()
    items = [payload(i) for i in range(n)]
    reference = jsonschema.Draft202012Validator(SCHEMA)
    fast = jsonschema_rs.Draft202012Validator(SCHEMA)
    t0 = time.perf_counter()
    for item in items:
        next(reference.iter_errors(item), None)
    t1 = time.perf_counter()
    for item in items:
        fast.is_valid(item)
    t2 = time.perf_counter()
    print(
        f"validators: jsonschema {n / (t1 - t0):,.0f}/s (import {1000 * (mid - start):.0f} ms), "
        f"jsonschema-rs {n / (t2 - t1):,.0f}/s (import {1000 * (end - mid):.0f} ms)"
    )


def make_author(base: Path, n: int, schema: bool) -> Any:
    from orxaq_autonomy import Mesh
    from orxaq_autonomy.ledger.export import export_events

    tag = "with" if schema else "without"
    mesh = Mesh.open(fresh_root(base, f"author-{tag}", schema))
    mesh.publish_many(
        {"topic": "bench", "event_type": "item.done", "payload": payload(i)} for i in range(n)
    )
    export_events(mesh)
    return mesh


def import_rate(base: Path, author: Any, n: int, schema: bool, attempt: int) -> float:
    from orxaq_autonomy import Mesh
    from orxaq_autonomy.ledger.importer import import_events

    tag = f"{'with' if schema else 'without'}-{attempt}"
    reader_root = base / f"reader-{tag}"
    run(reader_root, "mesh-init", "--node-id", f"reader-{tag}")
    for sub in (f"outbox/{author.node_id}", f"nodes/{author.node_id}.json", "schemas"):
        source, target = author.layout.ledger_dir / sub, reader_root / LEDGER / sub
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif source.exists():
            shutil.copy2(source, target)
    reader = Mesh.open(reader_root)
    start = time.perf_counter()
    report = import_events(reader)
    seconds = time.perf_counter() - start
    assert report.imported == n + (1 if schema else 0), report.as_dict()
    return (n + (1 if schema else 0)) / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    big = 20_000 if opts.quick else 100_000
    repeats = 5 if opts.quick else 15
    validators(20_000 if opts.quick else 50_000)
    one = [
        "mesh-publish", "--topic", "bench", "--event-type", "item.done",
        "--payload-json", orjson.dumps(payload(1)).decode(),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        base = Path(tmp)
        data = batch(big)
        for schema in (False, True):
            root = fresh_root(base, f"batch-{schema}", schema)
            seconds = run(root, "mesh-publish", "--stdin", stdin=data)
            label = "10-property schema" if schema else "no schema"
            print(f"batch publish --stdin ({label}, signed): {big / seconds:,.0f} events/s")
            run(root, *one)  # warm
            single = statistics.median(run(root, *one) for _ in range(repeats))
            print(f"single mesh-publish process ({label}): {single * 1000:.0f} ms median")
        n = 5_000 if opts.quick else 20_000
        authors = {schema: make_author(base, n, schema) for schema in (False, True)}
        rates: dict[bool, list[float]] = {False: [], True: []}
        for attempt in range(3):  # alternated, best of three: other load on the machine
            for schema in (False, True):
                rates[schema].append(import_rate(base, authors[schema], n, schema, attempt))
        plain, checked = max(rates[False]), max(rates[True])
        print(
            f"import: {plain:,.0f} events/s without schema checks, {checked:,.0f} events/s "
            f"with them (cost {100 * (1 - checked / plain):.1f} %)"
        )


if __name__ == "__main__":
    main()
