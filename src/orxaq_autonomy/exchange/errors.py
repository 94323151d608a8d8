"""Errors of the exchange, with the CLI's exit codes."""

from __future__ import annotations

from ..errors import BadInput, OperationFailed


class NeverConnected(OperationFailed):
    """`mesh-listen` ran until `--for` ended without reaching the server (exit 1)."""


class BadMessage(BadInput):
    """A stream message that is not one valid event: refused and reported, never fatal."""
