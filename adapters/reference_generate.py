"""Reference greedy generation for a SMoLoRA-adapted HF LLaVA model.

This is the semantics oracle the engine is tested against (and how the paper's code
serves: HF transformers, one request at a time). It runs prefill with the prompt's real
tokens masked in, then decodes step by step with the KV cache, keeping the VU route pinned
or recomputing it per step as the routing context says. It is written for clarity, not
speed, and does not sample: greedy only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
def greedy_decode(
    model: torch.nn.Module,
    inputs: dict[str, Tensor],
    max_new_tokens: int,
    eos_token_id: int,
    set_token_mask: Callable[[Tensor | None], None] | None = None,
) -> list[list[int]]:
    """Greedy-decode a left-padded batch with the KV cache (any HF LLaVA, adapted or not).

    Position ids follow the attention mask, so padding does not shift positions.
    `set_token_mask` (e.g. `RoutingContext.set_token_mask`) is told which tokens are real
    before every forward: the prompt's at prefill, then each row while it has not reached
    EOS (rows past EOS are still fed, to keep the batch rectangular, but must not count in
    route means or fusion averages).

    Args:
        model: the model, in eval mode.
        inputs: `input_ids`, `attention_mask` (`[B, T]`) and optionally `pixel_values`,
            on the model's device.
        max_new_tokens: decoding budget.
        eos_token_id: stops a row once generated.
        set_token_mask: optional real-token hook.

    Returns:
        Generated token ids per row (EOS included when reached).
    """
    hook = set_token_mask or (lambda mask: None)
    mask = inputs["attention_mask"]
    device = mask.device
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    b = mask.shape[0]
    outputs: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    hook(mask)
    out = model(**inputs, position_ids=pos, use_cache=True)
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)  # [B]
        for i in range(b):
            if not done[i]:
                outputs[i].append(int(nxt[i]))
                done[i] = int(nxt[i]) == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
        hook((~done)[:, None].to(device))
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return outputs


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
        raise ValueError(
            "a reference batch must be all-image or all-text; run mixed requests one at a time"
        )
    tokenizer = processor.tokenizer
    kwargs: dict[str, Any] = {
        "text": [r.prompt for r in requests],
        "return_tensors": "pt",
        "padding": True,
    }
    if all(with_images) and requests:
        kwargs["images"] = [r.image for r in requests]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = processor(**kwargs)
    finally:
        tokenizer.padding_side = side
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    ctx = RoutingContext(torch.stack([r.instruction for r in requests]), vu_routing=vu_routing)

    b = len(requests)
    with smodel.routing(ctx):
        outputs = greedy_decode(model, dict(inputs), max_new_tokens, eos, ctx.set_token_mask)
    traces = ctx.trace()
    return [
        ReferenceResult(
            token_ids=outputs[i],
            trace=traces[i],
            # Row i was really fed for len(outputs[i]) - 1 decode steps; later steps were padding.
            vu_steps={
                n: [int(s[i]) for s in r.vu_steps[: len(outputs[i]) - 1]]
                for n, r in ctx.routes.items()
                if r.vu_steps
            },
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
    return [
        generate_batch(smodel, processor, [r], max_new_tokens, vu_routing, eos_token_id)[0]
        for r in requests
    ]
