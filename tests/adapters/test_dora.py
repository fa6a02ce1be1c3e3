"""DoRA against its decomposition formula: identity at init, merged weight = m ⊙ V/‖V‖_row,
the forward equals a plain linear with the merged weight, and the norm's gradient switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smolora.adapters.baselines import DoRAConfig, DoRALinear, DoRAModel


def _model() -> nn.Module:
    model = nn.Sequential()
    model.add_module("mlp", nn.Module())
    model.mlp.up_proj = nn.Linear(6, 5)
    model.mlp.down_proj = nn.Linear(5, 6, bias=False)
    return model


def test_dora_at_init_equals_the_base_layer() -> None:
    torch.manual_seed(0)
    model = _model()
    x = torch.randn(2, 3, 6)
    before = model.mlp.down_proj(model.mlp.up_proj(x))
    dora = DoRAModel(
        model,
        DoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=("mlp.up_proj", "mlp.down_proj")),
    )
    torch.testing.assert_close(model.mlp.down_proj(model.mlp.up_proj(x)), before)
    layer = dora.layers["mlp.up_proj"]
    torch.testing.assert_close(layer.magnitude, layer.base.weight.norm(dim=1))
    assert set(dora.adapter_state_dict()) == {
        f"mlp.{p}.{t}" for p in ("up_proj", "down_proj") for t in DoRALinear.TENSORS
    }
    assert dora.detach().mlp.up_proj is layer.base


def _trained_layer(detach_norm: bool = True) -> DoRALinear:
    torch.manual_seed(1)
    base = nn.Linear(6, 5).requires_grad_(False)  # frozen, as `AdapterModel` leaves it
    layer = DoRALinear(base, DoRAConfig(rank=3, alpha=6, dropout=0.0, detach_norm=detach_norm), "x")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.magnitude.mul_(torch.rand(5) + 0.5)
    return layer


def test_merged_weight_is_the_decomposition_formula() -> None:
    layer = _trained_layer()
    w0, a, b, m = layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude
    v = w0 + (6 / 3) * b @ a  # direction before normalisation, scaling alpha / r = 2
    want = torch.stack([m[i] * v[i] / torch.sqrt((v[i] ** 2).sum()) for i in range(5)])
    torch.testing.assert_close(layer.merged_weight(), want)
    # Every row of the merged weight has exactly the magnitude's norm.
    torch.testing.assert_close(layer.merged_weight().norm(dim=1), m)


def test_forward_equals_a_linear_with_the_merged_weight() -> None:
    layer = _trained_layer()
    x = torch.randn(4, 6)
    want = nn.functional.linear(x, layer.merged_weight(), layer.base.bias)
    torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_norm_gradient_switch(detach_norm: bool) -> None:
    """The forward is the same either way; with the norm attached the gradient is the
    full derivative of the merged-weight formula, with it detached it is not."""
    layer = _trained_layer(detach_norm)
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    g = layer.lora_B.grad.clone()
    ref = _trained_layer(False)
    nn.functional.linear(x, ref.merged_weight(), ref.base.bias).sum().backward()
    assert torch.allclose(g, ref.lora_B.grad, atol=1e-6) is (not detach_norm)
    assert layer.magnitude.grad is not None and layer.base.weight.grad is None
