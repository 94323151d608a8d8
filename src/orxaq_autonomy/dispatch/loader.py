"""Which handlers run: the built-in chain, the lanes, the webhooks and the modules the
config names."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import BadInput
from ..handlers import Binding

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


def load_bindings(config: Config, root: Path) -> list[Binding]:
    """The built-in chain, then the handlers in the modules the config names."""
    from . import builtin, lanes
    from .forward import forward_bindings

    bindings = bindings_in(builtin) + bindings_in(lanes)
    for spec in config.handlers:
        try:
            module = _import(spec, root)
        except BadInput:
            raise
        except Exception as exc:
            raise BadInput(f"cannot load handler module {spec}: {exc}") from None
        found = bindings_in(module)
        if not found:
            raise BadInput(f"handler module {spec} defines no @handler functions")
        bindings.extend(found)
    bindings.extend(forward_bindings(config.forward))
    names = [b.name for b in bindings]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BadInput(f"two handlers are named {dupes[0]!r}; pass name= to tell them apart")
    return bindings
