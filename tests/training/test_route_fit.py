"""The learned router's task-balanced route assignment (`training/methods/route_fit.py`)."""

from __future__ import annotations

import torch

from smolora.training.methods.route_fit import (
    RouteEntry,
    RouteMemory,
    fit_gate,
    fit_gate_fresh,
    gate_accuracy,
    pick_expert,
)


def test_pick_expert_prefers_free_then_least_loaded_then_lowest() -> None:
    assert pick_expert([0, 0, 0, 0]) == 0
    assert pick_expert([1, 0, 1, 0]) == 1
    assert pick_expert([1, 0, 1, 0], avoid={1}) == 3
    assert pick_expert([1, 1], avoid={0, 1}) == 0  # every expert avoided: least loaded wins


def test_fit_gate_routes_each_cluster_to_its_target() -> None:
    gen = torch.Generator().manual_seed(0)
    common = (
        torch.randn(48, generator=gen) * 5
    )  # a large shared component, as in hidden-state means
    centres = torch.randn(3, 48, generator=gen)
    feats = torch.cat([common + c + 0.1 * torch.randn(20, 48, generator=gen) for c in centres])
    targets = torch.tensor([2] * 20 + [0] * 20 + [3] * 20)
    gate = torch.randn(4, 48, generator=gen) * 0.02
    assert gate_accuracy(gate, feats, targets) < 1.0
    fitted = fit_gate(gate, feats, targets)
    assert fitted.shape == gate.shape and fitted.dtype == gate.dtype
    assert gate_accuracy(fitted, feats, targets) == 1.0
    # Held-out points of the same clusters route the same way (it generalises, not memorises).
    fresh = torch.cat([common + c + 0.1 * torch.randn(5, 48, generator=gen) for c in centres])
    assert gate_accuracy(fitted, fresh, torch.tensor([2] * 5 + [0] * 5 + [3] * 5)) == 1.0
    assert torch.equal(fit_gate(gate, feats, targets), fitted)  # deterministic


def _entry(
    stage: int, task: str, kind: str, expert: int, texts: tuple[str, ...] = ()
) -> RouteEntry:
    return RouteEntry(stage, task, "layers.0.mlp.up_proj", kind, expert, torch.randn(2, 8), texts)  # type: ignore[arg-type]


def _three_task_memory() -> RouteMemory:
    """SQA (own instruction), then VQA and GQA sharing one instruction."""
    return RouteMemory(
        [
            _entry(0, "sqa", "if", 0, ("letter",)),
            _entry(0, "sqa", "vu", 0),
            _entry(1, "vqa", "if", 1, ("word",)),
            _entry(1, "vqa", "vu", 1),
            _entry(2, "gqa", "if", 1, ("word",)),
            _entry(2, "gqa", "vu", 2),
        ]
    )


def test_memory_loads_pairs_reuse_and_truncation() -> None:
    mem = _three_task_memory()
    layer = "layers.0.mlp.up_proj"
    assert mem.loads(layer, "if", 4) == [1, 2, 0, 0]
    assert mem.if_expert_for(layer, ["word"]) == 1 and mem.if_expert_for(layer, ["caption"]) is None
    assert mem.vu_paired_with(layer, 1) == {1, 2}
    # A fourth single-word task keeps IF expert 1 and gets a VU expert not yet paired with it.
    assert pick_expert(mem.loads(layer, "vu", 4), avoid=mem.vu_paired_with(layer, 1)) == 3
    feats, targets = mem.training_set(layer, "vu")
    assert feats.shape == (6, 8) and targets.tolist() == [0, 0, 1, 1, 2, 2]
    again = RouteMemory.from_list(mem.to_list())
    assert [(e.stage, e.expert, e.texts) for e in again.entries] == [
        (e.stage, e.expert, e.texts) for e in mem.entries
    ]
    mem.truncate(2)
    assert {e.task for e in mem.entries} == {"sqa", "vqa"}


def test_fit_gate_fresh_is_regularised_deterministic_and_start_free() -> None:
    gen = torch.Generator().manual_seed(1)
    common = torch.randn(64, generator=gen) * 5
    scales = torch.rand(64, generator=gen) * 10 + 0.1  # uneven dimensions, as in hidden states
    centres = torch.randn(3, 64, generator=gen)
    feats = torch.cat(
        [(common + c + 0.2 * torch.randn(30, 64, generator=gen)) * scales for c in centres]
    )
    targets = torch.tensor([1] * 30 + [3] * 30 + [0] * 30)
    gate = fit_gate_fresh(4, feats, targets)
    assert gate.shape == (4, 64) and gate.dtype == torch.float32
    assert gate_accuracy(gate, feats, targets) == 1.0
    fresh = torch.cat(
        [(common + c + 0.2 * torch.randn(10, 64, generator=gen)) * scales for c in centres]
    )
    assert gate_accuracy(gate, fresh, torch.tensor([1] * 10 + [3] * 10 + [0] * 10)) == 1.0
    assert torch.equal(fit_gate_fresh(4, feats, targets), gate)  # same data, same gate
    assert torch.equal(
        fit_gate_fresh(4, torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), torch.zeros(4, 64)
    )


def test_memory_owned_experts_exclude_reused_ones_and_training_set_stops_at_a_stage() -> None:
    mem = _three_task_memory()
    layer = "layers.0.mlp.up_proj"
    half = 4
    assert mem.owned(layer, 0, half) == [0, 4]
    assert mem.owned(layer, 1, half) == [1, 5]
    assert mem.owned(layer, 2, half) == [2]  # IF expert 1 (global 5) belongs to stage 1
    assert mem.owned("other.layer", 2, half) == []
    feats, targets = mem.training_set(layer, "vu", upto=1)
    assert feats.shape == (4, 8) and targets.tolist() == [0, 0, 1, 1]
