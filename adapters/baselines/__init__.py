"""Baseline adapters for the continual-learning benchmark: plain LoRA, MoELoRA and DoRA."""

from smolora.adapters.baselines.dora import DoRAConfig, DoRALinear, DoRAModel
from smolora.adapters.baselines.lora import LoRAConfig, LoRALinear, LoRAModel
from smolora.adapters.baselines.moelora import MoELoRAConfig, MoELoRALinear, MoELoRAModel

__all__ = [
    "DoRAConfig",
    "DoRALinear",
    "DoRAModel",
    "LoRAConfig",
    "LoRALinear",
    "LoRAModel",
    "MoELoRAConfig",
    "MoELoRALinear",
    "MoELoRAModel",
]
