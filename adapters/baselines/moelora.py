"""MoELoRA baseline: E LoRA experts mixed per token by a dense softmax router.

`y = W0 x + b0 + s · Σ_e softmax(R x)_e · B_e A_e dropout(x)` with rank r/E per expert and
s = alpha / r, as in the paper's MoELoRA baseline. Every expert runs on every token; the
router is a bias-free linear on the token itself (no instruction input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from smolora.adapters.adapter_model import AdapterModel
from smolora.adapters.baselines.lora import LoRAConfig


@dataclass
class MoELoRAConfig(LoRAConfig):
    """MoELoRA hyper-parameters: `LoRAConfig` plus E experts sharing the total rank r."""

    num_experts: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_experts < 1 or self.rank % self.num_experts:
            raise ValueError(
                f"rank ({self.rank}) must be a positive multiple of num_experts "
                f"({self.num_experts})"
            )


class MoELoRALinear(nn.Module):
    """A frozen linear plus a dense mixture of LoRA experts."""

    TENSORS = ("lora_A", "lora_B", "router")

    def __init__(
        self,
        base: nn.Linear,
        config: MoELoRAConfig,
        name: str,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        e, r_e = config.num_experts, config.rank // config.num_experts
        self.base, self.name, self.scaling = base, name, config.alpha / config.rank
        dev = base.weight.device
        a = torch.empty(e, r_e, base.in_features).normal_(0.0, config.init_std, generator=generator)
        g = torch.empty(e, base.in_features).normal_(0.0, 0.02, generator=generator)
        self.lora_A = nn.Parameter(a.to(dev))  # [E, r_e, d_in]
        self.lora_B = nn.Parameter(
            torch.zeros(e, base.out_features, r_e, device=dev)
        )  # [E, d_out, r_e]
        self.router = nn.Parameter(g.to(dev))  # [E, d_in]
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(self.lora_A.dtype)
        probs = torch.softmax(xf @ self.router.t(), dim=-1)  # [..., E]
        h = torch.einsum("...d,erd->...er", self.dropout(xf), self.lora_A)  # [..., E, r_e]
        out = torch.einsum("...er,eor->...eo", h, self.lora_B)  # [..., E, d_out]
        delta = self.scaling * (probs.unsqueeze(-1) * out).sum(-2)
        return self.base(x) + delta.to(x.dtype)


class MoELoRAModel(AdapterModel):
    """A model with MoELoRA on every target linear."""

    def __init__(self, model: nn.Module, config: MoELoRAConfig, seed: int = 0):
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        super().__init__(
            model, config.target_modules, lambda base, name: MoELoRALinear(base, config, name, gen)
        )
