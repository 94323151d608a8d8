"""A fleet of real git clones around a real bare remote, for sync tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from orxaq_autonomy import Mesh


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def make_remote(base: Path) -> Path:
    """A bare repository whose main branch has one commit (as a hosted repo would)."""
    remote = base / "remote.git"
    git(base, "init", "-q", "--bare", "-b", "main", str(remote))
    seed = base / "seed"
    git(base, "clone", "-q", str(remote), str(seed))
    git(seed, "config", "user.name", "seed")
    git(seed, "config", "user.email", "seed@example.invalid")
    (seed / "README.md").write_text("coordination repo\n")
    git(seed, "add", "README.md")
    git(seed, "commit", "-q", "-m", "init")
    git(seed, "push", "-q", "origin", "HEAD:main")
    return remote


def add_node(base: Path, remote: Path, name: str) -> Path:
    root = base / name
    git(base, "clone", "-q", "-b", "main", str(remote), str(root))
    git(root, "config", "user.name", name)
    git(root, "config", "user.email", f"{name}@example.invalid")
    Mesh.init(root, node_id=name)
    return root


def event_ids(root: Path) -> list[str]:
    with Mesh.open(root) as mesh:
        return [e["event_id"] for e in mesh.log.iter_events()]
