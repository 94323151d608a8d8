"""Durable file primitives: atomic state writes, directory fsync, an advisory lock, and the
one safe reader for files that arrive through git (`read_regular`).

The lock is `fcntl.flock` directly rather than the `filelock` package: it is the same
system call, and importing `filelock` cost about 20 ms of the 150 ms budget of a single
`mesh-publish` process here. The kernel drops a flock when its holder dies, so a SIGKILLed
writer never leaves the mesh locked.

flock only arbitrates between processes well: two threads of one process polling it hand
the lock over late. So threads first queue on a per-path `threading.Lock`, which wakes the
next waiter at once, and only the thread at the head of that queue polls the flock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from ..errors import BadInput, OperationFailed

# --- files that arrive through git ------------------------------------------------------
#
# Anyone who can push to the shared remote may be hostile, so nothing under the ledger is
# trusted to be what its name says: a manifest may be a symlink to /dev/zero or to a
# secret, a folder, a FIFO, or 400 MB. `read_regular` opens without following a symlink,
# without blocking on a FIFO, checks with fstat that it holds a regular file of bounded
# size, and never reads more than that bound.

_NO_FOLLOW_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeFile(BadInput):
    """A path under the ledger that is not what it must be (a symlink, a folder where a
    file belongs, a special file, an oversized file). `message` says what it is; `path`
    names it."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(reason)
        self.path = Path(path)


def file_kind(mode: int) -> str:
    """What an lstat/fstat mode is, in words: 'a symlink', 'a folder', 'a FIFO', ..."""
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def read_regular(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """The bytes of `path`, which must be a regular file (not a symlink to one) of at most
    `max_bytes`. Raises FileNotFoundError when nothing is there, UnsafeFile when something
    else is, OSError for the rest (permission, a parent that is not a folder). Reads at
    most `max_bytes + 1` bytes, so a file that grows while it is read is refused too."""
    try:
        fd = os.open(path, _NO_FOLLOW_READ)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(path, "is a symlink; ledger files must be regular files") from None
        if exc.errno == errno.ENXIO:  # a socket
            raise UnsafeFile(path, "is a special file, not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFile(path, f"is {file_kind(info.st_mode)}, not a regular file")
        if info.st_size > max_bytes:
            raise UnsafeFile(path, f"is {info.st_size} bytes; the limit is {max_bytes}")
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise UnsafeFile(path, f"grew past the limit of {max_bytes} bytes while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def plain_folder(
    base: Path,
    parts: tuple[str, ...] | list[str],
    create: bool = False,
    created: list[Path] | None = None,
) -> Path:
    """`base / parts...`, checking each component below `base` with lstat: it must be a
    real folder, never a symlink (not even to a folder) or a file. With `create`, missing
    folders are made (and listed in `created`). Raises UnsafeFile naming the first bad
    component, or FileNotFoundError when one is missing and `create` is false. `base`
    itself is trusted: it is the configured ledger folder, not something git brought."""
    path = base
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
                if created is not None:
                    created.append(path)
            mode = os.lstat(path).st_mode
        if not stat.S_ISDIR(mode):
            raise UnsafeFile(path, f"is {file_kind(mode)}, not a plain folder")
    return path


def utf8_name(name: str) -> bool:
    """Whether a name from os.listdir (surrogate escapes for undecodable bytes) is valid
    UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` (a path) as one printable line: undecodable bytes as \\xNN, control characters
    escaped. Names that are fine come back unchanged."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    out = raw.decode("utf-8", "backslashreplace")
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", out)


# --- durable writes -----------------------------------------------------------------------


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_tmp(tmp: Path, mode: int) -> int:
    """Open a temporary file for writing without following whatever sits at its name (a
    symlink or FIFO planted there is removed, never written through)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise
    os.unlink(tmp)
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a crash leaves either the old or the new file. If
    `path` is a symlink, the symlink itself is replaced, never its target."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = _open_tmp(tmp, mode)
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
