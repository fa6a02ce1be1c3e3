"""Baseline adapters for the continual-learning benchmark: plain LoRA and MoELoRA."""

from smolora.adapters.baselines.lora import LoRAConfig, LoRALinear, LoRAModel
from smolora.adapters.baselines.moelora import MoELoRAConfig, MoELoRALinear, MoELoRAModel

__all__ = [
    "LoRAConfig",
    "LoRALinear",
    "LoRAModel",
    "MoELoRAConfig",
    "MoELoRALinear",
    "MoELoRAModel",
]
