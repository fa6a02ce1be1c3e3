"""One optimisation step of the base-building stages (`vision_pretrain.py`,
`language_pretrain.py`, `pretrain.py`): backward, gradient norm clipped to 1, optimizer and
schedule step. The continual trainer has its own (gradient accumulation, its clip norm)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def optimizer_step(
    loss: Tensor,
    params: Sequence[torch.nn.Parameter],
    optim: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> float:
    """Apply one step for `loss` and return its value."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    sched.step()
    optim.zero_grad(set_to_none=True)
    return float(loss.detach())
