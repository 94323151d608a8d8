"""AMQP topic patterns: examples from the RabbitMQ tutorial and a reference matcher."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orxaq_autonomy.errors import BadInput
from orxaq_autonomy.patterns import Pattern, matches


def reference(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    """The AMQP definition, recursively: `#` takes zero or more segments, `*` exactly one."""

    @cache
    def go(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(key)
        token = pattern[i]
        if token == "#":
            return any(go(i + 1, k) for k in range(j, len(key) + 1))
        if j == len(key):
            return False
        return (token == "*" or token == key[j]) and go(i + 1, j + 1)

    return go(0, 0)


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("routing.route.requested", "routing.route.requested", True),
        ("routing.*", "routing.route.requested", False),
        ("routing.*.*", "routing.route.requested", True),
        ("routing.#", "routing.route.requested", True),
        ("routing.#", "routing", True),
        ("#", "scaling.decision.made", True),
        ("*.decision.*", "scaling.decision.made", True),
        ("#.made", "scaling.decision.made", True),
        ("scaling.#.made", "scaling.made", True),
        ("scaling.#.made", "scaling.decision.x.made", True),
        ("*", "scaling.decision", False),
        ("lanes.*", "lanes.lane.started", False),
        ("lanes.#.started", "lanes.lane.stopped", False),
    ],
)
def test_examples(pattern: str, key: str, expected: bool) -> None:
    assert matches(pattern, key) is expected


@pytest.mark.parametrize("bad", ["", "a..b", "Routing.#", "a.b*", "a.#x", "a b"])
def test_bad_patterns_are_refused(bad: str) -> None:
    with pytest.raises(BadInput, match="bad pattern"):
        Pattern(bad)


words = st.sampled_from(["a", "b", "c"])
tokens = st.lists(st.sampled_from(["a", "b", "c", "*", "#"]), min_size=1, max_size=7)
keys = st.lists(words, min_size=1, max_size=7)


@given(tokens, keys)
@settings(max_examples=2000)
def test_agrees_with_the_reference_matcher(pattern: list[str], key: list[str]) -> None:
    assert Pattern(".".join(pattern)).matches(".".join(key)) == reference(
        tuple(pattern), tuple(key)
    )


def test_many_hashes_do_not_backtrack_exponentially() -> None:
    pattern = Pattern(".".join(["#", "a"] * 30 + ["b"]))
    assert not pattern.matches(".".join(["a"] * 60))
