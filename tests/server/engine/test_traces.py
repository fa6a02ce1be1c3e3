"""Trace fetches of requests finishing together share RPCs."""

from __future__ import annotations

import asyncio
from typing import Any

from smolora.server.engine.traces import TraceCollector


def test_concurrent_fetches_coalesce() -> None:
    calls: list[list[int]] = []

    async def fetch_many(keys: list[int]) -> dict[Any, Any]:
        calls.append(keys)
        await asyncio.sleep(0)  # yield, as an RPC would
        return {str(k): {"k": k} for k in keys}  # msgpack may stringify int keys

    async def main() -> list[Any]:
        collector = TraceCollector(fetch_many, max_batch=4)
        return await asyncio.gather(*(collector.fetch(k) for k in range(10)))

    results = asyncio.run(main())
    assert [r["k"] for r in results] == list(range(10))
    assert len(calls) == 3 and sorted(k for c in calls for k in c) == list(range(10))
