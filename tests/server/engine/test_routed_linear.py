"""The engine's batched routed kernel (`RoutedAdapter` + `RowRoutingState`) against the
reference `SMoLoRALinear`, request by request, without vLLM: requests on two checkpoint
slots, packed into one flat token stream, prefill then decode, pinned and per-step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from smolora.adapters.smolora import RoutingContext, SMoLoRAConfig, SMoLoRALinear
from smolora.server.engine.config import AdapterLayout
from smolora.server.engine.routed_linear import RoutedAdapter
from smolora.server.engine.row_state import RowRoutingState

D_IN, D_OUT, E, RANK = 24, 20, 4, 8


def _reference_layers(seed: int, names: list[str]) -> dict[str, SMoLoRALinear]:
    cfg = SMoLoRAConfig(num_experts=E, rank=RANK, alpha=16.0, dropout=0.0, gate_init_std=0.5)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names:
        base = nn.Linear(D_IN, D_OUT, bias=False)
        nn.init.zeros_(base.weight)  # the layer's output is then the SMoLoRA delta alone
        layer = SMoLoRALinear(base, cfg, name).eval()
        layer.reset_parameters(generator=gen)
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
        layers[name] = layer
    return layers


def _tensors(layers: dict[str, SMoLoRALinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in layers.items():
        for t in ("lora_A", "lora_B", "gate_vu", "gate_if", "fuse_vu", "fuse_if"):
            out[f"{name}.{t}"] = getattr(layer, t).detach()
    return out


def _params(key: int, slot: int, u: torch.Tensor, mode: str) -> SimpleNamespace:
    return SimpleNamespace(
        extra_args={
            "smolora": {"key": key, "slot": slot, "instruction": u.tolist(), "vu_routing": mode}
        }
    )


def _reference(
    layer: SMoLoRALinear,
    u: torch.Tensor,
    prompt: torch.Tensor,
    decode: list[torch.Tensor],
    mode: str,
) -> tuple[list[torch.Tensor], RoutingContext]:
    """The reference layer's outputs for one request: prompt forward, then one forward per
    decode token (as `generate_batch` drives it)."""
    ctx = RoutingContext(u[None], vu_routing=mode)  # type: ignore[arg-type]
    layer.context = ctx
    outs = [layer(prompt[None])[0]]
    outs += [layer(x[None, None])[0, 0] for x in decode]
    layer.context = None
    return outs, ctx


@pytest.mark.parametrize("mode", ["pinned", "per_step"])
def test_packed_requests_on_two_slots_match_reference(mode: str) -> None:
    names = ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]
    slots = [_reference_layers(1, names), _reference_layers(2, names)]
    layout = AdapterLayout(
        num_experts=E, rank=RANK, instruction_dim=384, num_slots=2, trace_step_routes=4
    )
    state = RowRoutingState(layout, max_rows=4, device=torch.device("cpu"))
    adapter = RoutedAdapter(
        layout, names, [0, D_OUT], D_IN, D_OUT, 2 * D_OUT, state, False, torch.float32
    )
    state.finalize()
    for s, layers in enumerate(slots):
        adapter.load_slot(s, _tensors(layers), state)
        state.slot_scaling[s] = 16.0 / RANK
        state.slot_versions[s] = {"version": s + 1}

    gen = torch.Generator().manual_seed(7)
    lens = [5, 3, 7]
    req_slot = [0, 1, 1]
    us = [torch.randn(384, generator=gen) for _ in lens]
    prompts = [torch.randn(n, D_IN, generator=gen) for n in lens]
    decodes = [[torch.randn(D_IN, generator=gen) for _ in range(3)] for _ in lens]
    state.apply_batch_update(
        SimpleNamespace(
            removed=[],
            moved=[],
            added=[
                (i, _params(10 + i, req_slot[i], us[i], mode), [0] * n, [])
                for i, n in enumerate(lens)
            ],
        )
    )

    # Prefill: all prompts packed in one step; then three decode steps of one token each.
    got: list[list[torch.Tensor]] = [[] for _ in lens]
    x = torch.cat(prompts)
    positions = torch.cat([torch.arange(n) for n in lens])
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    step = state.text_step(positions, qsl, len(lens), int(x.shape[0]))
    delta = adapter.delta(x, step)
    state.finish_step(step)
    for i, part in enumerate(delta.split(lens)):
        got[i].append(part)
    for t in range(3):
        x = torch.stack([d[t] for d in decodes])
        positions = torch.tensor([n + t for n in lens])
        step = state.text_step(positions, torch.arange(len(lens) + 1), len(lens), len(lens))
        delta = adapter.delta(x, step)
        state.finish_step(step)
        for i in range(len(lens)):
            got[i].append(delta[i])

    traces = state.traces([10, 11, 12])
    for i in range(len(lens)):
        ref_cat = []
        trace = traces[10 + i]
        assert trace is not None
        for j, name in enumerate(names):
            outs, ctx = _reference(slots[req_slot[i]][name], us[i], prompts[i], decodes[i], mode)
            ref_cat.append(outs)
            route = ctx.routes[name]
            entry = trace["layers"][j]
            assert (entry["layer"], entry["vu_expert"], entry["if_expert"]) == (
                name,
                int(route.vu_expert[0]),
                int(route.if_expert[0]),
            )
            mean = route.mean_fusion()[0]
            assert entry["w_vu"] == pytest.approx(float(mean[0]), abs=1e-5)
            if mode == "per_step":
                assert entry["vu_steps"] == [int(s[0]) for s in route.vu_steps]
        for k in range(4):  # prefill + 3 decode forwards
            want = torch.cat([ref_cat[0][k], ref_cat[1][k]], dim=-1)
            torch.testing.assert_close(got[i][k], want, atol=1e-5, rtol=1e-4)


def test_base_requests_and_padding_get_no_delta() -> None:
    names = ["layers.0.mlp.down_proj"]
    layout = AdapterLayout(num_experts=E, rank=RANK, instruction_dim=384, num_slots=1)
    state = RowRoutingState(layout, max_rows=2, device=torch.device("cpu"))
    adapter = RoutedAdapter(layout, names, [0], D_IN, D_OUT, D_OUT, state, False, torch.float32)
    state.finalize()
    adapter.load_slot(0, _tensors(_reference_layers(3, names)), state)
    state.slot_scaling[0] = 2.0
    state.slot_versions[0] = {"version": 1}
    u = torch.randn(384)
    state.apply_batch_update(
        SimpleNamespace(
            removed=[],
            moved=[],
            added=[
                (0, _params(1, 0, u, "pinned"), [0] * 3, []),
                (1, SimpleNamespace(extra_args=None), [0] * 2, []),
            ],
        )
    )
    x = torch.randn(7, D_IN)  # 3 tokens of the SMoLoRA request, 2 of a base request, 2 padding
    step = state.text_step(torch.tensor([0, 1, 2, 0, 1, 0, 0]), torch.tensor([0, 3, 5]), 2, 5)
    delta = adapter.delta(x, step)
    assert delta[:3].abs().sum() > 0
    assert torch.equal(delta[3:], torch.zeros(4, D_OUT))


def test_condensing_move_releases_the_overwritten_request() -> None:
    """vLLM refills a removed row by moving the last row into it without listing the removal:
    the finished request's trace must survive, and its key must not point at the new row."""
    names = ["layers.0.mlp.down_proj"]
    layout = AdapterLayout(num_experts=E, rank=RANK, instruction_dim=384, num_slots=1)
    state = RowRoutingState(layout, max_rows=3, device=torch.device("cpu"))
    RoutedAdapter(layout, names, [0], D_IN, D_OUT, D_OUT, state, False, torch.float32)
    state.finalize()
    state.slot_versions[0] = {"version": 1}
    u = torch.randn(384)
    state.apply_batch_update(
        SimpleNamespace(
            removed=[],
            moved=[],
            added=[(i, _params(i, 0, u, "pinned"), [0] * 4, []) for i in range(3)],
        )
    )
    state.row_count[0] = 5.0  # request 0 processed tokens
    move = SimpleNamespace(name="UNIDIRECTIONAL")
    state.apply_batch_update(SimpleNamespace(removed=[], added=[], moved=[(2, 0, move)]))
    assert state.key_to_row == {1: 1, 2: 0}
    assert 0 in state.parked and float(state.parked[0].token_count[0]) == 5.0
    assert state.traces([0])[0] is not None and 0 not in state.parked
