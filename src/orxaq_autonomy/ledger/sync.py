"""`mesh-sync`: one round of pull, import, dispatch, export, commit, push.

Git is driven through GitPython and gitwork.py, and commits only ever hold this node's
own ledger paths: its outbox folder and its manifest. So unrelated work in the same
repository (edited, staged or untracked) is never committed, and two nodes never touch
the same file, which makes their commits replay onto each other without conflicts by
construction. The pull never runs `git rebase` or `git checkout`: gitwork.py replays our
commits onto the fetched head with git's objects and moves the work tree itself, refusing
to write node-private, ignored or unsafe paths (reported in `refused_paths`). A clash
elsewhere refuses the round and leaves the repository as it was.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..envelope import now_timestamp
from ..errors import BadInput, OperationFailed
from ..store.fsutil import FileLock, atomic_write_json, read_json
from ..store.node import Node
from ..store.paths import Layout
from . import git as gitwork
from .export import export_events
from .files import Progress, no_progress
from .git import Git
from .importer import import_events

if TYPE_CHECKING:
    from git import Repo

STALE_INDEX_LOCK_SECONDS = 60  # git holds index.lock for moments; older is a killed git
_REJECTED_MARKS = (
    "[rejected]",
    "non-fast-forward",
    "fetch first",
    "failed to update ref",
    "cannot lock ref",
    "stale info",
)


@dataclass
class SyncReport:
    skipped: bool = False
    remote: str | None = None
    branch: str | None = None
    pulled: bool = False  # the remote was reached and our branch is on top of it
    imported: int = 0
    rejected: list[dict[str, str]] = field(default_factory=list)
    waiting: int = 0
    legacy: dict[str, int] = field(default_factory=dict)  # orxaq-ops files awaiting migration
    dispatched: int = 0
    followups: int = 0
    exported: int = 0
    committed: bool = False
    commit: str | None = None
    pushed: bool = False
    push_pending: bool = False
    retries: int = 0
    offline_reason: str | None = None
    refused_paths: list[dict[str, str]] = field(default_factory=list)  # incoming, not written
    handler_files_changed: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def sync_state(mesh: Node) -> dict[str, Any]:
    try:
        return dict(read_json(mesh.layout.state_dir / "sync.json"))
    except FileNotFoundError:
        return {}


def _open_repo(path: Path) -> Repo | None:
    """The git work tree that holds `path` (the ledger: it may live in another checkout
    than the root), found from its nearest existing folder."""
    from git import InvalidGitRepositoryError, NoSuchPathError, Repo

    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return Repo(path, search_parent_directories=True)
    except (InvalidGitRepositoryError, NoSuchPathError):
        return None


def _remote(repo: Repo) -> str | None:
    names = [r.name for r in repo.remotes]
    if not names:
        return None
    try:
        tracking = repo.active_branch.tracking_branch()
    except TypeError:
        tracking = None
    if tracking is not None and tracking.remote_name in names:
        return str(tracking.remote_name)
    return "origin" if "origin" in names else names[0]


class Syncer:
    def __init__(
        self,
        mesh: Node,
        progress: Progress = no_progress,
        backoff_seconds: float = 0.2,
        backoff_max_seconds: float = 10.0,
    ) -> None:
        self.mesh = mesh
        self.layout = mesh.layout
        self.progress = progress
        self.backoff = backoff_seconds
        self.backoff_max = backoff_max_seconds

    # --- the round --------------------------------------------------------------------

    def run(self, push: bool = True, max_retries: int = 5, wait: bool = False) -> SyncReport:
        if max_retries < 0:
            raise BadInput(f"bad --max-retries {max_retries}: need 0 or more")
        lock = FileLock(self.layout.locks_dir / "sync.lock", timeout=3600)
        if not lock.acquire(blocking=wait):
            return SyncReport(skipped=True)
        try:
            report = self._run(push, max_retries)
        finally:
            lock.release()
        return report

    def _run(self, push: bool, max_retries: int) -> SyncReport:
        from ..dispatch.dispatcher import Dispatcher

        report = SyncReport()
        repo = _open_repo(self.layout.ledger_dir)
        if repo is None and push:
            raise BadInput(
                f"{self.layout.root} is not in a git work tree: clone the coordination "
                "repository (or git init), or sync with --no-push"
            )
        if repo is not None:
            self._check_repo(repo, report)
            report.remote = _remote(repo)
            report.branch = repo.active_branch.name
            if report.remote is not None:
                self._pull(repo, report)
        imported = import_events(self.mesh, progress=self.progress)
        report.imported = imported.imported
        report.rejected = [p.as_dict() for p in imported.rejected]
        report.waiting = imported.waiting
        report.legacy = imported.legacy
        dispatched = Dispatcher(self.mesh).run(wait=True)
        report.dispatched = dispatched.events
        report.followups = dispatched.followups
        exported = export_events(self.mesh, progress=self.progress)
        report.exported = exported.exported
        if repo is not None:
            self._commit(repo, report, exported.first_seq, exported.last_seq)
            if report.remote is not None and push and report.pulled:
                self._push(repo, report, max_retries)
            report.push_pending = self._ahead(repo, report) > 0
        atomic_write_json(
            self.layout.state_dir / "sync.json",
            {
                "last_sync": now_timestamp(),
                "remote": report.remote,
                "pushed": report.pushed,
                "push_pending": report.push_pending,
                "commit": report.commit,
                "offline_reason": report.offline_reason,
                "refused_paths": report.refused_paths,
                "handler_files_changed": report.handler_files_changed,
            },
        )
        return report

    # --- git --------------------------------------------------------------------------

    def _ledger_paths(self, repo: Repo) -> list[str]:
        top = Path(str(repo.working_tree_dir)).resolve()
        paths = [
            self.layout.outbox_dir(self.mesh.node_id),
            self.layout.manifest_file(self.mesh.node_id),
        ]
        return [p.relative_to(top).as_posix() for p in paths]

    def _check_repo(self, repo: Repo, report: SyncReport) -> None:
        self._repair(repo, report)
        if repo.head.is_detached:
            raise BadInput(f"{repo.working_tree_dir} has a detached HEAD: check out a branch")
        top = Path(str(repo.working_tree_dir)).resolve()
        if not self.layout.ledger_dir.resolve().is_relative_to(top):
            raise BadInput(f"the ledger {self.layout.ledger_dir} is outside the work tree {top}")

    def _git(self, repo: Repo) -> Git:
        return Git(Path(str(repo.working_tree_dir)).resolve(), Path(str(repo.git_dir)))

    def _repair(self, repo: Repo, report: SyncReport) -> None:
        """Finish or undo what a killed sync (or an older version's rebase) left behind.
        We hold the sync lock, so no other sync is half-way through."""
        from git import GitCommandError

        git_dir = Path(str(repo.git_dir))
        if (git_dir / "rebase-merge").exists() or (git_dir / "rebase-apply").exists():
            try:
                repo.git.rebase("--abort")
            except GitCommandError:
                repo.git.rebase("--quit")
            report.repaired.append("aborted an interrupted rebase")
        lock = git_dir / "index.lock"
        with contextlib.suppress(FileNotFoundError):
            if time.time() - lock.stat().st_mtime > STALE_INDEX_LOCK_SECONDS:
                lock.unlink()
                report.repaired.append("removed a stale .git/index.lock")
        refusals = gitwork.resume(self._git(repo), self._refuse)
        if refusals is not None:
            report.repaired.append("finished an interrupted pull")
            report.refused_paths.extend(r.as_dict() for r in refusals)

    def _fetch(self, repo: Repo, report: SyncReport) -> bool:
        from git import GitCommandError

        try:
            repo.git.fetch(report.remote, kill_after_timeout=120)
        except GitCommandError as exc:
            report.offline_reason = _one_line(exc)
            return False
        return True

    def _remote_ref(self, repo: Repo, report: SyncReport) -> str | None:
        ref = f"{report.remote}/{report.branch}"
        return ref if ref in {r.name for r in repo.remote(str(report.remote)).refs} else None

    def _pull(self, repo: Repo, report: SyncReport) -> None:
        if not self._fetch(repo, report):
            return
        ref = self._remote_ref(repo, report)
        if ref is not None:
            if not repo.head.is_valid():
                raise BadInput(
                    f"{repo.working_tree_dir} has no commit yet but {ref} exists: "
                    f"clone the coordination repository instead of git init"
                )
            self._take(repo, ref, report)
        report.pulled = True

    def _take(self, repo: Repo, ref: str, report: SyncReport) -> None:
        """Put our commits on top of `ref` and bring the work tree along, without letting
        the incoming commits write anything they must not (see gitwork.py)."""
        git = self._git(repo)
        old = git.text("rev-parse", "HEAD")
        theirs = git.text("rev-parse", f"{ref}^{{commit}}")
        if git.is_ancestor(theirs, old):
            return  # nothing new
        top = git.top
        own = tuple(
            os.fsencode(p.resolve().relative_to(top).as_posix())
            for p in (
                self.layout.outbox_dir(self.mesh.node_id),
                self.layout.manifest_file(self.mesh.node_id),
            )
        )
        new = gitwork.replay(git, old, theirs, own)
        handlers = self._handler_files(top)
        changed = {c.path for c in git.diff(old, new)}
        report.handler_files_changed.extend(
            gitwork.printable(p) for p in sorted(changed & handlers)
        )
        refusals = gitwork.checkout(git, str(report.branch), old, new, self._refuse)
        report.refused_paths.extend(r.as_dict() for r in refusals)

    def _refuse(self, paths: list[bytes]) -> dict[bytes, str]:
        """Incoming paths that belong to this node alone: its state, its log, and whatever
        its .gitignore ignores (as it stands before the pull)."""
        repo = _open_repo(self.layout.ledger_dir)
        assert repo is not None
        git = self._git(repo)
        private = [
            os.fsencode(p.resolve().relative_to(git.top).as_posix())
            for p in self.layout.private_paths
            if p.resolve().is_relative_to(git.top)
        ]
        refused: dict[bytes, str] = {}
        rest: list[bytes] = []
        for path in paths:
            if any(path == p or path.startswith(p + b"/") for p in private):
                refused[path] = "is a node-private path; a pull never writes it"
            elif b"\n" not in path:
                rest.append(path)
        if rest:
            out = git.run(
                "check-ignore",
                "--no-index",
                "-z",
                "--stdin",
                data=b"\0".join(rest) + b"\0",
                ok=(0, 1),
            )
            for path in out.split(b"\0"):
                if path:
                    refused[path] = "is ignored here (.gitignore); a pull never writes it"
        return refused

    def _handler_files(self, top: Path) -> set[bytes]:
        """Configured handler modules given as files, relative to the work tree."""
        from ..config import load_config

        try:
            handlers = load_config(self.layout.state_dir / "config.toml").handlers
        except BadInput:
            return set()
        found = set()
        for name in handlers:
            if name.endswith(".py"):
                path = (self.layout.root / name).resolve()
                if path.is_relative_to(top):
                    found.add(os.fsencode(path.relative_to(top).as_posix()))
        return found

    def _commit(self, repo: Repo, report: SyncReport, first: int | None, last: int | None) -> None:
        from git import GitCommandError

        paths = self._ledger_paths(repo)
        top = Path(str(repo.working_tree_dir))
        existing = [p for p in paths if _holds_a_file(top / p)]
        if not existing:
            return
        repo.git.add("-A", "--", *existing)
        try:
            repo.git.diff("--cached", "--quiet", "--", *existing)
            return  # nothing of ours changed
        except GitCommandError:
            pass
        node = self.mesh.node_id
        if first is not None and last is not None:
            count = last - first + 1
            span = f"seq {first}" if count == 1 else f"seq {first}-{last}"
            message = f"mesh: {node} exported {span} ({count} event{'s' * (count != 1)})"
        else:
            message = f"mesh: {node} manifest"
        env = {}
        reader = repo.config_reader()
        if not reader.has_option("user", "name") or not reader.has_option("user", "email"):
            env = {
                "GIT_AUTHOR_NAME": node,
                "GIT_AUTHOR_EMAIL": f"{node}@orxaq-mesh.invalid",
                "GIT_COMMITTER_NAME": node,
                "GIT_COMMITTER_EMAIL": f"{node}@orxaq-mesh.invalid",
            }
        with repo.git.custom_environment(**env):
            repo.git.commit("--no-verify", "-m", message, "--only", "--", *existing)
        report.committed = True
        report.commit = repo.head.commit.hexsha

    def _push(self, repo: Repo, report: SyncReport, max_retries: int) -> None:
        from git import GitCommandError

        if self._ahead(repo, report) == 0:
            report.pushed = True  # nothing to push: the remote has everything
            return
        for attempt in range(max_retries + 1):
            try:
                repo.git.push(
                    report.remote, f"HEAD:refs/heads/{report.branch}", kill_after_timeout=120
                )
                report.pushed = True
                return
            except GitCommandError as exc:
                text = f"{exc.stderr} {exc.stdout}"
                if not any(mark in text for mark in _REJECTED_MARKS):
                    report.offline_reason = _one_line(exc)
                    return
            if attempt == max_retries:
                break
            report.retries += 1
            delay = min(self.backoff * 2**attempt, self.backoff_max)
            time.sleep(delay * random.uniform(0.5, 1.5))
            if not self._fetch(repo, report):
                return
            ref = self._remote_ref(repo, report)
            if ref is not None:
                self._take(repo, ref, report)
        raise OperationFailed(
            f"push to {report.remote} still rejected after {max_retries} retries; "
            "the commit is kept locally and the next mesh-sync pushes it"
        )

    def _ahead(self, repo: Repo, report: SyncReport) -> int:
        if report.remote is None or not repo.head.is_valid():
            return 0
        ref = self._remote_ref(repo, report)
        if ref is None:
            return int(repo.git.rev_list("--count", "HEAD"))
        return int(repo.git.rev_list("--count", f"{ref}..HEAD"))


def changed_since(
    root: Path, ledger_dir: Path, rev: str
) -> tuple[dict[str, str], Callable[[str], dict[str, Any] | None]]:
    """Ledger paths (relative to `root`) changed since `rev`, with their git status letter,
    and a reader of a node's manifest as it was at `rev` (None if it had none)."""
    from git import GitCommandError

    repo = _open_repo(root)
    if repo is None:
        raise BadInput(f"--since needs a git work tree; {root} is not in one")
    top = Path(str(repo.working_tree_dir)).resolve()
    if rev.startswith("-"):
        raise BadInput(f"bad --since {rev!r}: a revision cannot start with '-'")
    try:
        commit = repo.git.rev_parse("--verify", "--end-of-options", f"{rev}^{{commit}}")
        out = repo.git.diff(
            "-z",
            "--name-status",
            "--no-renames",
            commit,
            "--",
            ledger_dir.resolve().relative_to(top).as_posix(),
            stdout_as_string=False,
        )
    except GitCommandError as exc:
        raise BadInput(f"bad --since {rev!r}: {_one_line(exc)}") from None
    changed: dict[str, str] = {}
    fields = out.split(b"\0")
    prefix = root.resolve().relative_to(top).as_posix().encode() if root.resolve() != top else b""
    for status, raw in zip(fields[0::2], fields[1::2], strict=False):
        if prefix and raw.startswith(prefix + b"/"):
            raw = raw[len(prefix) + 1 :]
        try:
            path = raw.decode("ascii")
            plain = path.isprintable()
        except UnicodeDecodeError:
            plain = False
        # a name that is not plain ASCII is quoted, as git prints it: no ledger name is
        changed[path if plain else f'"{gitwork.printable(raw)}"'] = status.decode()
    nodes_dir = (ledger_dir / "nodes").resolve().relative_to(top).as_posix()

    def base_manifest(node: str) -> dict[str, Any] | None:
        try:
            data = orjson.loads(repo.git.show(f"{commit}:{nodes_dir}/{node}.json"))
        except (GitCommandError, orjson.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    return changed, base_manifest


def tracked_private_files(layout: Layout) -> list[str]:
    """Node-private files that the git repository around the root tracks: on a fresh
    clone, they came from the remote (a config naming a handler, a key, pins)."""
    repo = _open_repo(layout.ledger_dir)
    if repo is None or not repo.head.is_valid():
        return []
    top = Path(str(repo.working_tree_dir)).resolve()
    specs = [
        ":(literal)" + p.resolve().relative_to(top).as_posix()
        for p in layout.private_paths
        if p.resolve().is_relative_to(top)
    ]
    if not specs:
        return []
    out = Git(top, Path(str(repo.git_dir))).run("ls-files", "-z", "-t", "--", *specs)
    # -t tags skip-worktree entries with S: those a sync already refused to write
    return [gitwork.printable(entry[2:]) for entry in out.split(b"\0") if entry[:2] == b"H "]


def _holds_a_file(path: Path) -> bool:
    """A file, or a folder with a file somewhere in it (git knows no empty folders)."""
    if path.is_file():
        return True
    return any(files for _, _, files in os.walk(path))


def _one_line(exc: Exception) -> str:
    text = str(getattr(exc, "stderr", "") or exc).strip()
    text = text.removeprefix("stderr:").strip().strip("'")
    return " ".join(text.split())[:300]
