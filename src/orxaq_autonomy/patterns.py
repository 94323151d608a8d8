"""AMQP topic patterns over routing keys (`topic.event_type`).

`*` matches exactly one segment, `#` matches zero or more. Matching walks the set of
reachable key positions token by token, so it is O(tokens x segments) for any pattern;
a regex translation of `#` backtracks exponentially on patterns like `#.a.#.a.#.b`.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .errors import BadInput

SEGMENT_RE = re.compile(r"[a-z0-9_-]+")


class Pattern:
    """A compiled topic pattern; `Pattern("routing.#").matches("routing.route.requested")`."""

    __slots__ = ("_exact", "text", "tokens")

    def __init__(self, text: str) -> None:
        tokens = text.split(".")
        for token in tokens:
            if token not in ("*", "#") and not SEGMENT_RE.fullmatch(token):
                raise BadInput(
                    f"bad pattern {text!r}: segment {token!r} must be '*', '#' or [a-z0-9_-]+"
                )
        # Adjacent '#' tokens are equivalent to one; collapsing keeps the walk small.
        collapsed: list[str] = []
        for token in tokens:
            if not (token == "#" and collapsed and collapsed[-1] == "#"):
                collapsed.append(token)
        self.text = text
        self.tokens: tuple[str, ...] = tuple(collapsed)
        self._exact = "*" not in self.tokens and "#" not in self.tokens

    def matches(self, routing_key: str) -> bool:
        if self._exact:
            return routing_key == self.text
        return match_segments(self.tokens, routing_key.split("."))

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"


def match_segments(tokens: tuple[str, ...] | list[str], segments: list[str]) -> bool:
    n = len(segments)
    positions = {0}
    for token in tokens:
        if token == "#":
            positions = set(range(min(positions), n + 1))
        elif token == "*":
            positions = {p + 1 for p in positions if p < n}
        else:
            positions = {p + 1 for p in positions if p < n and segments[p] == token}
        if not positions:
            return False
    return n in positions


@lru_cache(maxsize=256)
def compile_pattern(text: str) -> Pattern:
    return Pattern(text)


def matches(pattern: str, routing_key: str) -> bool:
    """True when `routing_key` matches the AMQP topic `pattern`."""
    return compile_pattern(pattern).matches(routing_key)
