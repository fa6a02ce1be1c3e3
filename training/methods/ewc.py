"""EWC: SeqLoRA plus an online elastic-weight-consolidation penalty on the LoRA parameters.

Online EWC (Schwarz et al., 2018) with a diagonal Fisher over the trained adapter
parameters θ (every layer's `lora_A` and `lora_B`):

- after task t: the anchor θ* becomes the parameters just trained, and the running Fisher
  F ← γ·F + F_t, where F_t is the mean over `ewc_fisher_samples` of t's training examples
  (an evenly spaced subset) of the squared per-example gradient of the training loss
  (answer tokens, eval mode: no dropout) — the empirical diagonal Fisher at θ*;
- while training task t+1: the loss gains `(λ/2) Σ F ⊙ (θ − θ*)²` (`auxiliary_loss`).

λ = `RunConfig.ewc_lambda`, γ = `RunConfig.ewc_decay`. The Fisher and anchor are not
published (the checkpoint is a plain LoRA); a resumed run rebuilds them exactly by replaying
`end_task` over the loaded stages (the trainer calls it after loading each one).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from smolora.training.data.cvit_json import Example
from smolora.training.methods.seqlora import SeqLoRAMethod

logger = logging.getLogger(__name__)


def ewc_penalty(
    params: dict[str, Tensor],
    anchors: dict[str, Tensor],
    fisher: dict[str, Tensor],
    weight: float,
) -> Tensor:
    """`(weight / 2) Σ_k Σ F_k ⊙ (θ_k − θ*_k)²` over the named tensors.

    Args:
        params: current parameters θ (name -> tensor).
        anchors: θ* (same names and shapes).
        fisher: diagonal Fisher F (same names and shapes).
        weight: λ.

    Returns:
        A scalar tensor (differentiable in `params`).
    """
    total = torch.zeros((), device=next(iter(params.values())).device)
    for name, p in params.items():
        diff = p.float() - anchors[name].to(p.device, torch.float32)
        total = total + (fisher[name].to(p.device, torch.float32) * diff.pow(2)).sum()
    return 0.5 * weight * total


class EWCMethod(SeqLoRAMethod):
    """One LoRA trained sequentially, held near its past values by online EWC."""

    name = "ewc"
    adapter_kind = "lora"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fisher: dict[str, Tensor] = {}
        self.anchors: dict[str, Tensor] = {}
        #: Tasks whose Fisher has been added to `self.fisher`, in order.
        self.consolidated: list[str] = []

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """The penalised tensors: `{layer}.{lora_A|lora_B}` -> parameter."""
        return {
            f"{name}.{t}": getattr(layer, t)
            for name, layer in self.adapter.layers.items()  # type: ignore[union-attr]
            for t in ("lora_A", "lora_B")
        }

    def auxiliary_loss(self) -> Tensor | None:
        if not self.fisher or self.run.ewc_lambda == 0:
            return None
        return ewc_penalty(self.named_parameters(), self.anchors, self.fisher, self.run.ewc_lambda)

    def fisher_diagonal(self, examples: list[Example]) -> dict[str, Tensor]:
        """Mean squared per-example gradient of the training loss over an evenly spaced
        subset of `examples` (at most `ewc_fisher_samples`)."""
        assert self.loss is not None, "EWC needs the trainer's loss hook"
        n = min(self.run.ewc_fisher_samples, len(examples))
        step = max(1, len(examples) // n)
        sample = examples[::step][:n]
        params = self.named_parameters()
        acc = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        model = self.model
        assert model is not None
        was_training = model.training
        model.eval()  # no dropout: the Fisher of the deterministic model at θ*
        try:
            for ex in sample:
                loss = self.loss([ex])
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for k, g in zip(params, grads):
                    if g is not None:
                        acc[k] += g.detach().float().pow(2)
        finally:
            model.train(was_training)
        return {k: v / len(sample) for k, v in acc.items()}

    def end_task(self, index: int, task: str, examples: list[Example]) -> None:
        """Consolidate task `index`: decay the running Fisher, add this task's, re-anchor."""
        new = self.fisher_diagonal(examples)
        gamma = self.run.ewc_decay
        self.fisher = {k: gamma * self.fisher[k] + v if self.fisher else v for k, v in new.items()}
        self.anchors = {k: p.detach().clone() for k, p in self.named_parameters().items()}
        self.consolidated.append(task)
        logger.info(
            "ewc: consolidated task %d (%s); Fisher mean %.3g, max %.3g",
            index,
            task,
            float(torch.cat([v.flatten() for v in self.fisher.values()]).mean()),
            float(max(v.max() for v in self.fisher.values())),
        )

    def snapshot(self):
        return (super().snapshot(), dict(self.fisher), dict(self.anchors), list(self.consolidated))

    def restore_snapshot(self, snap) -> None:
        tensors, fisher, anchors, consolidated = snap
        super().restore_snapshot(tensors)
        self.fisher, self.anchors, self.consolidated = fisher, anchors, consolidated
