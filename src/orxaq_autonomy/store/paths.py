"""Where everything lives under a root, with the orxaq-ops environment overrides."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInput
from .fsutil import printable

ENV_ROOT = "ORXAQ_AUTONOMY_ROOT"
ENV_NODE_ID = "ORXAQ_AUTONOMY_NODE_ID"
ENV_LOG_FILE = "ORXAQ_AUTONOMY_EVENT_MESH_FILE"
ENV_STATE_DIR = "ORXAQ_AUTONOMY_EVENT_MESH_STATE_DIR"
ENV_LEDGER_DIR = "ORXAQ_AUTONOMY_GITHUB_COORDINATION_DIR"

DEFAULT_LOG_FILE = Path("artifacts/autonomy/event_mesh/events.ndjson")
DEFAULT_STATE_DIR = Path("state/event_mesh")
DEFAULT_LEDGER_DIR = Path("state/github_coordination/event_mesh")


@dataclass(frozen=True)
class Layout:
    """Every path the mesh reads or writes for one root."""

    root: Path
    log_file: Path
    state_dir: Path
    ledger_dir: Path  # the git-tracked coordination folder (outbox/, nodes/)

    @property
    def node_file(self) -> Path:
        return self.state_dir / "node.json"

    @property
    def index_file(self) -> Path:
        return self.state_dir / "log_index.sqlite3"

    @property
    def keys_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def private_key_file(self) -> Path:
        return self.keys_dir / "ed25519.key"

    @property
    def locks_dir(self) -> Path:
        return self.state_dir / "locks"

    @property
    def log_lock(self) -> Path:
        return self.locks_dir / "log.lock"

    @property
    def quarantine_dir(self) -> Path:
        return self.state_dir / "quarantine"

    @property
    def outbox_root(self) -> Path:
        return self.ledger_dir / "outbox"

    @property
    def nodes_dir(self) -> Path:
        return self.ledger_dir / "nodes"

    def outbox_dir(self, node_id: str) -> Path:
        return self.outbox_root / node_id

    def manifest_file(self, node_id: str) -> Path:
        return self.nodes_dir / f"{node_id}.json"

    @property
    def private_paths(self) -> tuple[Path, ...]:
        """What belongs to this node alone and never comes from git: its state folder and
        its log (the log's folder, as mesh-init's .gitignore has it)."""
        log = self.log_file
        return (self.state_dir, log if log.parent == self.root else log.parent)

    def relative(self, path: Path) -> str:
        """`path` relative to the root, as one printable line: a name that arrived through
        git may hold bytes that are not UTF-8 (shown as \\xNN) or control characters. A path
        outside the root (an override naming another checkout) is shown whole."""
        shown = path.relative_to(self.root) if path.is_relative_to(self.root) else path
        return printable(shown.as_posix())


def resolve_root(root: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path:
    raw = root if root is not None else env.get(ENV_ROOT) or os.getcwd()
    return Path(raw).expanduser().resolve()


def _inside(root: Path, raw: str | None, default: Path, variable: str) -> Path:
    """An override: an absolute path is taken as it is (a ledger in another checkout, state
    on another disk, as orxaq-ops allowed); a relative one is taken from the root and must
    stay inside it."""
    if not raw:
        return root / default
    given = Path(raw).expanduser()
    if given.is_absolute():
        return given.resolve()
    path = (root / given).resolve()
    if not path.is_relative_to(root):
        raise BadInput(f"{variable}={raw} escapes the root {root}; give an absolute path")
    return path


def resolve_layout(
    root: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Layout:
    """The layout for `root` (else $ORXAQ_AUTONOMY_ROOT, else the current directory)."""
    env = os.environ if env is None else env
    base = resolve_root(root, env)
    layout = Layout(
        root=base,
        log_file=_inside(base, env.get(ENV_LOG_FILE), DEFAULT_LOG_FILE, ENV_LOG_FILE),
        state_dir=_inside(base, env.get(ENV_STATE_DIR), DEFAULT_STATE_DIR, ENV_STATE_DIR),
        ledger_dir=_inside(base, env.get(ENV_LEDGER_DIR), DEFAULT_LEDGER_DIR, ENV_LEDGER_DIR),
    )
    if layout.state_dir == base:
        raise BadInput(f"{ENV_STATE_DIR} must be a folder inside the root, not the root itself")
    if layout.log_file.is_dir():
        raise BadInput(f"the log {layout.log_file} is a directory; point {ENV_LOG_FILE} at a file")
    return layout


def resolve_input_file(layout: Layout, raw: str) -> Path:
    """A file the user names as input (`--payload-file`): anywhere the user can read; a
    relative path is taken from the root."""
    return (layout.root / Path(raw).expanduser()).resolve()
