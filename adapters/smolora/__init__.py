"""SMoLoRA: separable mixture of LoRA experts (VU experts routed by hidden state, IF
experts routed by instruction embedding, fused per token). See shared SMOLORA.md."""

from smolora.adapters.smolora.config import DEFAULT_TARGET_MODULES, SMoLoRAConfig
from smolora.adapters.smolora.context import BatchLayerRoutes, RoutingContext, TokenLayout
from smolora.adapters.smolora.layer import SMoLoRALinear, dense_reference_delta, routed_expert_apply
from smolora.adapters.smolora.model import SMoLoRAModel

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "BatchLayerRoutes",
    "RoutingContext",
    "SMoLoRAConfig",
    "SMoLoRALinear",
    "SMoLoRAModel",
    "TokenLayout",
    "dense_reference_delta",
    "routed_expert_apply",
]
