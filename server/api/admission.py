"""Admission control: a bounded number of engine requests in flight, a bounded FIFO wait.

A chat completion with `n` choices takes `n` slots, before any of its expensive work
(image decoding, embedding, tokenization) starts, and holds them until its response
ends. When all slots are busy a request waits in FIFO order; when the wait queue is full
it is refused at once with 429 and `Retry-After`, and a request that waited longer than
the queue timeout gets 503 (on shutdown, `refuse_waiting` ends every waiting request with
503 `shutting_down`). The running and waiting counts feed the
`smolora_num_requests_running/_waiting` gauges.

It does not schedule inside the engine (vLLM does); it keeps the server's memory and
latency bounded when more requests arrive than the engine can take.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from smolora.server.api.errors import APIError, RateLimitError, ServiceUnavailableError
from smolora.server.metrics import Metrics


class AdmissionController:
    """Counts slots in flight and queues the overflow.

    Args:
        max_running: slots in flight at once.
        max_waiting: requests allowed to wait; 0 refuses whenever all slots are busy.
        queue_timeout_s: longest wait before a 503.
        retry_after_s: the `Retry-After` header value of 429/503 answers.
        metrics: gauges to keep current.
    """

    def __init__(
        self,
        max_running: int,
        max_waiting: int,
        queue_timeout_s: float,
        retry_after_s: int,
        metrics: Metrics | None = None,
    ):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.running = 0
        self._queue: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self.running)
            self.metrics.waiting.set(self.waiting)

    async def acquire(self, slots: int = 1) -> float:
        """Take `slots` slots, waiting in FIFO order if needed.

        Returns:
            Seconds waited.

        Raises:
            RateLimitError: the wait queue is full.
            ServiceUnavailableError: waited longer than the queue timeout.
        """
        if slots > self.max_running:
            raise ValueError(f"a request needs {slots} slots but only {self.max_running} exist")
        if not self._queue and self.running + slots <= self.max_running:
            self.running += slots
            self._publish()
            return 0.0
        if len(self._queue) >= self.max_waiting:
            raise RateLimitError(
                f"the server is at capacity ({self.running} running, {self.waiting} waiting); "
                f"retry after {self.retry_after_s}s",
                retry_after_s=self.retry_after_s,
            )
        t0 = time.perf_counter()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (slots, fut)
        self._queue.append(entry)
        self._publish()
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout_s)
        except APIError:  # refused while waiting (`refuse_waiting`): it holds no slot
            if entry in self._queue:
                self._queue.remove(entry)
            self._publish()
            raise
        except BaseException as exc:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Granted just as we gave up: hand the slots back.
                self.release(slots)
            else:
                fut.cancel()
                if entry in self._queue:
                    self._queue.remove(entry)
                self._grant()
            self._publish()
            if isinstance(exc, TimeoutError):
                raise ServiceUnavailableError(
                    f"the request waited {self.queue_timeout_s:g}s for capacity; "
                    f"retry after {self.retry_after_s}s",
                    retry_after_s=self.retry_after_s,
                    code="queue_timeout",
                ) from None
            raise
        self._publish()
        return time.perf_counter() - t0

    def release(self, slots: int = 1) -> None:
        """Give back slots taken by `acquire`."""
        self.running -= slots
        self._grant()
        self._publish()

    def refuse_waiting(self, reason: str) -> int:
        """End every waiting request with a 503 `shutting_down` (they never get a slot).

        Returns:
            How many were waiting.
        """
        refused = 0
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.set_exception(
                    ServiceUnavailableError(
                        f"{reason}; retry after {self.retry_after_s}s "
                        "(another replica may serve it)",
                        retry_after_s=self.retry_after_s,
                        code="shutting_down",
                    )
                )
                refused += 1
        self._publish()
        return refused

    def _grant(self) -> None:
        while self._queue and self.running + self._queue[0][0] <= self.max_running:
            slots, fut = self._queue.popleft()
            if fut.cancelled():
                continue
            self.running += slots
            fut.set_result(None)

    @asynccontextmanager
    async def slot(self, slots: int = 1) -> AsyncIterator[float]:
        """`async with admission.slot(n) as waited:` takes and always returns the slots."""
        waited = await self.acquire(slots)
        try:
            yield waited
        finally:
            self.release(slots)
