"""Admission control: slots, FIFO waiting, queue-full 429, queue timeout 503, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from smolora.server.api.admission import AdmissionController
from smolora.server.api.errors import RateLimitError, ServiceUnavailableError
from smolora.server.metrics import Metrics


def test_slots_queue_and_refusals() -> None:
    async def go() -> None:
        m = Metrics()
        a = AdmissionController(
            max_running=2, max_waiting=1, queue_timeout_s=5, retry_after_s=2, metrics=m
        )
        assert await a.acquire(2) == 0.0
        waiter = asyncio.create_task(a.acquire(1))
        await asyncio.sleep(0)  # let it enqueue
        assert a.waiting == 1 and m.waiting._value.get() == 1
        with pytest.raises(RateLimitError) as e:
            await a.acquire(1)
        assert e.value.headers["Retry-After"] == "2"
        a.release(2)
        assert await waiter >= 0.0 and a.running == 1 and a.waiting == 0
        a.release(1)
        assert a.running == 0 and m.running._value.get() == 0

    asyncio.run(go())


def test_queue_timeout_and_cancelled_waiter_leave_no_slot_behind() -> None:
    async def go() -> None:
        a = AdmissionController(max_running=1, max_waiting=4, queue_timeout_s=0.05, retry_after_s=1)
        await a.acquire(1)
        with pytest.raises(ServiceUnavailableError):
            await a.acquire(1)
        assert a.waiting == 0
        t = asyncio.create_task(a.acquire(1))
        await asyncio.sleep(0)
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        a.release(1)
        assert a.running == 0 and a.waiting == 0
        async with a.slot(1) as waited:
            assert waited == 0.0 and a.running == 1
        assert a.running == 0

    asyncio.run(go())
