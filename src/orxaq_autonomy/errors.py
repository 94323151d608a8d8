"""Errors that carry the SPEC's exit codes, so the CLI maps them without guessing."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # an operation failed (e.g. push still rejected after retries)
EXIT_BAD_INPUT = 2  # bad input or usage; nothing was written
EXIT_PARTIAL = 3  # done, but some items were rejected or quarantined


class MeshError(Exception):
    """Base error: a one-line message and the exit code the CLI returns for it."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(MeshError):
    """The caller gave something invalid. Raised before any file is changed."""

    exit_code = EXIT_BAD_INPUT


class EventTooLarge(BadInput):
    """An event that would serialise to more than MAX_EVENT_BYTES."""


class UnknownEvent(BadInput):
    """No event has this id (or id prefix)."""


class NotInitialised(BadInput):
    """The root has no node identity yet."""


class OperationFailed(MeshError):
    """The input was fine but the operation could not be completed."""

    exit_code = EXIT_FAILED
