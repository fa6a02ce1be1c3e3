"""Stop strings across streamed deltas."""

from __future__ import annotations

import pytest

from smolora.server.stop_strings import StopStringMatcher


def _run(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopStringMatcher(stops)
    out, hit = "", False
    for p in pieces:
        text, hit = m.feed(p)
        out += text
        if hit:
            return out, True
    return out + m.flush(), False


@pytest.mark.parametrize("stops,pieces,expected", [
    (["END"], ["a b ", "c E", "ND d"], ("a b c ", True)),
    (["END"], ["a b c"], ("a b c", False)),
    ([".", "\n"], ["one", " two.", " three"], ("one two", True)),
    (["xyz"], ["xy"], ("xy", False)),
    ([], ["no", " stops"], ("no stops", False)),
    (["ab", "b"], ["cab"], ("c", True)),
])
def test_stop_strings(stops: list[str], pieces: list[str], expected: tuple[str, bool]) -> None:
    assert _run(stops, pieces) == expected


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher([""])
