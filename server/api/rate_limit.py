"""Per-API-key rate limits: requests per minute and tokens per minute (token buckets).

Each client key (the API key it presented, or its address when the server has no keys)
gets two buckets, each holding one minute's worth and refilling continuously:
- requests: a chat request takes one; an empty bucket refuses it with 429
  `rate_limit_exceeded` and a `Retry-After` of the seconds until one is back;
- tokens: a request's prompt + completion tokens are charged when it ends (they are not
  known before); a key whose bucket is in debt is refused until it has refilled above
  zero, and `Retry-After` says when.
Checks happen before the request is admitted, so a refused request costs nothing. Keys
are stored as a short hash, never in clear, and the table keeps at most `max_keys`
clients (the least recently seen is forgotten first).

It does not authenticate (`auth.py` does) and does not limit admin or health endpoints.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from smolora.server.api.errors import RateLimitError


@dataclass
class TokenBucket:
    """A bucket of `capacity` holding `level`, refilled at `rate_per_s` (may go negative)."""

    capacity: float
    rate_per_s: float
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def seconds_until(self, level: float) -> float:
        """Seconds until the bucket holds `level` (0 when it already does)."""
        return max(0.0, (level - self.level) / self.rate_per_s)


class RateLimiter:
    """Requests/min and tokens/min per client key.

    Args:
        requests_per_min: requests allowed per minute per key; None = unlimited.
        tokens_per_min: prompt + completion tokens per minute per key; None = unlimited.
        max_keys: most client keys remembered.
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        requests_per_min: float | None,
        tokens_per_min: float | None,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.requests_per_min = requests_per_min
        self.tokens_per_min = tokens_per_min
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[TokenBucket | None, TokenBucket | None]] = (
            OrderedDict()
        )

    @property
    def enabled(self) -> bool:
        return self.requests_per_min is not None or self.tokens_per_min is not None

    @staticmethod
    def client_key(api_key: str | None, address: str | None) -> str:
        """The bucket key of a client: a hash of its API key, else its address."""
        if api_key:
            return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:16]
        return f"addr:{address or 'unknown'}"

    def _get(self, key: str, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        pair = self._buckets.get(key)
        if pair is None:
            pair = (
                None
                if self.requests_per_min is None
                else TokenBucket(
                    self.requests_per_min, self.requests_per_min / 60, self.requests_per_min, now
                ),
                None
                if self.tokens_per_min is None
                else TokenBucket(
                    self.tokens_per_min, self.tokens_per_min / 60, self.tokens_per_min, now
                ),
            )
            self._buckets[key] = pair
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        for bucket in pair:
            if bucket is not None:
                bucket.refill(now)
        return pair

    def check(self, key: str) -> None:
        """Take one request from `key`'s bucket, or refuse.

        Raises:
            RateLimitError: 429 `rate_limit_exceeded` with `Retry-After`.
        """
        if not self.enabled:
            return
        now = self.clock()
        requests, tokens = self._get(key, now)
        if tokens is not None and tokens.level <= 0:
            wait = _retry_after(tokens.seconds_until(1.0))
            raise RateLimitError(
                f"this API key used more than its {self.tokens_per_min:g} tokens per minute; "
                f"retry after {wait}s",
                retry_after_s=wait,
                code="rate_limit_exceeded",
                param="tokens_per_minute",
            )
        if requests is not None:
            if requests.level < 1:
                wait = _retry_after(requests.seconds_until(1.0))
                raise RateLimitError(
                    f"this API key sent more than its {self.requests_per_min:g} requests per "
                    f"minute; retry after {wait}s",
                    retry_after_s=wait,
                    code="rate_limit_exceeded",
                    param="requests_per_minute",
                )
            requests.level -= 1

    def charge_tokens(self, key: str, count: int) -> None:
        """Charge a finished request's prompt + completion tokens to `key`."""
        if self.tokens_per_min is None or count <= 0:
            return
        _, tokens = self._get(key, self.clock())
        assert tokens is not None
        tokens.level -= count


def _retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))
