"""Reference greedy generation for a SMoLoRA-adapted HF LLaVA model.

This is the semantics oracle the engine is tested against (and how the paper's code
serves: HF transformers, one request at a time). It runs prefill with the prompt's real
tokens masked in, then decodes step by step with the KV cache, keeping the VU route pinned
or recomputing it per step as the routing context says. It is written for clarity, not
speed, and does not sample: greedy only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image
from torch import Tensor

from smolora.adapters.smolora.config import VuRouting
from smolora.adapters.smolora.context import RoutingContext
from smolora.adapters.smolora.model import SMoLoRAModel


@dataclass
class ReferenceRequest:
    """One request: a chat-formatted prompt (with `<image>` where the image goes)."""

    prompt: str
    image: Image.Image | None
    instruction: Tensor  # [384]


@dataclass
class ReferenceResult:
    """Generated token ids (EOS included when reached) and the routing trace."""

    token_ids: list[int]
    trace: list[dict[str, Any]] = field(default_factory=list)
    vu_steps: dict[str, list[int]] = field(default_factory=dict)


@torch.no_grad()
def generate_batch(
    smodel: SMoLoRAModel,
    processor: Any,
    requests: Sequence[ReferenceRequest],
    max_new_tokens: int,
    vu_routing: VuRouting = "pinned",
    eos_token_id: int | None = None,
) -> list[ReferenceResult]:
    """Greedy-generate a left-padded batch with the KV cache.

    All requests must have an image, or none. Position ids follow the attention mask, so
    a padded batch matches running each request alone (up to float rounding).

    Returns:
        One `ReferenceResult` per request, in order.
    """
    model = smodel.model
    with_images = [r.image is not None for r in requests]
    if any(with_images) and not all(with_images):
        raise ValueError("a reference batch must be all-image or all-text; run mixed requests one at a time")
    tokenizer = processor.tokenizer
    kwargs: dict[str, Any] = {"text": [r.prompt for r in requests], "return_tensors": "pt", "padding": True}
    if all(with_images) and requests:
        kwargs["images"] = [r.image for r in requests]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = processor(**kwargs)
    finally:
        tokenizer.padding_side = side
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    ctx = RoutingContext(torch.stack([r.instruction for r in requests]), vu_routing=vu_routing)

    mask = inputs["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    b = len(requests)
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    with smodel.routing(ctx):
        ctx.set_token_mask(mask)
        out = model(**inputs, position_ids=pos, use_cache=True)
        past = out.past_key_values
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)  # [B]
            for i in range(b):
                if not done[i]:
                    outputs[i].append(int(nxt[i]))
                    done[i] = int(nxt[i]) == eos
            if bool(done.all()) or len(outputs[0]) == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
            pos = pos[:, -1:] + 1
            # Rows already past EOS are still fed (the batch stays rectangular) but are not
            # real tokens: they must not count in route means or fusion-weight averages.
            ctx.set_token_mask((~done)[:, None])
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past = out.past_key_values
    traces = ctx.trace()
    return [
        ReferenceResult(
            token_ids=outputs[i],
            trace=traces[i],
            # Row i was really fed for len(outputs[i]) - 1 decode steps; later steps were padding.
            vu_steps={n: [int(s[i]) for s in r.vu_steps[: len(outputs[i]) - 1]] for n, r in ctx.routes.items() if r.vu_steps},
        )
        for i in range(b)
    ]


def generate_one_by_one(
    smodel: SMoLoRAModel,
    processor: Any,
    requests: Sequence[ReferenceRequest],
    max_new_tokens: int,
    vu_routing: VuRouting = "pinned",
    eos_token_id: int | None = None,
) -> list[ReferenceResult]:
    """Serve requests one at a time, as the reference code does (no padding at all)."""
    return [generate_batch(smodel, processor, [r], max_new_tokens, vu_routing, eos_token_id)[0] for r in requests]
