"""The node's durable, append-only event log (NDJSON) and its tail index.

One mechanism gives atomic batches, crash recovery and constant-cost appends:

- Lines are appended to `events.ndjson` and fsynced under an exclusive file lock.
- Then one SQLite transaction commits the new tail (`log_size`, clock, per-node seq and
  last id) together with the idempotency keys. That commit is the commit point of the
  batch: `publish` reports success only after it.
- The id index (event id -> byte offset, causation) is a projection of the log with its
  own cursor (`indexed_size`): lookups first index the committed lines past the cursor.
  Appends stay free of per-event index writes, and no lookup ever re-reads old lines.
- Bytes past the committed `log_size` can only come from a writer that died before its
  commit (a torn line, or a whole unacknowledged batch). Readers simply stop at
  `log_size`; the next writer, under the lock, moves them to `quarantine/` and truncates
  the log back (and logs a warning saying so), so a batch is all-or-none and a torn line
  is never merged with the next event. Reading never moves, truncates or quarantines
  anything: at most it rebuilds the index, which is a cache of the log.

Nothing here reads the whole log except `rebuild`, which runs only when the index is
missing or does not belong to the log (for example a restored backup).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from ..envelope import Draft, Envelope, InvalidEnvelope, now_timestamp, parse_envelope, seal
from ..errors import BadInput, OperationFailed, UnknownEvent
from .fsutil import FileLock, fsync_dir
from .legacy import is_legacy_log, refuse_message

_logger = logging.getLogger("orxaq_autonomy")

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE tail (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    log_size INTEGER NOT NULL,     -- committed bytes of the log
    last_offset INTEGER NOT NULL,  -- start of the last committed line
    last_event_id TEXT,            -- the id on that line: proves the log is the indexed one
    clock INTEGER NOT NULL,        -- highest Lamport clock in the log
    count INTEGER NOT NULL,
    quarantined INTEGER NOT NULL,  -- uncommitted tails moved to quarantine/
    indexed_size INTEGER NOT NULL  -- the events table covers the log up to here
);
INSERT INTO tail VALUES (1, 0, 0, NULL, 0, 0, 0, 0);
CREATE TABLE events (
    id BLOB PRIMARY KEY,           -- the 32 raw bytes behind evt_<hex>
    offset INTEGER NOT NULL,
    causation BLOB
) WITHOUT ROWID;
CREATE INDEX events_causation ON events (causation) WHERE causation IS NOT NULL;
CREATE TABLE nodes (
    node TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    last_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE idempotency (
    node TEXT NOT NULL,
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (node, tenant, key)
) WITHOUT ROWID;
"""

_READ_CHUNK = 1 << 20
_LOOKUP_CHUNK = 500  # drafts whose idempotency keys are looked up in one query
_WRITE_CHUNK = 4 << 20  # large batches go out in bounded write() calls
_INDEX_CHUNK = 5000  # id index rows stored per transaction when catching up


@dataclass(frozen=True)
class Tail:
    log_size: int
    last_offset: int
    last_event_id: str | None
    clock: int
    count: int
    quarantined: int


class Appended(NamedTuple):
    """The outcome for one draft: a new event, or the earlier one its idempotency key names."""

    event_id: str
    seq: int
    duplicate: bool
    envelope: Envelope | None = None  # None for duplicates


def _id_bytes(event_id: str) -> bytes:
    return bytes.fromhex(event_id[4:])


def _quarantine_name(offset: int) -> str:
    stamp = now_timestamp().replace("-", "").replace(":", "").replace(".", "")
    return f"log-{stamp}-at-{offset}.ndjson"


