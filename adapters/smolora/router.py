"""The two SMoLoRA routers: pure functions from gate weights and inputs to expert ids.

What it does: masked segment means of flat token streams, top-1 VU and IF routing, and
the straight-through multiplier used when routers are trained. What it does not do: hold
state or know about models, batches or decoding (see `context.py` and `layer.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def segment_mean(x: Tensor, owners: Tensor, valid: Tensor, num_segments: int) -> Tensor:
    """Mean of the valid rows of `x` per owner.

    Args:
        x: token rows, `[N, d]`.
        owners: segment id of each row in `[0, num_segments)`, `[N]` long.
        valid: which rows count (padding does not), `[N]` bool.
        num_segments: S, the number of segments.

    Returns:
        `[S, d]` means in float32; a segment with no valid row gets zeros.
    """
    w = valid.to(torch.float32)
    sums = torch.zeros(num_segments, x.shape[-1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, owners, x.to(torch.float32) * w[:, None])
    counts = torch.zeros(num_segments, dtype=torch.float32, device=x.device)
    counts.index_add_(0, owners, w)
    return sums / counts.clamp_min(1.0)[:, None]


def gate_logits(gate: Tensor, inputs: Tensor) -> Tensor:
    """Router logits `inputs @ gate.T` in float32.

    Args:
        gate: `[E/2, d]` gate weight (a bias-free Linear).
        inputs: `[S, d]` one row per segment (request or image).

    Returns:
        `[S, E/2]` logits.
    """
    return inputs.to(torch.float32) @ gate.to(torch.float32).t()


def top1(logits: Tensor) -> Tensor:
    """Hard top-1 route: `[S, E/2]` logits -> `[S]` long expert ids (ties: lowest id)."""
    return torch.argmax(logits, dim=-1)


def straight_through_scale(logits: Tensor, chosen: Tensor) -> Tensor:
    """Per-segment multiplier equal to 1 whose gradient reaches every gate logit.

    `p_chosen / stop_grad(p_chosen)` with `p = softmax(logits)`: the forward value is
    exactly one, so outputs equal hard top-1 routing, while the backward pass gives the
    router the gradient of scaling the chosen expert by its probability (as in
    Switch-style routers).

    Args:
        logits: `[S, E/2]` router logits.
        chosen: `[S]` chosen expert ids.

    Returns:
        `[S]` multipliers (value 1).
    """
    p = torch.softmax(logits, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
    p = p.clamp_min(1e-9)
    return p / p.detach()
