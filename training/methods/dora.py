"""DoRA: one weight-decomposed LoRA (magnitude x normalised direction) trained sequentially.

The adapter is `adapters/baselines/dora.py` at the plain-LoRA rank and alpha of the run;
the magnitude vectors and both low-rank factors train in every task, with nothing protecting
earlier tasks (the paper's DoRA baseline).
"""

from __future__ import annotations

from torch import nn

from smolora.adapters.baselines import DoRAConfig, DoRAModel
from smolora.training.methods.base import ContinualMethod


class DoRAMethod(ContinualMethod):
    """One DoRA adapter, trained sequentially."""

    name = "dora"
    adapter_kind = "dora"

    def build_adapter(self, model: nn.Module) -> DoRAModel:
        a = self.run.adapter
        cfg = DoRAConfig(
            rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.dropout, target_modules=a.target_modules
        )
        return DoRAModel(model, cfg, seed=self.run.seed)
