"""Shared fixtures: real roots on disk, the real CLI in-process and as a subprocess."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from orxaq_autonomy.cli import main

ENV_VARS = (
    "ORXAQ_AUTONOMY_ROOT",
    "ORXAQ_AUTONOMY_NODE_ID",
    "ORXAQ_AUTONOMY_EVENT_MESH_FILE",
    "ORXAQ_AUTONOMY_EVENT_MESH_STATE_DIR",
    "ORXAQ_AUTONOMY_GITHUB_COORDINATION_DIR",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        lines = [line for line in self.out.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected exactly one JSON line on stdout, got {self.out!r}"
        return orjson.loads(lines[0])


Runner = Callable[..., Result]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Runner:
    """Run the CLI in-process (fast); `stdin` feeds standard input."""

    def run(*args: str, stdin: str | None = None) -> Result:
        import io

        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode())))
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def run_process(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> Result:
    """Run the CLI as a real process, exactly as a user or cron would."""
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "orxaq_autonomy", *args],
        input=stdin,
        capture_output=True,
        env=full_env,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())


@pytest.fixture
def root(tmp_path: Path, cli: Runner) -> Path:
    """An initialised node `node-a`."""
    r = tmp_path / "root"
    result = cli("--root", str(r), "mesh-init", "--node-id", "node-a", "--capability", "routing")
    assert result.code == 0, result.err
    return r


def snapshot(root: Path) -> dict[str, str]:
    """Content hash of every file under the root, to prove a command changed nothing."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.endswith((".lock", "-shm", "-wal")):
            continue
        if path.suffix == ".sqlite3":
            # SQLite may checkpoint its WAL into the file on close: compare content, not bytes.
            db = sqlite3.connect(path)
            data = "\n".join(db.iterdump()).encode()
            db.close()
        else:
            data = path.read_bytes()
        found[path.relative_to(root).as_posix()] = hashlib.sha256(data).hexdigest()
    return found


def log_lines(root: Path) -> list[dict[str, Any]]:
    path = root / "artifacts/autonomy/event_mesh/events.ndjson"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def lines() -> Iterator[Callable[[Path], list[dict[str, Any]]]]:
    yield log_lines
