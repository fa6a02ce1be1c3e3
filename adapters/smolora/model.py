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
from torch import Tensor, nn

from smolora.adapters import injection
from smolora.adapters.smolora.config import SMoLoRAConfig
from smolora.adapters.smolora.context import RoutingContext
from smolora.adapters.smolora.layer import ADAPTER_TENSORS, SMoLoRALinear


class SMoLoRAModel:
    """A model with SMoLoRA layers injected.

    Args:
        model: an HF model (LLaVA or causal LM); its weights are frozen in place.
        config: adapter configuration.
        seed: seeds the adapter init so the same seed gives the same adapter.
    """

    def __init__(self, model: nn.Module, config: SMoLoRAConfig, seed: int = 0) -> None:
        self.model = model
        self.config = config
        for p in model.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed)

        def factory(base: nn.Linear, name: str) -> SMoLoRALinear:
            layer = SMoLoRALinear(base, config, name, image_side=injection.is_image_side(name))
            layer.reset_parameters(generator=gen)
            return layer

        self.layers: dict[str, SMoLoRALinear] = injection.inject(model, config.target_modules, factory)  # type: ignore[assignment]

    # -- routing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def routing(self, ctx: RoutingContext) -> Iterator[RoutingContext]:
        """Scope in which every SMoLoRA layer reads `ctx`; restored on exit."""
        previous = {n: l.context for n, l in self.layers.items()}
        for layer in self.layers.values():
            layer.context = ctx
        try:
            yield ctx
        finally:
            for n, layer in self.layers.items():
                layer.context = previous[n]

    # -- tensors -------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """`{canonical_layer}.{tensor}` -> tensor (detached, contiguous, on CPU)."""
        out: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            for t in ADAPTER_TENSORS:
                out[f"{name}.{t}"] = getattr(layer, t).detach().to("cpu").contiguous()
        return out

    def load_adapter_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Copy adapter tensors in place.

        Raises:
            ValueError: on missing or unexpected keys, or a shape mismatch.
        """
        expected = {f"{n}.{t}" for n in self.layers for t in ADAPTER_TENSORS}
        missing, unexpected = expected - set(tensors), set(tensors) - expected
        if missing or unexpected:
            raise ValueError(
                f"adapter tensors do not fit this model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        with torch.no_grad():
            for name, layer in self.layers.items():
                for t in ADAPTER_TENSORS:
                    param = getattr(layer, t)
                    src = tensors[f"{name}.{t}"]
                    if tuple(src.shape) != tuple(param.shape):
                        raise ValueError(
                            f"{name}.{t}: checkpoint shape {tuple(src.shape)} != model shape {tuple(param.shape)}"
                        )
                    param.copy_(src.to(param.dtype))

    # -- training helpers ----------------------------------------------------------------
    def set_gates_trainable(self, trainable: bool) -> None:
        """Task 1 trains gates (when learned); later tasks freeze them."""
        for layer in self.layers.values():
            layer.set_gates_trainable(trainable)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Experts, fusion vectors, and gates if they are trainable."""
        return [p for l in self.layers.values() for p in l.parameters() if p.requires_grad]

    def detach(self) -> nn.Module:
        """Remove the adapter, restoring the original linears; returns the base model."""
        injection.eject(self.model, self.layers)
        self.layers = {}
        return self.model
