"""Graceful shutdown: stop admitting, let in-flight requests finish, then end what is left.

`DrainState` (one per app, on `ServerState`) is what the HTTP layer consults: once
`begin()` is called, `/ready` answers 503 and new chat requests are refused with 503
`shutting_down` and `Retry-After`; requests already admitted keep running. Each running
chat request registers an interrupt callback; `interrupt_all()` makes every one of them
end at once with a 503 (a stream: a final SSE error event, then `[DONE]`), its engine
requests aborted, and sets `ended`, which ends requests still waiting for a slot or being
prepared with a 503 too. `drain(state, grace_s)` runs the whole sequence: begin, wait until the
admission controller holds no request or the grace period is over, interrupt the rest and
wait briefly for their responses to end.

It does not catch signals or stop the HTTP server (`server/cli.py` does, then lets
uvicorn close the connections and run the lifespan's shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smolora.server.api.state import ServerState

log = logging.getLogger("smolora.server.drain")


class DrainState:
    """Whether the server is draining, and how to interrupt the requests still running."""

    def __init__(self) -> None:
        self.draining = False
        self.interrupted = False
        self.ended = asyncio.Event()  # set by `interrupt_all`: requests not yet streaming end too
        self._interrupts: dict[int, Callable[[], None]] = {}
        self._next = 0

    def begin(self) -> None:
        """Stop admitting new chat requests (and turn `/ready` to 503)."""
        self.draining = True

    def register(self, interrupt: Callable[[], None]) -> int:
        """Register a running request's interrupt callback; returns a handle for `unregister`.

        After `interrupt_all` a request registering late is interrupted at once.
        """
        self._next += 1
        self._interrupts[self._next] = interrupt
        if self.interrupted:
            interrupt()
        return self._next

    def unregister(self, handle: int) -> None:
        self._interrupts.pop(handle, None)

    @property
    def running(self) -> int:
        """Chat requests currently registered (running in the engine)."""
        return len(self._interrupts)

    def interrupt_all(self) -> int:
        """Interrupt every registered request (and any that registers later); returns how
        many were running."""
        self.interrupted = True
        self.ended.set()
        callbacks = list(self._interrupts.values())
        for cb in callbacks:
            cb()
        return len(callbacks)


async def drain(state: ServerState, grace_s: float, poll_s: float = 0.05) -> None:
    """Begin draining, wait up to `grace_s` for admitted requests, then interrupt the rest.

    Args:
        state: the app's state (its admission controller and drain state).
        grace_s: how long admitted requests may still run.
        poll_s: how often to look at the admission counts.
    """
    state.drain.begin()
    admission = state.admission
    log.info(
        "draining: /ready is 503 and new chat requests are refused; %d running, %d waiting, "
        "grace %.1fs",
        admission.running,
        admission.waiting,
        grace_s,
    )
    deadline = time.monotonic() + grace_s
    while (admission.running or admission.waiting) and time.monotonic() < deadline:
        await asyncio.sleep(poll_s)
    if admission.running or admission.waiting:
        n = state.drain.interrupt_all()
        admission.refuse_waiting("the server is shutting down")
        log.warning("grace period over: ending %d request(s) still running", n)
        end = time.monotonic() + 5.0  # their final events and engine aborts
        while admission.running and time.monotonic() < end:
            await asyncio.sleep(poll_s)
    log.info("drained")
