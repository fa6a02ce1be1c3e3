"""Baseline adapters: plain LoRA and dense MoELoRA against longhand formulas."""

from __future__ import annotations

import torch
from torch import nn

from smolora.adapters.baselines import LoRAConfig, LoRAModel, MoELoRAConfig, MoELoRALinear


def test_lora_starts_as_identity_and_matches_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("mlp", nn.Module())
    model.mlp.up_proj = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    before = model.mlp.up_proj(x)
    lora = LoRAModel(
        model, LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=("mlp.up_proj",))
    )
    layer = lora.layers["mlp.up_proj"]
    torch.testing.assert_close(model.mlp.up_proj(x), before)  # B = 0 at init
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(
        model.mlp.up_proj(x), before + 2.0 * x @ layer.lora_A.t() @ layer.lora_B.t()
    )
    assert set(lora.adapter_state_dict()) == {"mlp.up_proj.lora_A", "mlp.up_proj.lora_B"}
    assert lora.detach().mlp.up_proj is layer.base


def test_moelora_mixes_all_experts_per_token() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = MoELoRALinear(base, MoELoRAConfig(num_experts=4, rank=8, alpha=16, dropout=0.0), "x")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 6)
    y = layer(x)
    p = torch.softmax(x @ layer.router.t(), -1)
    want = base(x) + 2.0 * sum(
        p[..., e : e + 1] * (x @ layer.lora_A[e].t() @ layer.lora_B[e].t()) for e in range(4)
    )
    torch.testing.assert_close(y, want)
