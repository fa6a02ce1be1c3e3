"""Plain LoRA, the adapter of the SeqLoRA and DirLoRA baselines.

`y = W0 x + b0 + s · B A dropout(x)` with A ~ N(0, init_std^2), B = 0, s = alpha / r.
DirLoRA (one LoRA per task, oracle task id) is several `LoRAModel` state dicts swapped by
task; SeqLoRA is one `LoRAModel` trained task after task. No routing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from smolora.adapters.adapter_model import AdapterModel
from smolora.adapters.config_dicts import config_to_dict
from smolora.adapters.smolora.config import DEFAULT_TARGET_MODULES


@dataclass
class LoRAConfig:
    """Plain LoRA hyper-parameters (fields as in `SMoLoRAConfig`)."""

    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    init_std: float = 0.01

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank <= 0 or self.alpha <= 0:
            raise ValueError("rank and alpha must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


class LoRALinear(nn.Module):
    """A frozen linear plus one low-rank update."""

    TENSORS = ("lora_A", "lora_B")

    def __init__(
        self,
        base: nn.Linear,
        config: LoRAConfig,
        name: str,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.base, self.name, self.scaling = base, name, config.alpha / config.rank
        dev = base.weight.device
        a = torch.empty(config.rank, base.in_features).normal_(
            0.0, config.init_std, generator=generator
        )
        self.lora_A = nn.Parameter(a.to(dev))  # [r, d_in]
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, config.rank, device=dev)
        )  # [d_out, r]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        delta = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + (self.scaling * delta).to(x.dtype)


class LoRAModel(AdapterModel):
    """A model with plain LoRA on every target linear."""

    def __init__(self, model: nn.Module, config: LoRAConfig, seed: int = 0):
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        super().__init__(
            model, config.target_modules, lambda base, name: LoRALinear(base, config, name, gen)
        )
