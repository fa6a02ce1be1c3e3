"""SeqLoRA: one plain LoRA trained task after task (the forgetting baseline).

Nothing is protected: every task keeps training the same low-rank update.
"""

from __future__ import annotations

from torch import nn

from smolora.adapters.baselines import LoRAConfig, LoRAModel
from smolora.training.methods.base import ContinualMethod


def lora_config(method: ContinualMethod) -> LoRAConfig:
    """The plain-LoRA config of a run."""
    a = method.run.adapter
    return LoRAConfig(
        rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.dropout, target_modules=a.target_modules
    )


class SeqLoRAMethod(ContinualMethod):
    """One LoRA, trained sequentially."""

    name = "seqlora"
    adapter_kind = "lora"

    def build_adapter(self, model: nn.Module) -> LoRAModel:
        return LoRAModel(model, lora_config(self), seed=self.run.seed)
