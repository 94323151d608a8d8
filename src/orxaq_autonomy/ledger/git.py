"""Taking a fetched branch without trusting it.

`git rebase` and `git checkout` write whatever the incoming commits hold: they silently
overwrite ignored files (a node's config, key, trust pins, log) and create symlinks. So
`mesh-sync` runs neither. It works with git's objects instead:

- `replay` puts this node's local commits on top of the fetched head in a private index,
  path by path (a rebase of trees, not of the work tree). A node writes only its own
  folder, so the ledger never clashes; a clash on another path refuses the round with
  nothing changed.
- `checkout` moves the work tree and the index from the old head to the new one itself.
  A path it must not write (node-private or ignored, a symlink or submodule, a name that
  is not clean UTF-8, an oversized blob, a path under a symlink) is refused: the work-tree
  file stays byte-identical, the index entry follows the commit with the skip-worktree
  bit set (so `git status` stays quiet and git itself never writes it either), and the
  path is reported. Everything else arrives, so one poisoned commit never stalls a node.

A journal in the git dir lets the next sync roll a killed checkout forward.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson

from ..errors import OperationFailed

ZERO = "0" * 40
MAX_BLOB_BYTES = 16 * 1024 * 1024  # a ledger file is at most 4 MiB: far beyond is hostile
JOURNAL = "orxaq-sync.json"
_DELETE = b"0 " + ZERO.encode() + b"\t"


class GitFailed(OperationFailed):
    """A git command failed; the message is git's own, on one line."""


@dataclass(frozen=True)
class Change:
    """One path that differs between two trees (`new_mode` 000000 when deleted)."""

    path: bytes
    old_mode: str
    new_mode: str
    old_sha: str
    new_sha: str

    @property
    def deleted(self) -> bool:
        return self.new_mode == "000000"

    @property
    def name(self) -> str:
        return printable(self.path)

    def index_line(self) -> bytes:
        if self.deleted:
            return _DELETE + self.path
        return f"{self.new_mode} {self.new_sha}\t".encode() + self.path


@dataclass(frozen=True)
class Refusal:
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


