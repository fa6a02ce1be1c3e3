"""A model with adapter layers injected: shared tensor I/O for every adapter method.

`AdapterModel` freezes the base model, injects one wrapper per target linear (built by a
method-specific factory), and reads and writes the adapter's tensors under canonical names
(`{layer}.{tensor}`), the checkpoint layout. Methods (SMoLoRA, LoRA, MoELoRA) subclass it;
it holds no method math itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from smolora.adapters import injection


class AdapterModel:
    """Base class for a model with adapter wrappers around its target linears.

    Args:
        model: the HF model; all its own parameters are frozen in place.
        targets: dotted module-name suffixes to adapt.
        factory: builds the wrapper for (base linear, canonical name). Each wrapper class
            lists its tensor attribute names in `TENSORS`.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: tuple[str, ...],
        factory: Callable[[nn.Linear, str], nn.Module],
    ):
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.layers: dict[str, nn.Module] = injection.inject(model, targets, factory)

    def _expected_keys(self) -> dict[str, tuple[nn.Module, str]]:
        return {f"{n}.{t}": (layer, t) for n, layer in self.layers.items() for t in layer.TENSORS}  # type: ignore[attr-defined]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """`{canonical_layer}.{tensor}` -> tensor (detached, contiguous, on CPU)."""
        return {
            k: getattr(layer, t).detach().to("cpu").contiguous()
            for k, (layer, t) in self._expected_keys().items()
        }

    def load_adapter_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Copy adapter tensors in place.

        Raises:
            ValueError: on missing or unexpected keys, or a shape mismatch.
        """
        expected = self._expected_keys()
        missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing or unexpected:
            raise ValueError(
                f"adapter tensors do not fit this model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        for key, (layer, t) in expected.items():
            param = getattr(layer, t)
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"{key}: checkpoint shape {tuple(tensors[key].shape)} != model shape "
                    f"{tuple(param.shape)}"
                )
        with torch.no_grad():
            for key, (layer, t) in expected.items():
                getattr(layer, t).copy_(tensors[key].to(getattr(layer, t).dtype))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The adapter parameters that currently require grad."""
        return [
            p
            for layer in self.layers.values()
            for n, p in layer.named_parameters()
            if p.requires_grad and not n.startswith("base.")
        ]

    def detach(self) -> nn.Module:
        """Remove the adapter, restoring the original linears; returns the base model."""
        injection.eject(self.model, self.layers)
        self.layers = {}
        return self.model