class EventLog:
    """Append-only NDJSON log plus its SQLite tail index. Safe across processes."""

    def __init__(self, path: Path, index_path: Path, lock_path: Path, quarantine_dir: Path):
        self.path = path
        self.index_path = index_path
        self.lock_path = lock_path
        self.quarantine_dir = quarantine_dir
        self._db: sqlite3.Connection | None = None
        self._lock_depth = 0

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The log lock, re-entrant within this object: opening the index may rebuild it,
        which needs the lock the caller may already hold (flock would block on itself)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        with FileLock(self.lock_path):
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0

    # --- index ------------------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.index_path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.index_path, isolation_level=None, timeout=60)
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA cache_size=-65536")  # 64 MiB: large batches stay in memory
            if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                with self.locked():
                    if db.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                        db.execute("PRAGMA journal_mode=WAL")
                        db.executescript(
                            f"BEGIN; {_SCHEMA} PRAGMA user_version={_SCHEMA_VERSION}; COMMIT;"
                        )
                        self._db = db
                        if self._file_size() > 0:
                            # a log that predates this index; a torn tail stays for a writer
                            self.rebuild(repair=False)
            self._db = db
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _tail(self) -> Tail:
        row = self.db.execute(
            "SELECT log_size, last_offset, last_event_id, clock, count, quarantined FROM tail"
        ).fetchone()
        return Tail(*row)

    def _file_size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def _last_line_matches(self, tail: Tail) -> bool:
        if tail.count == 0:
            return tail.log_size == 0
        try:
            with open(self.path, "rb") as fh:
                fh.seek(tail.last_offset)
                line = fh.read(tail.log_size - tail.last_offset)
            return bool(orjson.loads(line).get("event_id") == tail.last_event_id)
        except (OSError, orjson.JSONDecodeError, AttributeError):
            return False

    # --- consistency ------------------------------------------------------------------

    def committed(self) -> Tail:
        """The committed tail, for reading: bytes past it (a writer that died before its
        commit, or one still writing) are left where they are for the next writer. Only an
        index that does not belong to the log is rebuilt (the index is a cache)."""
        tail = self._tail()
        if self._file_size() >= tail.log_size and self._last_line_matches(tail):
            if tail.log_size == 0 and self._file_size() > 0:
                self._refuse_legacy()
            return tail
        with self.locked():
            tail = self._tail()
            if self._file_size() >= tail.log_size and self._last_line_matches(tail):
                return tail
            return self.rebuild(repair=False)

    def _refuse_legacy(self) -> None:
        """An orxaq-ops log is never read as this format, nor quarantined as a torn tail."""
        if is_legacy_log(self.path):
            raise BadInput(refuse_message(self.path))

    def _recover(self) -> Tail:
        """Bring log and index into agreement before a write. Caller holds the lock."""
        tail = self._tail()
        size = self._file_size()
        if size < tail.log_size or not self._last_line_matches(tail):
            return self.rebuild()
        if size > tail.log_size:
            if tail.log_size == 0:
                self._refuse_legacy()
            self._quarantine_from(tail.log_size, size)
            self.db.execute("UPDATE tail SET quarantined = quarantined + 1")
            tail = self._tail()
        return tail

    def _quarantine_from(self, offset: int, size: int) -> None:
        """Move the uncommitted bytes [offset, size) to quarantine/ and truncate the log."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = self.quarantine_dir / _quarantine_name(offset)
        with open(self.path, "rb") as src:
            src.seek(offset)
            data = src.read(size - offset)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.quarantine_dir)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        _logger.warning(
            "repaired %s: moved %d uncommitted bytes (a writer that died before its commit) "
            "from byte %d to %s",
            self.path,
            size - offset,
            offset,
            target,
        )

    def rebuild(self, repair: bool = True) -> Tail:
        """Re-index the whole log. Caller holds the lock. Used only when the index is lost.
        With `repair=False` (a reader) a torn tail is left in place, past `log_size`."""
        size = self._file_size()
        good_size = size
        count = 0
        nodes: dict[str, tuple[int, str]] = {}
        idem: list[tuple[str, str, str, str, int]] = []
        clock = 0
        last_offset, last_id = 0, None
        for offset, line in self.iter_lines(0, size):
            if not line.endswith(b"\n"):
                good_size = offset  # a torn last line: quarantined below
                break
            try:
                env = parse_envelope(line[:-1])
            except InvalidEnvelope as exc:
                if offset == 0:
                    self._refuse_legacy()
                raise OperationFailed(
                    f"log {self.path} is corrupt at byte {offset}: {exc.message}; "
                    "move it aside to start a new one"
                ) from None
            count += 1
            nodes[env["node_id"]] = (env["seq"], env["event_id"])
            if "idempotency_key" in env:
                idem.append(_idem_row(env))
            clock = max(clock, env["clock"])
            last_offset, last_id = offset, env["event_id"]
        db = self.db
        tail = self._tail()
        with self._transaction():
            db.execute("DELETE FROM events")
            db.execute("DELETE FROM nodes")
            db.execute("DELETE FROM idempotency")
            db.executemany(
                "INSERT INTO nodes VALUES (?,?,?)", [(n, s, i) for n, (s, i) in nodes.items()]
            )
            db.executemany("INSERT OR IGNORE INTO idempotency VALUES (?,?,?,?,?)", idem)
            torn = repair and good_size < size
            quarantined = tail.quarantined + (1 if torn else 0)
            db.execute(
                "UPDATE tail SET log_size=?, last_offset=?, last_event_id=?, clock=?, count=?, "
                "quarantined=?, indexed_size=0",
                (good_size, last_offset, last_id, clock, count, quarantined),
            )
            if torn:
                self._quarantine_from(good_size, size)
        return self._tail()

    # --- appending --------------------------------------------------------------------

    def append(
        self,
        drafts: Iterable[Draft],
        node_id: str,
        keep_envelopes: bool = True,
        signer: Callable[[], Callable[[str], str]] | None = None,
    ) -> list[Appended]:
        """Seal and append `drafts` as `node_id`'s next events: all of them, or none.

        `drafts` may be a lazy iterable that validates as it goes (it is consumed under the
        lock, so it should not wait on I/O): if it raises, nothing has been written. With
        `keep_envelopes=False` a large batch keeps only its log bytes and index rows.
        """
        gc_was_enabled = gc.isenabled()
        gc.disable()  # a batch allocates ~10 objects per event and frees none until the end
        try:
            with self.locked():
                return self._append_locked(drafts, node_id, keep_envelopes, signer)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _append_locked(
        self,
        drafts: Iterable[Draft],
        node_id: str,
        keep_envelopes: bool,
        signer_factory: Callable[[], Callable[[str], str]] | None,
    ) -> list[Appended]:
        tail = self._recover()
        signer = signer_factory() if signer_factory is not None else None
        db = self.db
        row = db.execute(
            "SELECT last_seq, last_id FROM nodes WHERE node = ?", (node_id,)
        ).fetchone()
        seq, prev = (row[0], row[1]) if row else (0, None)
        clock = tail.clock
        timestamp = now_timestamp()
        results: list[Appended] = []
        buffer = bytearray()
        appended = 0
        idem_rows: list[tuple[str, str, str, str, int]] = []
        batch_keys: dict[tuple[str, str], Appended] = {}
        offset = last_offset = tail.log_size
        for chunk in _chunks(drafts, _LOOKUP_CHUNK):
            keyed = [(d.tenant or "", d.idempotency_key) for d in chunk if d.idempotency_key]
            batch_keys.update(self._idempotent_hits(node_id, keyed))
            for draft in chunk:
                if draft.idempotency_key is not None:
                    key = (draft.tenant or "", draft.idempotency_key)
                    earlier = batch_keys.get(key)
                    if earlier is not None:
                        results.append(earlier)
                        continue
                seq += 1
                clock += 1
                env, line = seal(
                    draft,
                    node_id=node_id,
                    seq=seq,
                    prev=prev,
                    clock=clock,
                    timestamp=timestamp,
                    signer=signer,
                )
                prev = env["event_id"]
                appended += 1
                if draft.idempotency_key is not None:
                    idem_rows.append(_idem_row(env))
                    batch_keys[key] = Appended(prev, seq, True)
                buffer += line
                buffer += b"\n"
                last_offset = offset
                offset += len(line) + 1
                results.append(Appended(prev, seq, False, env if keep_envelopes else None))
        if not appended:
            return results
        self._write(buffer, tail.log_size)
        with self._transaction():
            db.executemany("INSERT INTO idempotency VALUES (?,?,?,?,?)", idem_rows)
            db.execute("INSERT OR REPLACE INTO nodes VALUES (?,?,?)", (node_id, seq, prev))
            db.execute(
                "UPDATE tail SET log_size=?, last_offset=?, last_event_id=?, clock=?, "
                "count=count+?",
                (offset, last_offset, prev, clock, appended),
            )
        return results

    def _idempotent_hits(
        self, node_id: str, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], Appended]:
        """The earlier events for any of `keys`, in one query per tenant."""
        found: dict[tuple[str, str], Appended] = {}
        by_tenant: dict[str, list[str]] = {}
        for tenant, key in keys:
            by_tenant.setdefault(tenant, []).append(key)
        for tenant, names in by_tenant.items():
            marks = ",".join("?" * len(names))
            for key, event_id, seq in self.db.execute(
                "SELECT key, event_id, seq FROM idempotency "
                f"WHERE node=? AND tenant=? AND key IN ({marks})",
                (node_id, tenant, *names),
            ):
                found[(tenant, key)] = Appended(event_id, seq, True)
        return found

    def append_sealed(self, envelopes: Iterable[Envelope]) -> list[tuple[Envelope, str]]:
        """Append events other nodes authored (already verified), each only if it extends
        its author's chain here: seq = last seq + 1 and prev = last id. Returns the events
        that did not, with the reason; an event the log already holds is skipped silently."""
        refused: list[tuple[Envelope, str]] = []
        with self.locked():
            tail = self._recover()
            db = self.db
            heads: dict[str, tuple[int, str | None]] = {}
            buffer = bytearray()
            idem_rows: list[tuple[str, str, str, str, int]] = []
            clock, offset, last_offset, last_id = tail.clock, tail.log_size, 0, None
            index_rows: list[tuple[bytes, int, bytes | None]] = []
            for env in envelopes:
                node = env["node_id"]
                if node not in heads:
                    row = db.execute(
                        "SELECT last_seq, last_id FROM nodes WHERE node = ?", (node,)
                    ).fetchone()
                    heads[node] = (row[0], row[1]) if row else (0, None)
                seq, prev = heads[node]
                if env["seq"] <= seq:
                    continue  # already here (or a fork, which the caller checks)
                if env["seq"] != seq + 1 or env.get("prev") != prev:
                    refused.append((env, f"does not extend {node}'s chain at seq {seq}"))
                    continue
                line = orjson.dumps(env, option=orjson.OPT_SORT_KEYS)
                buffer += line
                buffer += b"\n"
                heads[node] = (env["seq"], env["event_id"])
                clock = max(clock, env["clock"])
                if "idempotency_key" in env:
                    idem_rows.append(_idem_row(env))
                index_rows.append(_index_row(env, offset))
                last_offset, last_id = offset, env["event_id"]
                offset += len(line) + 1
            if not buffer:
                return refused
            self._write(buffer, tail.log_size)
            count = buffer.count(b"\n")
            with self._transaction():
                db.executemany("INSERT OR IGNORE INTO idempotency VALUES (?,?,?,?,?)", idem_rows)
                # Imports already pay for verification; when the id index is current, keep
                # it current here rather than have the next lookup read these lines again.
                if db.execute("SELECT indexed_size FROM tail").fetchone()[0] == tail.log_size:
                    db.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?)", index_rows)
                    db.execute("UPDATE tail SET indexed_size = ?", (offset,))
                db.executemany(
                    "INSERT OR REPLACE INTO nodes VALUES (?,?,?)",
                    [(node, seq, last) for node, (seq, last) in heads.items() if last],
                )
                db.execute(
                    "UPDATE tail SET log_size=?, last_offset=?, last_event_id=?, clock=?, "
                    "count=count+?",
                    (offset, last_offset, last_id, clock, count),
                )
        return refused

    def idempotent_hit(self, node_id: str, key: tuple[str, str]) -> Appended | None:
        """The event `node_id` published earlier under (tenant, idempotency key), if any."""
        return self._idempotent_hits(node_id, [key]).get(key)

    def _write(self, data: bytes | bytearray, expected_size: int) -> None:
        created = not self.path.exists()
        if created:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(fd, view[:_WRITE_CHUNK]) :]
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, expected_size)  # leave no partial batch behind
                raise OperationFailed(f"could not append to {self.path}: {exc}") from None
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)

    # --- reading ----------------------------------------------------------------------

    def iter_lines(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(offset, line) for lines in [start, end); the last may lack its newline."""
        if end <= start:
            return
        with open(self.path, "rb") as fh:
            fh.seek(start)
            pos, rest = start, b""
            while pos < end:
                chunk = fh.read(min(_READ_CHUNK, end - pos))
                if not chunk:
                    break
                pos += len(chunk)
                data = rest + chunk
                begin = 0
                base = pos - len(data)
                while True:
                    nl = data.find(b"\n", begin)
                    if nl < 0:
                        break
                    yield base + begin, data[begin : nl + 1]
                    begin = nl + 1
                rest = data[begin:]
            if rest:
                yield pos - len(rest), rest

    def iter_events(self, start: int = 0, end: int | None = None) -> Iterator[Envelope]:
        """Committed events in arrival order, from byte `start`."""
        stop = self.committed().log_size if end is None else end
        for _, line in self.iter_lines(start, stop):
            yield orjson.loads(line)

    def iter_events_reverse(self, end: int | None = None) -> Iterator[Envelope]:
        """Committed events newest first, reading backwards: cost grows with what is taken."""
        pos = self.committed().log_size if end is None else end
        with open(self.path, "rb") as fh:
            carry = b""  # the head of a line that starts in an earlier chunk
            while pos > 0:
                step = min(_READ_CHUNK, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + carry
                if pos > 0:
                    cut = data.find(b"\n") + 1
                    if cut == 0:
                        carry = data
                        continue
                    carry, data = data[:cut], data[cut:]
                for line in reversed(data.split(b"\n")):
                    if line:
                        yield orjson.loads(line)

    def find_legacy(self, legacy_id: str) -> Envelope | None:
        """The event migrated from orxaq-ops with this old id (a byte search of the log:
        only `mesh-trace` asks, for links that crossed nodes before the migration)."""
        needle = b'"legacy_id":"' + legacy_id.encode() + b'"'
        for _, line in self.iter_lines(0, self.committed().log_size):
            if needle in line:
                found: Envelope = orjson.loads(line)
                return found
        return None

    def read_at(self, offset: int) -> Envelope:
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            line = fh.readline()
        result: Envelope = orjson.loads(line)
        return result

    # --- the id index -----------------------------------------------------------------

    def _pending_index(self) -> tuple[int, int, list[tuple[bytes, int, bytes | None]]]:
        """Index rows for the committed lines past `indexed_size`, not yet stored."""
        start = self.db.execute("SELECT indexed_size FROM tail").fetchone()[0]
        end = self.committed().log_size
        rows = [_index_row(orjson.loads(line), off) for off, line in self.iter_lines(start, end)]
        return start, end, rows

    def _store_index(self, end: int, rows: list[tuple[bytes, int, bytes | None]]) -> None:
        """Store caught-up rows. SQLite's write lock serialises two processes doing this;
        the one that finds the cursor moved leaves it alone. A long backlog goes in chunks,
        each its own transaction, so that appends (which need the same lock) are held up
        for one chunk at a time, not for the whole backlog."""
        db = self.db
        for first in range(0, len(rows), _INDEX_CHUNK):
            chunk = rows[first : first + _INDEX_CHUNK]
            chunk_start = chunk[0][1]
            chunk_end = rows[first + _INDEX_CHUNK][1] if first + _INDEX_CHUNK < len(rows) else end
            with self._transaction():
                if db.execute("SELECT indexed_size FROM tail").fetchone()[0] != chunk_start:
                    return  # another process stored these
                db.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?)", chunk)
                db.execute("UPDATE tail SET indexed_size = ?", (chunk_end,))

    def _index_up_to_date(self) -> None:
        _, end, rows = self._pending_index()
        self._store_index(end, rows)

    # --- lookups ----------------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """The full event id for an id or a unique prefix (`evt_3fa9`, `3fa9`)."""
        digits = ref[4:] if ref.startswith("evt_") else ref
        if not 1 <= len(digits) <= 64 or any(c not in "0123456789abcdef" for c in digits):
            raise BadInput(f"bad event id {ref!r}: need evt_ and up to 64 lower-case hex digits")
        low = bytes.fromhex(digits.ljust(64, "0"))
        high = bytes.fromhex(digits.ljust(64, "f"))
        # A failed lookup must change no file, so the index catches up only on success.
        _, end, pending = self._pending_index()
        found = {
            bytes(row[0])
            for row in self.db.execute(
                "SELECT id FROM events WHERE id BETWEEN ? AND ? LIMIT 2", (low, high)
            )
        }
        found.update(row[0] for row in pending if low <= row[0] <= high)
        if not found:
            raise UnknownEvent(f"unknown event id {ref!r}")
        if len(found) > 1:
            raise BadInput(f"ambiguous event id prefix {ref!r}: give more digits")
        self._store_index(end, pending)
        return "evt_" + found.pop().hex()

    def get(self, event_id: str) -> Envelope | None:
        self._index_up_to_date()
        row = self.db.execute(
            "SELECT offset FROM events WHERE id = ?", (_id_bytes(event_id),)
        ).fetchone()
        return None if row is None else self.read_at(row[0])

    def end_of(self, event_id: str) -> int | None:
        """The byte offset just past `event_id`'s line, or None if the log lacks it."""
        self._index_up_to_date()
        row = self.db.execute(
            "SELECT offset FROM events WHERE id = ?", (_id_bytes(event_id),)
        ).fetchone()
        if row is None:
            return None
        with open(self.path, "rb") as fh:
            fh.seek(row[0])
            return int(row[0]) + len(fh.readline())

    def followups_of(self, event_id: str) -> list[Envelope]:
        """The events whose causation_id is `event_id`, in log order."""
        self._index_up_to_date()
        offsets = [
            row[0]
            for row in self.db.execute(
                "SELECT offset FROM events WHERE causation = ? ORDER BY offset",
                (_id_bytes(event_id),),
            )
        ]
        return [self.read_at(offset) for offset in offsets]

    def contains(self, event_id: str) -> bool:
        self._index_up_to_date()
        return (
            self.db.execute("SELECT 1 FROM events WHERE id = ?", (_id_bytes(event_id),)).fetchone()
            is not None
        )

    def node_heads(self) -> dict[str, dict[str, Any]]:
        """Per authoring node: the last seq and event id this log holds."""
        self.committed()
        return {
            node: {"seq": seq, "event_id": last_id}
            for node, seq, last_id in self.db.execute(
                "SELECT node, last_seq, last_id FROM nodes ORDER BY node"
            )
        }


def _chunks(items: Iterable[Draft], size: int) -> Iterator[list[Draft]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _index_row(env: Envelope, offset: int) -> tuple[bytes, int, bytes | None]:
    cause = env.get("causation_id")
    return (_id_bytes(env["event_id"]), offset, None if cause is None else _id_bytes(cause))


def _idem_row(env: Envelope) -> tuple[str, str, str, str, int]:
    return (
        env["node_id"],
        env.get("tenant", ""),
        env["idempotency_key"],
        env["event_id"],
        env["seq"],
    )
