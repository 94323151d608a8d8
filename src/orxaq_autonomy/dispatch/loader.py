"""Which handlers run: the built-in chain, the lanes, the webhooks and the modules the
config names."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import BadInput
from ..handlers import Binding
from ..store.fsutil import atomic_write_json, read_json

if TYPE_CHECKING:
    from ..config import Config


def bindings_in(module: ModuleType) -> list[Binding]:
    found = [getattr(obj, "__orxaq_handler__", None) for obj in vars(module).values()]
    return [b for b in found if isinstance(b, Binding)]


def _import(spec: str, root: Path) -> ModuleType:
    if spec.endswith(".py"):
        path = (root / spec).resolve()
        if not path.is_relative_to(root):
            raise BadInput(f"handler module {spec} escapes the root {root}")
        name = f"orxaq_user_handlers_{abs(hash(str(path)))}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None or not path.exists():
            raise BadInput(f"handler module {spec}: no such file {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def load_bindings(
    config: Config,
    root: Path,
    broken: dict[str, str] | None = None,
    modules: dict[str, list[str]] | None = None,
) -> list[Binding]:
    """The built-in chain, then the handlers in the modules the config names. With
    `broken`, a module that fails to load is named there with the reason instead of
    stopping everything (the dispatcher pauses its handlers: `pause_broken`); `modules`
    gets the handler names each loaded module defines."""
    from . import builtin, lanes, tasks
    from .forward import forward_bindings

    bindings = bindings_in(builtin) + bindings_in(lanes) + bindings_in(tasks)
    for spec in config.handlers:
        try:
            try:
                module = _import(spec, root)
            except BadInput:
                raise
            except Exception as exc:
                raise BadInput(f"cannot load handler module {spec}: {exc}") from None
            found = bindings_in(module)
            if not found:
                raise BadInput(f"handler module {spec} defines no @handler functions")
        except BadInput as exc:
            if broken is None:
                raise
            broken[spec] = exc.message
            continue
        if modules is not None:
            modules[spec] = [b.name for b in found]
        bindings.extend(found)
    bindings.extend(forward_bindings(config.forward))
    names = [b.name for b in bindings]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BadInput(f"two handlers are named {dupes[0]!r}; pass name= to tell them apart")
    return bindings


# --- handler modules that fail to load ----------------------------------------------------

PAUSE_PREFIX = "module:"  # the dispatcher's `lagging` entry of a module that failed to load
BROKEN_FILE = "handler_modules_broken.json"
_logger = logging.getLogger("orxaq_autonomy")


def pause_broken(
    lagging: dict[str, int],
    offset: int,
    broken: dict[str, str],
    modules: dict[str, list[str]],
    state_dir: Path,
) -> None:
    """User code never stops the rest: a module that fails to load is paused at `offset`
    (a `lagging` entry `module:<spec>`, which the dispatcher leaves alone), so the events
    that arrive meanwhile wait for it. Once it loads again, each of its handlers resumes
    from there through the dispatcher's catch-up. The reasons go to `BROKEN_FILE` for
    mesh-status, and to a warning."""
    for spec in broken:
        lagging.setdefault(PAUSE_PREFIX + spec, offset)
    for key in [k for k in lagging if k.startswith(PAUSE_PREFIX)]:
        spec = key.removeprefix(PAUSE_PREFIX)
        if spec in modules:
            start = lagging.pop(key)
            for name in modules[spec]:
                lagging.setdefault(name, start)
        elif spec not in broken:
            del lagging[key]  # no longer configured
    path = state_dir / BROKEN_FILE
    try:
        recorded = read_json(path)
    except FileNotFoundError:
        recorded = None
    except ValueError:
        recorded = {}
    if broken and recorded != broken:
        atomic_write_json(path, broken)
    elif not broken and recorded is not None:
        path.unlink(missing_ok=True)
    for message in broken.values():
        _logger.warning(
            "%s: its handlers are paused (their events wait for them); the other handlers "
            "and mesh-sync go on. Fix the module and its handlers catch up.",
            message,
        )


def broken_modules(state_dir: Path) -> dict[str, str]:
    """The handler modules that failed to load at the last dispatch, with the reason."""
    try:
        return dict(read_json(state_dir / BROKEN_FILE))
    except (FileNotFoundError, ValueError):
        return {}
