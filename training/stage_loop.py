"""The training-loop pieces the base-building stages share (`vision_pretrain.py`,
`language_pretrain.py`, `pretrain.py`): AdamW under a cosine schedule, one optimisation step
(gradient norm clipped to 1), and the loss summaries their results report. The continual
trainer has its own loop (gradient accumulation, its clip norm)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import get_scheduler


def cosine_adamw(
    params: Sequence[torch.nn.Parameter],
    lr: float,
    weight_decay: float,
    steps: int,
    warmup_steps: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and a cosine schedule over `steps` after a linear warm-up."""
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = get_scheduler("cosine", optim, num_warmup_steps=warmup_steps, num_training_steps=steps)
    return optim, sched


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


def final_loss(losses: Sequence[float]) -> float:
    """The mean loss of the last twentieth of the steps (at least one)."""
    tail = losses[-max(1, len(losses) // 20) :]
    return sum(tail) / len(tail)


def loss_curve(losses: Sequence[float], every: int = 50) -> list[float]:
    """Mean losses of consecutive `every`-step windows, rounded to 4 places."""
    return [
        round(sum(losses[i : i + every]) / len(losses[i : i + every]), 4)
        for i in range(0, len(losses), every)
    ]
