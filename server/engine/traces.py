"""Routing traces: built in the worker from a request's row, fetched in batches by the front end.

Worker side: `snapshot_row` copies what one request's trace needs off its persistent-batch
row (`row_state.RowRoutingState`): per adapted layer (column) the VU expert, the IF expert,
the running sum of fusion weights and the tokens summed, and in `per_step` mode the decode
steps' VU routes. `render_trace` turns a `TraceSnapshot` into the plain dict the
`smolora_fetch_traces` RPC returns (per layer: the routes and the mean fusion weights).

Front-end side: requests that finish close together share one `collective_rpc`: a caller awaits
`TraceCollector.fetch(key)`; while one RPC is in flight, later keys queue up and go out
together in the next one. With 16 requests finishing in the same step, that is one RPC, not
sixteen -- which is what keeps traces cheap enough to be on by default.

It does not keep rows or decide routes (`row_state.py`, `routed_linear.py`) and does not
render traces for users (the raw dicts become `RequestTrace` in `engine.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from smolora.server.engine.row_state import Column, RequestMeta, RowRoutingState

logger = logging.getLogger(__name__)

FetchFn = Callable[[list[int]], Awaitable[dict[Any, Any]]]


@dataclass
class TraceSnapshot:
    """A request's routing state copied off its row (CPU tensors; C = adapted columns).

    Attributes:
        meta: the request's host-side facts (key, slot, mode, prompt length, exactness).
        vu_expert: VU expert per column, `[C]` long.
        if_expert: IF expert (global id) per column, `[C]` long.
        fusion_sum: sum of (w_vu, w_if) over the tokens counted, `[C, 2]`.
        token_count: tokens counted per column, `[C]`.
        step_routes: decode steps' VU routes, `[T, C]` int16 (-1: not recorded), or None.
    """

    meta: RequestMeta
    vu_expert: Tensor
    if_expert: Tensor
    fusion_sum: Tensor
    token_count: Tensor
    step_routes: Tensor | None


def snapshot_row(state: RowRoutingState, row: int, meta: RequestMeta) -> TraceSnapshot:
    """Copy one persistent-batch row's routing state (the row may be reused afterwards)."""
    return TraceSnapshot(
        meta=meta,
        vu_expert=state.row_vu[row].cpu().clone(),
        if_expert=state.row_if[row].cpu().clone(),
        fusion_sum=state.row_fsum[row].cpu().clone(),
        token_count=state.row_count[row].cpu().clone(),
        step_routes=state.row_steps[row].cpu().clone() if state.row_steps is not None else None,
    )


def render_trace(snapshot: TraceSnapshot, columns: Sequence[Column]) -> dict[str, Any]:
    """The RPC form of a trace: slot, VU routing, exactness, and per layer that saw tokens its
    routes and mean fusion weights (`vu_steps` too for text layers in `per_step` mode)."""
    mean_fusion = (snapshot.fusion_sum / snapshot.token_count.clamp_min(1.0)[:, None]).tolist()
    vu_expert, if_expert = snapshot.vu_expert.tolist(), snapshot.if_expert.tolist()
    token_count = snapshot.token_count.tolist()
    meta = snapshot.meta
    step_routes = (
        snapshot.step_routes.t().tolist()
        if snapshot.step_routes is not None and meta.per_step
        else None
    )
    layers = []
    for column_index, column in enumerate(columns):
        if token_count[column_index] == 0:
            continue  # e.g. projector layers of a text-only request
        entry: dict[str, Any] = {
            "layer": column.name,
            "vu_expert": vu_expert[column_index],
            "if_expert": if_expert[column_index],
            "w_vu": mean_fusion[column_index][0],
            "w_if": mean_fusion[column_index][1],
        }
        if step_routes is not None and not column.image_side:
            routes = step_routes[column_index]
            entry["vu_steps"] = routes[: routes.index(-1)] if -1 in routes else routes
        layers.append(entry)
    return {
        "slot": meta.slot,
        "vu_routing": "per_step" if meta.per_step else "pinned",
        "exact": meta.exact,
        "layers": layers,
    }


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
