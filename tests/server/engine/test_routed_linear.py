"""The engine's batched routed kernel (`RoutedAdapter` + `RowRoutingState`) against the
reference `SMoLoRALinear`, request by request, without vLLM: requests on two checkpoint
slots, packed into one flat token stream, prefill then decode, pinned and per-step."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from smolora.adapters.smolora import RoutingContext, SMoLoRAConfig, SMoLoRALinear
from smolora.server.engine.config import AdapterLayout
from smolora.server.engine.routed_linear import RoutedAdapter
from smolora.server.engine.row_state import RowRoutingState
from smolora.server.engine.sharding import Shard

D_IN, D_OUT, E, RANK = 24, 20, 4, 8


def _reference_layers(seed: int, names: list[str], d_out: int = D_OUT) -> dict[str, SMoLoRALinear]:
    cfg = SMoLoRAConfig(num_experts=E, rank=RANK, alpha=16.0, dropout=0.0, gate_init_std=0.5)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names:
        base = nn.Linear(D_IN, d_out, bias=False)
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


D_OUT_TP = 32  # halves stay 16-byte aligned for grouped matmuls


class _TwoRanks:
    """Two tensor-parallel ranks as threads: `all_reduce` waits for both ranks' tensors and
    gives each their sum (what vLLM's all-reduce does across worker processes)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2)
        self.parts: list[torch.Tensor | None] = [None, None]
        self.calls = 0

    def reducer(self, rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = self.parts[0] + self.parts[1]  # type: ignore[operator]
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            return total

        return all_reduce


@pytest.mark.parametrize("split", ["output", "input"])
@pytest.mark.parametrize("mode", ["pinned", "per_step"])
def test_two_tensor_parallel_ranks_equal_the_unsharded_layer(split: str, mode: str) -> None:
    """A fused gate/up linear split by output (column-parallel) and a down linear split by
    input (row-parallel), each on two ranks: the ranks' deltas put together (output slices
    side by side; input split: every rank's full delta) equal the unsharded layer's, with
    the same routes and fusion weights, for a prefill and per-step decodes on two slots."""
    names = (
        ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"]
        if split == "output"
        else ["layers.0.mlp.down_proj"]
    )
    d_total = D_OUT_TP * len(names)
    offsets = [j * D_OUT_TP for j in range(len(names))]
    slots = [_reference_layers(5, names, D_OUT_TP), _reference_layers(6, names, D_OUT_TP)]
    layout = AdapterLayout(
        num_experts=E, rank=RANK, instruction_dim=384, num_slots=2, trace_step_routes=4
    )
    ranks = _TwoRanks()
    gen = torch.Generator().manual_seed(9)
    lens, req_slot = [5, 3, 6], [0, 1, 0]
    us = [torch.randn(384, generator=gen) for _ in lens]
    prefill = torch.randn(sum(lens), D_IN, generator=gen)
    decodes = [torch.randn(len(lens), D_IN, generator=gen) for _ in range(3)]

    def run(shard: Shard | None) -> tuple[list[torch.Tensor], dict]:
        state = RowRoutingState(layout, max_rows=4, device=torch.device("cpu"))
        kw = {} if shard is None else {"shard": shard}
        adapter = RoutedAdapter(
            layout, names, offsets, D_IN, D_OUT_TP, d_total, state, False, torch.float32, **kw
        )
        state.finalize()
        for s, layers in enumerate(slots):
            adapter.load_slot(s, _tensors(layers), state)
            state.slot_scaling[s] = 16.0 / RANK
            state.slot_versions[s] = {"version": s + 1}
        added = [
            (i, _params(20 + i, req_slot[i], us[i], mode), [0] * n, []) for i, n in enumerate(lens)
        ]
        state.apply_batch_update(SimpleNamespace(removed=[], moved=[], added=added))
        lo, hi = (0, D_IN) if shard is None or split == "output" else shard.bounds(D_IN, "in")
        outs = []
        positions = torch.cat([torch.arange(n) for n in lens])
        qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
        step = state.text_step(positions, qsl, len(lens), int(prefill.shape[0]))
        outs.append(adapter.delta(prefill[:, lo:hi].contiguous(), step))
        state.finish_step(step)
        for t, x in enumerate(decodes):
            positions = torch.tensor([n + t for n in lens])
            step = state.text_step(positions, torch.arange(len(lens) + 1), len(lens), len(lens))
            outs.append(adapter.delta(x[:, lo:hi].contiguous(), step))
            state.finish_step(step)
        return outs, state.traces([20, 21, 22])

    want, want_traces = run(None)
    results: list = [None, None]

    def rank_main(r: int) -> None:
        results[r] = run(Shard(r, 2, split, all_reduce=ranks.reducer(r)))  # type: ignore[arg-type]

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    (out0, tr0), (out1, tr1) = results  # type: ignore[misc]
    for traces in (tr0, tr1):  # routes exactly; fusion weights up to float32 summation order
        assert traces.keys() == want_traces.keys()
        for key, want_trace in want_traces.items():
            for got_l, want_l in zip(traces[key]["layers"], want_trace["layers"], strict=True):
                for field, value in want_l.items():
                    if isinstance(value, float):
                        assert got_l[field] == pytest.approx(value, abs=1e-5), (key, field)
                    else:
                        assert got_l[field] == value, (key, field)
    for k, w in enumerate(want):
        if split == "output":  # each rank holds its half of every sublayer's output
            half = D_OUT_TP // 2
            got = torch.cat(
                [
                    torch.cat([o[k][:, j * half : (j + 1) * half] for o in (out0, out1)], -1)
                    for j in range(len(names))
                ],
                -1,
            )
        else:
            torch.testing.assert_close(out0[k], out1[k], atol=0, rtol=0)
            got = out0[k]
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-4)
    if split == "input":
        assert ranks.calls > 0  # partial gate logits and A x were summed across the ranks
    else:
        assert ranks.calls == 0  # the output split needs no communication


def test_shard_refuses_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="rank"):
        Shard(2, 2, "output")
    with pytest.raises(ValueError, match="split"):
        Shard(0, 2, "none")
    with pytest.raises(ValueError, match="all_reduce"):
        Shard(0, 2, "input")
    with pytest.raises(ValueError, match="does not split"):
        Shard(0, 3, "output").local(20, "output")
