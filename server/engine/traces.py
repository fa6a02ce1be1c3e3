"""Batched fetching of routing traces from the worker.

Requests that finish close together share one `collective_rpc`: a caller awaits
`TraceCollector.fetch(key)`; while one RPC is in flight, later keys queue up and go out
together in the next one. With 16 requests finishing in the same step, that is one RPC, not
sixteen -- which is what keeps traces cheap enough to be on by default.

It does not render traces for users (the raw dicts become `RequestTrace` in `engine.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

FetchFn = Callable[[list[int]], Awaitable[dict[Any, Any]]]


class TraceCollector:
    """Coalesces per-request trace fetches into batched RPCs.

    Args:
        fetch_many: one RPC for many keys; returns key -> raw trace (or None).
        max_batch: most keys per RPC.
    """

    def __init__(self, fetch_many: FetchFn, max_batch: int = 256) -> None:
        self._fetch_many = fetch_many
        self._max_batch = max_batch
        self._pending: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.rpc_count = 0

    async def fetch(self, key: int) -> dict[str, Any] | None:
        """The raw trace of request `key` (None if the worker has none)."""
        fut: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._pending:
            keys = list(self._pending)[: self._max_batch]
            futs = [self._pending.pop(k) for k in keys]
            self.rpc_count += 1
            try:
                result = await self._fetch_many(keys)
            except Exception as e:  # deliver the failure to every waiter
                for f in futs:
                    if not f.done():
                        f.set_exception(e)
                continue
            for k, f in zip(keys, futs):
                if not f.done():
                    # msgpack may turn int keys into str keys
                    f.set_result(result.get(k, result.get(str(k))))
