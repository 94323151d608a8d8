"""The detached runner of one task: `python taskrunner.py TASK_DIR`.

Run by file path (standard library only), so that it starts fast and outlives the
dispatcher that spawned it. Its protocol with tasks.py, all in TASK_DIR:

1. take `runner.lock` (flock) and hold it for life: the kernel drops it when this process
   dies however it dies, so a free lock means "no runner" to the dispatcher;
2. claim the task by creating `claim` with O_EXCL. A dispatcher that found the task
   without a runner creates the same file first (`void`) and the runner exits without
   running anything: one of the two wins, so the command never starts twice;
3. fork: the parent exits 0 at once (the dispatcher waits only for that); the child runs
   the command in its own process group, output to a bounded `output.log`;
4. write `result.json` (exit code, duration, failure) atomically, then exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

OUTPUT_MAX_BYTES = 256 * 1024  # output.log keeps the last half of this once it grows past it
CLAIMED, VOIDED = 0, 3


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def claim(folder: Path, text: str) -> bool:
    """Create `claim` holding `text`; False when someone created it first."""
    try:
        fd = os.open(folder / "claim", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _copy_bounded(stream: Any, path: Path) -> None:
    """Copy the command's output to `path`, keeping only the newest bytes past the bound."""
    with open(path, "ab") as out:
        while True:
            chunk = stream.read1(65536)
            if not chunk:
                break
            out.write(chunk)
            out.flush()
            if out.tell() > OUTPUT_MAX_BYTES:
                with open(path, "rb") as src:
                    src.seek(-OUTPUT_MAX_BYTES // 2, os.SEEK_END)
                    keep = src.read()
                out.seek(0)
                out.truncate()
                out.write(b"[... earlier output dropped ...]\n" + keep)
                out.flush()


def _run(folder: Path) -> None:
    spec = json.loads((folder / "spec.json").read_text())
    started = time.monotonic()
    result: dict[str, Any]
    if (folder / "cancel").exists():
        result = {"failure": "cancelled", "duration_seconds": 0.0}
        _write_atomic(folder / "result.json", result)
        return
    argv = spec["argv"]
    try:
        child = subprocess.Popen(
            argv,
            shell=isinstance(argv, str),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **spec["env"]},
            cwd=spec["cwd"],
            start_new_session=True,  # its own group: a timeout or cancel kills all it started
        )
    except OSError as exc:
        (folder / "output.log").write_text(f"could not run the command: {exc}\n")
        result = {"failure": "exit_code", "exit_code": 127, "duration_seconds": 0.0}
        _write_atomic(folder / "result.json", result)
        return
    _write_atomic(folder / "runner.json", {"runner_pid": os.getpid(), "pgid": child.pid})
    if (folder / "cancel").exists():  # asked while the command was being started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
    assert child.stdout is not None
    copier = threading.Thread(target=_copy_bounded, args=(child.stdout, folder / "output.log"))
    copier.start()
    timed_out = False
    try:
        code = child.wait(timeout=float(spec["timeout"]))
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        code = child.wait()
    # the group may hold processes that keep the pipe open: they go with the command
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    copier.join()
    result = {"duration_seconds": round(time.monotonic() - started, 3)}
    if (folder / "cancel").exists():
        result["failure"] = "cancelled"
    elif timed_out:
        result["failure"] = "timeout"
        result["timeout_seconds"] = spec["timeout"]
    elif code != 0:
        result["failure"] = "exit_code"
    if not timed_out:
        result["exit_code"] = code
    _write_atomic(folder / "result.json", result)


def main(folder: Path) -> int:
    lock = os.open(folder / "runner.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a dispatcher judging this task holds it briefly
    if not claim(folder, "run"):
        return VOIDED
    if os.fork() != 0:
        os._exit(CLAIMED)  # the dispatcher waits only for this; the child inherits the lock
    try:
        _run(folder)
    finally:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
