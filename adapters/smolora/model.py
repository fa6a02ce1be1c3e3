"""Attach SMoLoRA to any HF causal-LM or LLaVA-architecture model, route, save and load.

`SMoLoRAModel` owns the injected `SMoLoRALinear` layers of one model. It gives the routing
scope (`routing(ctx)`), the adapter's tensors under canonical names (the checkpoint
layout), parameter groups for training, and detaches cleanly. It does not train, generate
or write files (see `training/`, `adapters/reference_generate.py`, `adapters/checkpoint.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from smolora.adapters import injection
from smolora.adapters.adapter_model import AdapterModel
from smolora.adapters.smolora.config import SMoLoRAConfig
from smolora.adapters.smolora.context import RoutingContext
from smolora.adapters.smolora.layer import SMoLoRALinear


class SMoLoRAModel(AdapterModel):
    """A model with SMoLoRA layers injected.

    Args:
        model: an HF model (LLaVA or causal LM); its weights are frozen in place.
        config: adapter configuration.
        seed: seeds the adapter init so the same seed gives the same adapter.
    """

    def __init__(self, model: nn.Module, config: SMoLoRAConfig, seed: int = 0) -> None:
        self.config = config
        gen = torch.Generator().manual_seed(seed)

        def factory(base: nn.Linear, name: str) -> SMoLoRALinear:
            layer = SMoLoRALinear(base, config, name, image_side=injection.is_image_side(name))
            layer.reset_parameters(generator=gen)
            return layer

        super().__init__(model, config.target_modules, factory)
        self.layers: dict[str, SMoLoRALinear]  # type: ignore[assignment]

    @contextlib.contextmanager
    def routing(self, ctx: RoutingContext) -> Iterator[RoutingContext]:
        """Scope in which every SMoLoRA layer reads `ctx`; restored on exit."""
        previous = {n: layer.context for n, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.context = ctx
        try:
            yield ctx
        finally:
            for n, layer in self.layers.items():
                layer.context = previous[n]

    def set_gates_trainable(self, trainable: bool) -> None:
        """Task 1 trains gates (when learned); later tasks freeze them."""
        for layer in self.layers.values():
            layer.set_gates_trainable(trainable)