def printable(path: bytes) -> str:
    """A path for a message: bytes that are not UTF-8 or are control characters escaped."""
    text = path.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Git:
    """Git commands in one work tree, bytes in and out."""

    def __init__(self, top: Path, git_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.top = top
        self.git_dir = git_dir
        self.env = dict(env or {})

    def run(
        self,
        *args: str,
        data: bytes | None = None,
        env: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (0,),
    ) -> bytes:
        proc = subprocess.run(
            ["git", *args],
            cwd=self.top,
            input=data,
            capture_output=True,
            env={**os.environ, **self.env, **(env or {})},
        )
        if proc.returncode not in ok:
            text = (proc.stderr or proc.stdout).decode("utf-8", "replace")
            raise GitFailed(f"git {args[0]} failed: {' '.join(text.split())[:300]}")
        return proc.stdout

    def text(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        return self.run(*args, env=env).decode().strip()

    def tree_of(self, commit: str) -> str:
        return self.text("rev-parse", f"{commit}^{{tree}}")

    def is_ancestor(self, older: str, newer: str) -> bool:
        proc = subprocess.run(
            ["git", "merge-base", "--is-ancestor", older, newer],
            cwd=self.top,
            capture_output=True,
        )
        return proc.returncode == 0

    def diff(self, old: str, new: str, env: Mapping[str, str] | None = None) -> list[Change]:
        """Paths that differ between two tree-ish (a commit, a tree)."""
        out = self.run("diff-tree", "-r", "-z", "--no-renames", old, new, env=env)
        fields = out.split(b"\0")
        changes = []
        for i in range(0, len(fields) - 1, 2):
            meta = fields[i].decode().lstrip(":").split()
            changes.append(Change(fields[i + 1], meta[0], meta[1], meta[2], meta[3]))
        return changes

    def update_index(self, lines: list[bytes], env: Mapping[str, str] | None = None) -> None:
        if lines:
            self.run("update-index", "-z", "--index-info", data=b"\0".join(lines) + b"\0", env=env)

    def blob_sizes(self, shas: Iterable[str]) -> dict[str, int]:
        wanted = sorted(set(shas) - {ZERO})
        if not wanted:
            return {}
        out = self.run("cat-file", "--batch-check", data="\n".join(wanted).encode() + b"\n")
        sizes = {}
        for line in out.decode().splitlines():
            sha, _, size = line.split(" ")
            sizes[sha] = int(size)
        return sizes

    def blobs(self, shas: list[str]) -> Iterator[bytes]:
        """The content of each blob, in order, from one `git cat-file --batch`."""
        if not shas:
            return
        proc = subprocess.Popen(
            ["git", "cat-file", "--batch"],
            cwd=self.top,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **self.env},
        )
        assert proc.stdin is not None and proc.stdout is not None

        def feed(stdin: IO[bytes]) -> None:
            with contextlib.suppress(BrokenPipeError), stdin:
                stdin.write("".join(sha + "\n" for sha in shas).encode())

        writer = threading.Thread(target=feed, args=(proc.stdin,), daemon=True)
        writer.start()
        try:
            for sha in shas:
                header = proc.stdout.readline().split()
                if len(header) != 3 or header[1] != b"blob":
                    raise GitFailed(f"git cat-file: no blob {sha}")
                data = proc.stdout.read(int(header[2]))
                proc.stdout.read(1)  # the newline after each object
                yield data
        finally:
            proc.stdout.close()
            proc.kill()
            proc.wait()
            writer.join()

    def hash_files(self, paths: list[bytes]) -> list[str]:
        if not paths:
            return []
        data = b"".join(p + b"\n" for p in paths)
        return self.run("hash-object", "--no-filters", "--stdin-paths", data=data).decode().split()


# --- replay: our commits on top of theirs ------------------------------------------------


def replay(git: Git, old: str, theirs: str, own: tuple[bytes, ...]) -> str:
    """The commits of `old` that `theirs` lacks, made again on top of `theirs`; the new tip.

    Paths under `own` (this node's outbox folder and manifest) end as they are in `old`:
    no one else may write them, so a push that changed them is undone by our next commit.
    Another path that both sides changed differently is a clash: OperationFailed, and
    nothing but unreferenced objects was written."""
    base = git.text("merge-base", old, theirs)
    incoming = {c.path: c for c in git.diff(base, theirs)}
    commits = git.text("rev-list", "--reverse", "--topo-order", f"{theirs}..{old}").split()
    index = git.git_dir / "orxaq-sync.index"
    env = {"GIT_INDEX_FILE": str(index)}
    tip = theirs
    try:
        git.run("read-tree", theirs, env=env)
        for commit in commits:
            lines = []
            for change in git.diff(f"{commit}^", commit):
                if _is_own(change.path, own):
                    continue  # set from `old` below
                other = incoming.get(change.path)
                if other is not None and (other.new_mode, other.new_sha) != (
                    change.new_mode,
                    change.new_sha,
                ):
                    raise OperationFailed(
                        f"the remote changes {change.name}, which a local commit changes "
                        "too; resolve it with git, then sync again (nothing was changed)"
                    )
                lines.append(change.index_line())
            git.update_index(lines, env=env)
            _restore_own(git, commit, own, env)
            tree = git.text("write-tree", env=env)
            if tree != git.tree_of(tip):
                tip = _commit_like(git, commit, tree, tip)
        _restore_own(git, old, own, env)
        tree = git.text("write-tree", env=env)
        if tree != git.tree_of(tip):
            message = "mesh: restore this node's own ledger folder, changed by another writer"
            tip = git.text("commit-tree", tree, "-p", tip, "-m", message)
    finally:
        index.unlink(missing_ok=True)
    return tip


def _is_own(path: bytes, own: tuple[bytes, ...]) -> bool:
    return any(path == p or path.startswith(p + b"/") for p in own)


def _restore_own(git: Git, commit: str, own: tuple[bytes, ...], env: dict[str, str]) -> None:
    """Make the index's `own` paths exactly those of `commit`, once `commit` has any (a
    node that never committed its folder takes what is there: its export then refuses to
    go on if the ledger holds more of it than its log)."""
    specs = [":(literal)" + p.decode("utf-8", "surrogateescape") for p in own]
    have = {
        line.split(b"\t", 1)[1]: line.split(b"\t", 1)[0]
        for line in git.run("ls-files", "-z", "-s", "--", *specs, env=env).split(b"\0")
        if line
    }
    want = {
        line.split(b"\t", 1)[1]: line.split(b"\t", 1)[0]
        for line in git.run("ls-tree", "-r", "-z", "--full-tree", commit, "--", *specs).split(b"\0")
        if line
    }
    if not want:
        return
    lines = [_DELETE + path for path in have if path not in want]
    for path, meta in want.items():
        mode, _, sha = meta.split(b" ")  # ls-tree: "<mode> blob <sha>"
        if have.get(path, b"").split(b" ")[:2] != [mode, sha]:  # ls-files: "<mode> <sha> 0"
            lines.append(mode + b" " + sha + b"\t" + path)
    git.update_index(lines, env=env)


def _commit_like(git: Git, commit: str, tree: str, parent: str) -> str:
    """A commit of `tree` on `parent`, with the author and message of `commit`."""
    name, email, date, message = (
        git.run("log", "-1", "--format=%an%x00%ae%x00%aI%x00%B", commit).decode().split("\0", 3)
    )
    author = {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_AUTHOR_DATE": date}
    return (
        git.run("commit-tree", tree, "-p", parent, "-F", "-", data=message.encode(), env=author)
        .decode()
        .strip()
    )


# --- checkout: the work tree from one commit to the next ---------------------------------


def checkout(
    git: Git, branch: str, old: str, new: str, refuse: Callable[[list[bytes]], dict[bytes, str]]
) -> list[Refusal]:
    """Move `branch` (checked out, at `old`) to `new`, updating the index and the work tree
    path by path. `refuse(paths)` names the paths that must not be written (node-private,
    ignored) with the reason. A local change in the way is a clash: OperationFailed,
    nothing changed. The journal makes a killed run finish on the next call."""
    journal = git.git_dir / JOURNAL
    _write_journal(journal, {"branch": branch, "old": old, "new": new})
    refusals = _apply(git, old, new, refuse)
    git.run(
        "update-ref", "-m", "mesh-sync: take the fetched ledger", f"refs/heads/{branch}", new, old
    )
    journal.unlink(missing_ok=True)
    return refusals


def resume(git: Git, refuse: Callable[[list[bytes]], dict[bytes, str]]) -> list[Refusal] | None:
    """Finish a checkout that was killed; None when there was none."""
    journal = git.git_dir / JOURNAL
    try:
        state = orjson.loads(journal.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError:
        journal.unlink()
        return None
    ref = f"refs/heads/{state['branch']}"
    current = git.run("rev-parse", "--verify", "--quiet", ref, ok=(0, 1)).decode().strip()
    refusals: list[Refusal] = []
    if current in (state["old"], state["new"]):
        refusals = _apply(git, current, state["new"], refuse)
        if current == state["old"]:
            git.run("update-ref", ref, state["new"], state["old"])
    journal.unlink(missing_ok=True)
    return refusals


def _write_journal(path: Path, data: dict[str, str]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(orjson.dumps(data))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _apply(
    git: Git,
    old: str,
    new: str,
    refuse: Callable[[list[bytes]], dict[bytes, str]],
) -> list[Refusal]:
    """The work tree and index from `old` to `new`. Each work-tree file must be at either
    end already (a killed run left some at `new`), so running it twice is harmless."""
    changes = git.diff(old, new) if old != new else []
    refused = _refusals(git, changes, refuse)
    writable = [c for c in changes if c.path not in refused]
    clashes = _clashes(git, writable)
    if clashes:
        raise OperationFailed(
            f"the remote changes {', '.join(printable(p) for p in clashes[:3])}, which you "
            "have changed locally; commit or stash that work, then sync again "
            "(nothing was changed)"
        )
    for change in writable:
        if change.deleted:
            _remove(git.top, change.path)
    written = [c for c in writable if not c.deleted]
    for change, data in zip(written, git.blobs([c.new_sha for c in written]), strict=True):
        _write(git.top, change, data)
    git.update_index([c.index_line() for c in changes])
    skip = [c.path for c in changes if c.path in refused and not c.deleted]
    if skip:
        git.run("update-index", "-z", "--skip-worktree", "--stdin", data=b"\0".join(skip) + b"\0")
    git.run("update-index", "-q", "--refresh", ok=(0, 1))  # stat data, so status stays fast
    return [Refusal(printable(path), reason) for path, reason in sorted(refused.items())]


def _refusals(
    git: Git, changes: list[Change], refuse: Callable[[list[bytes]], dict[bytes, str]]
) -> dict[bytes, str]:
    refused = dict(refuse([c.path for c in changes]))
    sizes = git.blob_sizes(c.new_sha for c in changes if c.new_mode.startswith("100"))
    for change in changes:
        if change.path in refused:
            continue
        reason = _unsafe(git.top, change, sizes)
        if reason is not None:
            refused[change.path] = reason
    return refused


def _unsafe(top: Path, change: Change, sizes: dict[str, int]) -> str | None:
    try:
        name = change.path.decode("utf-8")
    except UnicodeDecodeError:
        return "its name is not valid UTF-8"
    if not name.isprintable():
        return "its name holds control characters"
    parts = name.split("/")
    if any(part in ("", ".", "..") or part.lower() == ".git" for part in parts):
        return "its path leaves the work tree or enters .git"
    if change.new_mode == "120000":
        return "is a symlink; symlinks are never checked out"
    if change.new_mode == "160000":
        return "is a submodule; submodules are never checked out"
    if sizes.get(change.new_sha, 0) > MAX_BLOB_BYTES:
        return f"is {sizes[change.new_sha]} bytes; the limit is {MAX_BLOB_BYTES}"
    parent = top
    for part in parts[:-1]:
        parent = parent / part
        try:
            mode = os.lstat(parent).st_mode
        except FileNotFoundError:
            break
        if not stat.S_ISDIR(mode):
            return f"{part} in its path is not a plain folder here"
    return None


def _clashes(git: Git, changes: list[Change]) -> list[bytes]:
    """Paths whose work-tree content is neither the old nor the new version."""
    present: list[Change] = []
    clashes: list[bytes] = []
    for change in changes:
        full = git.top / os.fsdecode(change.path)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            continue  # absent: fine whether it was deleted locally or is new
        if not stat.S_ISREG(st.st_mode):
            clashes.append(change.path)
        else:
            present.append(change)
    hashes = git.hash_files([c.path for c in present])
    for change, sha in zip(present, hashes, strict=True):
        if sha not in (change.old_sha, change.new_sha):
            clashes.append(change.path)
    return clashes


def _remove(top: Path, path: bytes) -> None:
    full = top / os.fsdecode(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(full)
    parent = full.parent
    while parent != top:
        try:
            parent.rmdir()  # only an empty folder goes
        except OSError:
            break
        parent = parent.parent


def _write(top: Path, change: Change, data: bytes) -> None:
    full = top / os.fsdecode(change.path)
    full.parent.mkdir(parents=True, exist_ok=True)
    tmp = full.with_name(f".{full.name}.orxaq-tmp")
    mode = 0o777 if change.new_mode == "100755" else 0o666  # less the umask, as git does
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, full)
