"""Why the engine disables chunked prefill for SMoLoRA (and the engine tests prove the
unchunked path exact): with chunked prefill, a prompt's first chunk must be computed -- and
its VU experts chosen -- before the rest of the prompt exists. Carrying running sums of the
layer inputs gives the first chunk a route decided from the prefix mean, and the reference
decides every prompt token's route from the whole-prompt mean. This test shows, with the
reference implementation itself, that the two routes differ for real prompts, so no
running-sum scheme can reproduce unchunked routes; `EngineConfig` therefore refuses
`chunked_prefill=True` with adapters (test_config.py), and test_engine.py checks that the
engine never saw a split prompt (`partial_prefills == 0`) under a tight token budget."""

from __future__ import annotations

from pathlib import Path

import torch

from smolora.adapters.smolora import RoutingContext
from tests.server.engine.engine_testlib import make_adapter, make_workload


def _text_routes(smodel, inputs, length: int, u: torch.Tensor) -> dict[str, int]:
    ctx = RoutingContext(u[None], vu_routing="pinned")
    with torch.no_grad(), smodel.routing(ctx):
        smodel.model(
            input_ids=inputs["input_ids"][:, :length],
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"][:, :length],
        )
    return {n: int(r.vu_expert[0]) for n, r in ctx.routes.items() if n.startswith("layers.")}


def test_prefix_routes_differ_from_whole_prompt_routes(tiny_model_dir: Path) -> None:
    smodel, processor = make_adapter(tiny_model_dir, seed=1)
    w = make_workload(8, seed=5, text_only=0)
    differing = 0
    for prompt, image, u in zip(w.prompts, w.images, w.instructions):
        inputs = processor(text=prompt, images=image, return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        first_chunk = 24  # covers BOS, "USER:", the 16 image tokens and a few text tokens
        assert first_chunk < n
        whole = _text_routes(smodel, inputs, n, u)
        prefix = _text_routes(smodel, inputs, first_chunk, u)
        differing += sum(whole[k] != prefix[k] for k in whole)
    assert differing > 0
