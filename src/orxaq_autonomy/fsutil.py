"""Durable file primitives: atomic state writes, directory fsync, and an advisory lock.

The lock is `fcntl.flock` directly rather than the `filelock` package: it is the same
system call, and importing `filelock` cost about 20 ms of the 150 ms budget of a single
`mesh-publish` process here. The kernel drops a flock when its holder dies, so a SIGKILLed
writer never leaves the mesh locked.

flock only arbitrates between processes well: two threads of one process polling it hand
the lock over late. So threads first queue on a per-path `threading.Lock`, which wakes the
next waiter at once, and only the thread at the head of that queue polls the flock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from .errors import OperationFailed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def dump_json_pretty(obj: Any) -> bytes:
    """Pretty JSON with sorted keys and a trailing newline: the form people review."""
    return orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def atomic_write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    atomic_write_bytes(path, dump_json_pretty(obj), mode)


def read_json(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    key = os.path.abspath(path)
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.get(key)
        if lock is None:
            lock = _THREAD_LOCKS[key] = threading.Lock()
        return lock


class FileLock:
    """An exclusive advisory lock on `path`, waiting up to `timeout` seconds. Not
    re-entrant: a thread that holds it and asks again waits for itself."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None
        self._thread_lock = _thread_lock(path)

    def acquire(self, blocking: bool = True) -> bool:
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(blocking, self.timeout if blocking else -1):
            if blocking:
                raise OperationFailed(
                    f"timed out after {self.timeout:.0f}s waiting for lock {self.path}"
                )
            return False
        try:
            acquired = self._acquire_flock(blocking, deadline)
        except BaseException:
            self._thread_lock.release()
            raise
        if not acquired:
            self._thread_lock.release()
        return acquired

    def _acquire_flock(self, blocking: bool, deadline: float) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        # Poll: flock cannot time out. Locks are mostly held for milliseconds (one append),
        # so the wait stays short; a long holder costs at most 200 polls a second.
        delay = 0.0002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if not blocking or time.monotonic() >= deadline:
                os.close(fd)
                if blocking:
                    raise OperationFailed(
                        f"timed out after {self.timeout:.0f}s waiting for lock {self.path}"
                    )
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            self._thread_lock.release()

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
