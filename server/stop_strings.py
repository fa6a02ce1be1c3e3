"""Stop strings over a stream of text deltas (for engines that only stop on tokens).

`StopStringMatcher.feed` takes each new piece of text and returns what may be shown now
and whether a stop string was hit. It holds back the last `len(longest stop) - 1`
characters, so a stop string split across deltas is never partly emitted; the matched
stop string itself is never emitted (OpenAI semantics). `flush` releases the held-back
tail once the stream ends without a hit. Pure logic, no I/O.
"""

from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    """Finds the first stop string in streamed text.

    Args:
        stops: the stop strings (non-empty strings).
    """

    def __init__(self, stops: Sequence[str]):
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = tuple(stops)
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.hit = False

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; returns (text safe to emit now, whether a stop string ended the output)."""
        if self.hit:
            return "", True
        buf = self._pending + text
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            self._pending = ""
            return buf[: min(found)], True
        if self._hold == 0 or not self.stops:
            self._pending = ""
            return buf, False
        cut = max(len(buf) - self._hold, 0)
        self._pending = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """The held-back tail, once no more text will come."""
        out, self._pending = self._pending, ""
        return "" if self.hit else out
