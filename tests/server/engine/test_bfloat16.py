"""A bfloat16 model (the dtype real LLaVA checkpoints are served in) through the real vLLM
engine: every routed layer runs the compiled CPU kernel in bfloat16, and routing agrees with
the float32 reference implementation.

Tokens are compared loosely on purpose: a bfloat16 forward rounds every activation, so a
late greedy choice between two near-equal logits may flip against the float32 reference.
Routes are decided on prompt means and instruction embeddings, far from such ties here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smolora.server.engine.engine import collect_all
from smolora.server.engine.protocol import GenerateRequest
from tests.server.engine.engine_testlib import LoopThread, make_workload, running_engine

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def bf16_engine(loop: LoopThread, tiny_model_dir: Path, version1: Any) -> Iterator[Any]:
    yield from running_engine(
        loop,
        model_dir=tiny_model_dir,
        checkpoint=version1[0].path,
        num_slots=1,
        dtype="bfloat16",
        max_num_seqs=16,
        max_model_len=128,
        max_num_batched_tokens=128,
        kv_cache_bytes=64 * 1024 * 1024,
    )


def test_bfloat16_engine_routes_like_the_reference_on_the_cpu_kernel(
    loop: LoopThread, bf16_engine: Any, version1: Any
) -> None:
    _, smodel, processor = version1
    w = make_workload(10, seed=11, text_only=2)
    reqs = [
        GenerateRequest(
            prompt=p, image=im, instruction=u, max_tokens=m, instruction_source="explicit"
        )
        for p, im, u, m in zip(w.prompts, w.images, w.instructions, w.max_tokens)
    ]
    results = loop.run(collect_all(bf16_engine, reqs))
    again = loop.run(collect_all(bf16_engine, reqs))
    stats = loop.run(bf16_engine.health()).detail
    assert stats["adapter_dtype"] == "bfloat16"
    assert stats["routed_layers"] > 0 and stats["cpu_kernel_layers"] == stats["routed_layers"], (
        stats
    )

    refs = w.reference(smodel, processor, "pinned")  # float32, one request at a time
    routes = [r.trace.routes() for r in results]
    assert routes == [
        [(t["layer"], t["vu_expert"], t["if_expert"]) for t in ref.trace] for ref in refs
    ]
    assert len({tuple(r) for r in routes}) > 1, "every request took the same route"
    assert [r.token_ids for r in again] == [r.token_ids for r in results], (
        "the same batch again gives the same tokens"
    )
    assert all(r.token_ids[:1] == ref.token_ids[:1] for r, ref in zip(results, refs))
    same = sum(r.token_ids == ref.token_ids for r, ref in zip(results, refs))
    assert same >= 8, f"only {same}/10 requests generated the float32 reference's tokens"
