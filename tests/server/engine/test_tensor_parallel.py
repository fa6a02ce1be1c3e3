"""Routed adapters under vLLM's tensor parallelism: the real engine with 2 ranks (two CPU
worker processes, gloo), against the TP=1 engine and the reference, request by request, and
a hot-load that reaches both ranks before any request can use it.

One TP=2 engine for the module (its ranks are bound one CPU each, "0|1" on 2 CPUs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smolora.server.engine.engine import collect
from smolora.server.engine.protocol import GenerateChunk
from tests.server.engine.engine_testlib import (
    LoopThread,
    assert_matches_reference,
    make_adapter,
    make_workload,
    publish,
    requests_for,
    running_engine,
    staggered,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tp_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tp_registry")


@pytest.fixture(scope="module")
def tp_version1(tiny_model_dir: Path, tp_registry: Path) -> tuple[Any, Any, Any]:
    smodel, processor = make_adapter(tiny_model_dir, seed=1)
    return publish(tp_registry, tiny_model_dir, smodel, "task1"), smodel, processor


def _engine(loop: LoopThread, model_dir: Path, checkpoint: Path, tp: int) -> Iterator[Any]:
    yield from running_engine(
        loop,
        model_dir=model_dir,
        checkpoint=checkpoint,
        tensor_parallel_size=tp,
        num_slots=2,
        trace_step_routes=16,
        cpu_overlap="off",
        max_num_seqs=16,
        max_model_len=128,
        max_num_batched_tokens=128,
        kv_cache_bytes=32 * 1024 * 1024,
    )


@pytest.fixture(scope="module")
def tp_engine(loop: LoopThread, tiny_model_dir: Path, tp_version1: Any) -> Iterator[Any]:
    """Version 1 active on two tensor-parallel ranks."""
    yield from _engine(loop, tiny_model_dir, tp_version1[0].path, 2)


@pytest.fixture(scope="module")
def tp1_engine(loop: LoopThread, tiny_model_dir: Path, tp_version1: Any) -> Iterator[Any]:
    """The same engine and checkpoint on one rank (the session's shared engine may hold
    other versions by the time this module runs)."""
    yield from _engine(loop, tiny_model_dir, tp_version1[0].path, 1)


def _same_as(tp2: list[GenerateChunk], tp1: list[GenerateChunk]) -> None:
    """Tokens, routes (prefill and per-step) and fusion weights of two engines' results."""
    for i, (a, b) in enumerate(zip(tp2, tp1)):
        assert a.token_ids == b.token_ids, f"request {i}: tokens differ between TP=2 and TP=1"
        assert a.trace is not None and b.trace is not None
        assert a.trace.routes() == b.trace.routes(), f"request {i}: routes differ"
        for x, y in zip(a.trace.layers, b.trace.layers):
            assert x.vu_steps == y.vu_steps, f"request {i}: per-step routes differ at {x.layer}"
            assert x.w_vu == pytest.approx(y.w_vu, abs=1e-4)
            assert x.w_if == pytest.approx(y.w_if, abs=1e-4)


@pytest.mark.parametrize("vu_routing", ["pinned", "per_step"])
def test_tp2_mixed_batch_equals_tp1_and_reference(
    loop: LoopThread, tp_engine: Any, tp1_engine: Any, tp_version1: Any, vu_routing: str
) -> None:
    """10 staggered requests (8 images, 2 text-only, different instructions and lengths):
    the TP=2 engine gives the TP=1 engine's tokens, routes and fusion weights, and both the
    reference's."""
    _, smodel, processor = tp_version1
    assert tp_engine.vllm.vllm_config.parallel_config.tensor_parallel_size == 2
    w = make_workload(10, seed=61 if vu_routing == "pinned" else 62, text_only=2)
    tp2 = loop.run(staggered(tp_engine, requests_for(w, vu_routing, version=1)))
    tp1 = loop.run(staggered(tp1_engine, requests_for(w, vu_routing, version=1)))
    _same_as(tp2, tp1)
    per_step = vu_routing == "per_step"
    assert_matches_reference(tp2, w.reference(smodel, processor, vu_routing), 1, per_step)
    routes = {tuple(r.trace.routes()) for r in tp2 if r.trace is not None}
    assert len(routes) > 1, "every request took the same route: routing is not exercised"
    detail = loop.run(tp_engine.health()).detail
    assert detail["overlap"] is None  # no overlap helper under tensor parallelism
    # the column-parallel layers run the compiled kernel, the row-parallel ones grouped matmuls
    assert 0 < detail["cpu_kernel_layers"] < detail["routed_layers"]


def test_tp2_hot_load_reaches_both_ranks_before_use(
    loop: LoopThread,
    tp_engine: Any,
    tp_version1: Any,
    tp_registry: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Version 2 is published and loaded (one sublayer per worker RPC) while 6 requests stream
    on version 1: they finish with version 1's outputs, and requests sent during the load
    get version 1 or, once it is active, version 2, each equal to its version's reference:
    no request mixes rank 0 on one version with rank 1 on another. Both ranks then hold the
    same versions in the same slots."""
    from smolora.server.engine import engine as engine_module

    monkeypatch.setattr(engine_module, "COPY_BYTES_PER_CALL", 1)
    _, smodel1, processor = tp_version1
    smodel2, _ = make_adapter(tiny_model_dir, seed=2)
    w_old = make_workload(6, seed=71, text_only=1)
    w_old.max_tokens = [24] * 6
    w_mid = make_workload(6, seed=72, text_only=1)
    w_new = make_workload(4, seed=73, text_only=1)

    async def scenario() -> tuple[list[Any], list[Any], list[Any], Any]:
        first = [asyncio.Event() for _ in range(6)]

        async def stream(i: int, req: Any) -> GenerateChunk:
            ids: list[int] = []
            last = None
            async for chunk in tp_engine.generate(req):
                ids.extend(chunk.token_ids)
                first[i].set()
                last = chunk
            assert last is not None
            last.token_ids = ids
            return last

        old = [
            asyncio.create_task(stream(i, r)) for i, r in enumerate(requests_for(w_old, "pinned"))
        ]
        await asyncio.gather(*(e.wait() for e in first))
        entry = await asyncio.to_thread(publish, tp_registry, tiny_model_dir, smodel2, "task2")
        load = asyncio.create_task(tp_engine.load_latest(tp_registry))
        mid = []
        for r in requests_for(w_mid, "pinned"):  # sent one by one while the load copies
            mid.append(await collect(tp_engine, r))
        info = await load
        new = await asyncio.gather(*(collect(tp_engine, r) for r in requests_for(w_new, "pinned")))
        assert entry.version == info.version == 2 and info.active
        return [await t for t in old], mid, list(new), info

    old, mid, new, _ = loop.run(scenario())
    assert_matches_reference(old, w_old.reference(smodel1, processor, "pinned"), 1, False)
    assert_matches_reference(new, w_new.reference(smodel2, processor, "pinned"), 2, False)
    refs = {
        1: w_mid.reference(smodel1, processor, "pinned"),
        2: w_mid.reference(smodel2, processor, "pinned"),
    }
    for i, got in enumerate(mid):
        assert got.version in refs, got.version
        assert_matches_reference([got], [refs[got.version][i]], got.version, False)
    detail = loop.run(tp_engine.health()).detail
    ranks = detail["rank_slot_versions"]
    assert len(ranks) == 2 and ranks[0] == ranks[1], ranks
    assert {v["version"] for v in ranks[0].values()} == {1, 2}
