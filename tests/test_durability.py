"""Crashes and concurrency with real processes: SIGKILL mid-write, racing publishers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import orjson

from conftest import Runner, log_lines, run_process
from orxaq_autonomy.envelope import parse_envelope

LOG = "artifacts/autonomy/event_mesh/events.ndjson"


def assert_intact(root: Path) -> list[dict[str, Any]]:
    """Every line is a valid envelope; per node, seq is gap-free and prev chains."""
    raw = (root / LOG).read_bytes() if (root / LOG).exists() else b""
    assert raw == b"" or raw.endswith(b"\n")
    events = [parse_envelope(line) for line in raw.splitlines()]
    last: dict[str, tuple[int, object]] = {}
    clocks = []
    for env in events:
        seq, prev = last.get(env["node_id"], (0, None))
        assert env["seq"] == seq + 1, f"gap before {env['event_id']}"
        assert env.get("prev") == prev
        last[env["node_id"]] = (env["seq"], env["event_id"])
        clocks.append(env["clock"])
    assert clocks == sorted(clocks) and len(set(clocks)) == len(clocks)
    assert len({e["event_id"] for e in events}) == len(events)
    return events


def committed_size(root: Path) -> int:
    db = sqlite3.connect(root / "state/event_mesh/log_index.sqlite3")
    try:
        return int(db.execute("SELECT log_size FROM tail").fetchone()[0])
    finally:
        db.close()


def big_batch(n: int, tag: str) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "topic": "load",
                "event_type": "item",
                "payload": {"tag": tag, "i": i, "pad": "x" * 200},
            }
        )
        + b"\n"
        for i in range(n)
    )


def test_sigkill_mid_batch_appends_none_of_it(root: Path, cli: Runner) -> None:
    for i in range(3):
        cli(
            "--root",
            str(root),
            "mesh-publish",
            "--topic",
            "ci",
            "--event-type",
            "before",
            "--payload-json",
            f'{{"i": {i}}}',
        )
    batch = big_batch(120_000, "killed")  # ~35 MB: the write takes long enough to interrupt
    log = root / LOG
    torn_seen = 0
    for _attempt in range(4):
        base = committed_size(root)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orxaq_autonomy",
                "--root",
                str(root),
                "mesh-publish",
                "--stdin",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert proc.stdin is not None
        proc.stdin.write(batch)
        proc.stdin.close()
        deadline = time.monotonic() + 60
        while log.stat().st_size <= base and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        written = log.stat().st_size
        if written > base and not log.read_bytes().endswith(b"\n"):
            torn_seen += 1
        # a read sees only the committed events and moves nothing (SPEC 12); the next
        # write quarantines the uncommitted tail
        status = run_process("--root", str(root), "mesh-status", "--json")
        assert status.code == 0, status.err
        assert log.stat().st_size == written
        assert status.json()["log"]["events"] == 3
        if torn_seen:
            break
    assert torn_seen, "never caught the batch mid-write"
    # nothing of the killed batch survived, and the next publish continues the chain
    after = run_process(
        "--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "after", "--json"
    )
    assert after.code == 0 and after.json()["seq"] == 4
    assert "repaired" in after.err
    status = run_process("--root", str(root), "mesh-status", "--json")
    assert status.json()["quarantined"]["incidents"] >= 1
    events = assert_intact(root)
    assert [e["event_type"] for e in events] == ["before"] * 3 + ["after"]
    # the quarantine holds the raw bytes, the last file ending in a torn line
    files = sorted((root / "state/event_mesh/quarantine").iterdir())
    assert files and all(f.stat().st_size > 0 for f in files)


def test_completed_batch_survives_and_rerun_appends_all_once(root: Path) -> None:
    batch = big_batch(20_000, "whole")
    done = run_process("--root", str(root), "mesh-publish", "--stdin", "--json", stdin=batch)
    assert done.code == 0 and done.json()["appended"] == 20_000
    assert len(assert_intact(root)) == 20_000


WORKER = textwrap.dedent(
    """
    import sys
    from orxaq_autonomy import Mesh
    root, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mesh = Mesh.open(root)
    for i in range(start, stop):
        mesh.publish("work", "item.done", {"i": i}, idempotency_key=f"item-{i}")
        print(i, flush=True)   # acknowledged
    """
)


def test_sigkill_loop_loses_no_acknowledged_event_and_duplicates_none(root: Path) -> None:
    """Kill a publisher at random moments; restart from its last acknowledgement."""
    import random

    total, acked = 400, -1
    rng = random.Random(7)
    kills = 0
    while acked < total - 1:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(root), str(acked + 1), str(total)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        if kills < 6:
            time.sleep(rng.uniform(0.15, 0.6))
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        out, _ = proc.communicate()
        printed = [int(x) for x in out.split()]
        if printed:
            acked = printed[-1]
    events = assert_intact(root)
    numbers = [e["payload"]["i"] for e in events]
    assert numbers == list(range(total))  # every item once, in order: none lost, none twice


def test_concurrent_publishers_make_one_gap_free_chain(root: Path) -> None:
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER.replace('idempotency_key=f"item-{i}"', f'idempotency_key=f"w{w}-{{i}}"'),
                str(root),
                "0",
                "150",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    batches = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orxaq_autonomy",
                "--root",
                str(root),
                "mesh-publish",
                "--stdin",
                "--json",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [b.communicate(big_batch(500, f"b{n}"))[0] for n, b in enumerate(batches)]
    for w in workers:
        w.communicate()
        assert w.returncode == 0
    for out in outputs:
        assert orjson.loads(out)["appended"] == 500
    events = assert_intact(root)
    assert len(events) == 4 * 150 + 2 * 500
    # each batch landed as one contiguous run: batches are atomic
    for tag in ("b0", "b1"):
        seqs = [e["seq"] for e in events if e["payload"].get("tag") == tag]
        assert seqs == list(range(seqs[0], seqs[0] + 500))


def test_torn_line_is_reported_by_status_and_not_merged(root: Path, cli: Runner) -> None:
    cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "one")
    with open(root / LOG, "ab") as fh:
        fh.write(b'{"v":1,"node_id":"node-a","seq":2,"pay')
    status = cli("--root", str(root), "mesh-status", "--json").json()
    # the read reports the torn bytes and leaves them; the next write quarantines them
    assert status["quarantined"]["incidents"] == 0 and status["log"]["uncommitted_bytes"] > 0
    cli("--root", str(root), "mesh-publish", "--topic", "ci", "--event-type", "two")
    status = cli("--root", str(root), "mesh-status", "--json").json()
    assert status["quarantined"]["incidents"] == 1 and len(status["quarantined"]["files"]) == 1
    assert [e["event_type"] for e in log_lines(root)] == ["one", "two"]
    assert_intact(root)
