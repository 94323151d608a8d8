"""Ledger and sync benchmarks. Prints figures; asserts nothing.

    python bench/bench_ledger.py [--quick]

- export: this node's events written to its outbox (pretty JSON files), events/s
- import: another node's outbox read, fully verified (parse, content hash, folder, name,
  chain, secrets) and appended, events/s
- one new event: importing a single new event when the ledger already holds 1,000 and
  100,000 events of that node (in-process, median); the ratio should stay near 1
- no-op mesh-sync: a `mesh-sync` process on a node of a 20-node ledger (real git, local
  bare remote) when nothing changed anywhere
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from gitfleet import add_node, git, make_remote
from orxaq_autonomy import Mesh
from orxaq_autonomy.ledger.export import export_events
from orxaq_autonomy.ledger.files import bucket_of
from orxaq_autonomy.ledger.importer import import_events

LEDGER = "state/github_coordination/event_mesh"


def items(n: int, tag: str) -> list[dict[str, object]]:
    return [
        {
            "topic": "bench",
            "event_type": "item.done",
            "payload": {"task_id": f"{tag}-{i:08d}", "lane": "lane-3", "status": "ok"},
        }
        for i in range(n)
    ]


def node_with_events(base: Path, name: str, n: int) -> Mesh:
    Mesh.init(base / name, node_id=name)
    mesh = Mesh.open(base / name)
    for start in range(0, n, 50_000):
        mesh.publish_many(items(min(50_000, n - start), name))
    return mesh


def copy_node(src: Mesh, dst: Path, only_bucket: str | None = None) -> None:
    """Put src's outbox (or one bucket of it) and manifest into dst's ledger, as a git pull
    would. Copying only the new bucket keeps 100,000 rewritten files out of the timing."""
    outbox = f"outbox/{src.node_id}" + (f"/{only_bucket}" if only_bucket else "")
    for sub in (outbox, f"nodes/{src.node_id}.json"):
        source, target = src.layout.ledger_dir / sub, dst / LEDGER / sub
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def one_new_event(base: Path, name: str, n: int, repeats: int) -> float:
    author = node_with_events(base, name, n)
    export_events(author)
    Mesh.init(base / f"{name}-reader", node_id=f"{name}-reader")
    reader = Mesh.open(base / f"{name}-reader")
    copy_node(author, reader.layout.root)
    import_events(reader)
    seq = author.publish("bench", "warm-up", {}).seq
    export_events(author)
    copy_node(author, reader.layout.root, bucket_of(seq))
    import_events(reader)
    times = []
    for i in range(repeats):
        seq = author.publish("bench", "one", {"i": i}).seq
        export_events(author)
        copy_node(author, reader.layout.root, bucket_of(seq))
        start = time.perf_counter()
        report = import_events(reader)
        times.append(time.perf_counter() - start)
        assert report.imported == 1
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    n = 10_000 if opts.quick else 50_000
    big = 20_000 if opts.quick else 100_000
    per_node = 200 if opts.quick else 1_000
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        base = Path(tmp)
        author = node_with_events(base, "author", n)
        start = time.perf_counter()
        exported = export_events(author).exported
        seconds = time.perf_counter() - start
        print(
            f"export: {exported:,} events in {seconds:.2f} s = {exported / seconds:,.0f} events/s"
        )

        Mesh.init(base / "reader", node_id="reader")
        reader = Mesh.open(base / "reader")
        copy_node(author, reader.layout.root)
        start = time.perf_counter()
        imported = import_events(reader).imported
        seconds = time.perf_counter() - start
        print(
            f"import with full verification: {imported:,} events in {seconds:.2f} s = "
            f"{imported / seconds:,.0f} events/s"
        )

        small_t = one_new_event(base, "small", 1_000, 15)
        big_t = one_new_event(base, "big", big, 15)
        print(
            f"import one new event: {small_t * 1000:.1f} ms with 1,000 in the ledger, "
            f"{big_t * 1000:.1f} ms with {big:,}; ratio {big_t / small_t:.2f}"
        )

        # a 20-node ledger behind a real bare remote
        fleet = base / "fleet"
        fleet.mkdir()
        remote = make_remote(fleet)
        seeder = add_node(fleet, remote, "seeder")
        for i in range(20):
            member = node_with_events(fleet / "src", f"node-{i:02d}", per_node)
            export_events(member)
            copy_node(member, seeder)
        git(seeder, "add", "-A", LEDGER)
        git(seeder, "commit", "-q", "-m", "twenty nodes")
        git(seeder, "push", "-q", "origin", "HEAD:main")
        node = add_node(fleet, remote, "node-x")
        cmd = [sys.executable, "-m", "orxaq_autonomy", "--root", str(node), "mesh-sync"]
        subprocess.run(cmd, check=True, capture_output=True)  # imports 20 x per_node
        walls = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            walls.append(time.perf_counter() - start)
        print(
            f"no-op mesh-sync, 20-node ledger ({20 * per_node:,} events), real git: "
            f"{statistics.median(walls):.2f} s median, {min(walls):.2f} s best"
        )


if __name__ == "__main__":
    main()
