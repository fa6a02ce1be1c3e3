"""MoELoRA: E LoRA experts mixed per token by a dense softmax router, trained sequentially.

The router reads only the token (no instruction); all of it keeps training every task.
"""

from __future__ import annotations

from torch import nn

from smolora.adapters.baselines import MoELoRAConfig, MoELoRAModel
from smolora.training.methods.base import ContinualMethod


class MoELoRAMethod(ContinualMethod):
    """Dense mixture of LoRA experts, trained sequentially."""

    name = "moelora"
    adapter_kind = "moelora"

    def build_adapter(self, model: nn.Module) -> MoELoRAModel:
        a = self.run.adapter
        cfg = MoELoRAConfig(
            num_experts=a.num_experts,
            rank=a.rank,
            alpha=a.alpha,
            dropout=a.dropout,
            target_modules=a.target_modules,
        )
        return MoELoRAModel(model, cfg, seed=self.run.seed)
