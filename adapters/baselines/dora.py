"""DoRA (weight-decomposed low-rank adaptation), the adapter of the DoRA baseline.

The adapted weight is decomposed into a magnitude and a direction (Liu et al., 2024):

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row          m: [d_out], one norm per output row
    y  = W' x + b0 = (m / ‖W0 + s·B A‖_row) ⊙ (W0 x + s·B A dropout(x)) + b0

with A ~ N(0, init_std^2), B = 0, s = alpha / r, and m initialised to the row norms of W0,
so an untrained layer equals its base. By default the norm is treated as a constant in the
backward pass (`detach_norm`, the paper's Section 4.3 memory saving). Dropout applies to the
low-rank path only, as in plain LoRA. No routing here; the sequential DoRA baseline trains
one `DoRAModel` task after task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smolora.adapters.adapter_model import AdapterModel
from smolora.adapters.baselines.lora import LoRAConfig


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA hyper-parameters: `LoRAConfig` plus whether the weight norm gets gradient.

    Attributes:
        detach_norm: treat ‖W0 + s·B A‖_row as a constant in backward (paper Sec. 4.3).
    """

    detach_norm: bool = True


class DoRALinear(nn.Module):
    """A frozen linear re-parameterised as magnitude x normalised (W0 + low-rank update)."""

    TENSORS = ("lora_A", "lora_B", "magnitude")

    def __init__(
        self,
        base: nn.Linear,
        config: DoRAConfig,
        name: str,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.base, self.name, self.scaling = base, name, config.alpha / config.rank
        self.detach_norm = config.detach_norm
        dev = base.weight.device
        a = torch.empty(config.rank, base.in_features).normal_(
            0.0, config.init_std, generator=generator
        )
        self.lora_A = nn.Parameter(a.to(dev))  # [r, d_in]
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, config.rank, device=dev)
        )  # [d_out, r]
        with torch.no_grad():
            norm = base.weight.detach().float().norm(dim=1)
        self.magnitude = nn.Parameter(norm.to(dev))  # [d_out]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def delta_weight(self) -> Tensor:
        """`s · B A`, `[d_out, d_in]` (float32)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def weight_norm(self) -> Tensor:
        """`‖W0 + s·B A‖` per output row, `[d_out]`."""
        return (self.base.weight.float() + self.delta_weight()).norm(dim=1)

    def merged_weight(self) -> Tensor:
        """The adapted weight `m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row`, `[d_out, d_in]`."""
        w = self.base.weight.float() + self.delta_weight()
        return self.magnitude[:, None] * w / w.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        norm = self.weight_norm()
        if self.detach_norm:
            norm = norm.detach()
        scale = self.magnitude / norm  # [d_out]
        xf = x.to(self.lora_A.dtype)
        base_out = nn.functional.linear(x, self.base.weight).to(self.lora_A.dtype)
        delta = self.scaling * ((self.dropout(xf) @ self.lora_A.t()) @ self.lora_B.t())
        y = scale * (base_out + delta)
        if self.base.bias is not None:
            y = y + self.base.bias.to(y.dtype)
        return y.to(x.dtype)


class DoRAModel(AdapterModel):
    """A model with DoRA on every target linear."""

    def __init__(self, model: nn.Module, config: DoRAConfig, seed: int = 0):
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        super().__init__(
            model, config.target_modules, lambda base, name: DoRALinear(base, config, name, gen)
        )
