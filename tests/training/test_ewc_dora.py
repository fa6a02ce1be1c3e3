"""The EWC and DoRA baselines: the EWC penalty against its formula, and both methods trained
over two tiny tasks through the real trainer (published checkpoints, resume, evaluation of
a DoRA checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from smolora.adapters.baselines import DoRAModel
from smolora.adapters.checkpoint import list_versions, load_checkpoint
from smolora.adapters.tiny_llava import load_llava
from smolora.training.checkpoint_eval import attach_checkpoint
from smolora.training.config import AdapterSizes, EvalConfig, OptimConfig, RunConfig
from smolora.training.methods.ewc import EWCMethod, ewc_penalty
from smolora.training.trainer import ContinualTrainer

TASKS = ("sqa", "textvqa")


def test_ewc_penalty_is_zero_at_the_anchor_and_fisher_weighted_quadratic() -> None:
    torch.manual_seed(0)
    anchor = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    fisher = {"a": torch.rand(3, 4), "b": torch.zeros(5)}
    fisher["b"][2] = 4.0
    at = {k: v.clone().requires_grad_(True) for k, v in anchor.items()}
    zero = ewc_penalty(at, anchor, fisher, weight=7.0)
    assert float(zero.detach()) == 0.0
    (g_a, g_b) = torch.autograd.grad(zero, list(at.values()))
    assert torch.count_nonzero(g_a) == 0 and torch.count_nonzero(g_b) == 0
    d = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    for scale in (1.0, 2.0, 3.0):
        moved = {k: anchor[k] + scale * d[k] for k in anchor}
        want = 0.5 * 7.0 * sum((fisher[k] * (scale * d[k]) ** 2).sum() for k in anchor)
        got = ewc_penalty(moved, anchor, fisher, weight=7.0)
        torch.testing.assert_close(got, want)
    # Moving a coordinate the Fisher calls unimportant costs nothing; an important one does.
    free = {k: v.clone() for k, v in anchor.items()}
    free["b"][0] += 10.0
    assert float(ewc_penalty(free, anchor, fisher, 7.0)) == 0.0
    pinned = {k: v.clone() for k, v in anchor.items()}
    pinned["b"][2] += 1.0
    assert float(ewc_penalty(pinned, anchor, fisher, 7.0)) == pytest.approx(0.5 * 7.0 * 4.0)


def _run(method: str, data_root: Path, base_dir: Path, out: Path, **kw) -> RunConfig:
    return RunConfig(
        method=method,
        data_root=data_root,
        base_dir=base_dir,
        out_dir=out,
        tasks=TASKS,
        optim=OptimConfig(steps_per_task=kw.pop("steps", 3), batch_size=4),
        adapter=AdapterSizes(rank=8, alpha=16, num_experts=4, lora_rank=4, lora_alpha=8),
        eval=EvalConfig(test_limit=4, unseen=False, robustness=False),
        **kw,
    )


def _lora_tensors(out: Path) -> list[dict[str, torch.Tensor]]:
    return [load_checkpoint(v.path).tensors for v in list_versions(out / "registry")]


def test_ewc_consolidates_each_task_and_holds_important_weights(
    tmp_path: Path, data_root: Path, base_dir: Path
) -> None:
    """Two tasks through the trainer: after task 1 the Fisher is positive on the trained
    LoRA, and a large lambda keeps task 2's Fisher-weighted distance from task 1's weights
    far below what lambda 0 (plain SeqLoRA) lets it drift."""
    drift = {}
    for lam in (0.0, 1e6):
        out = tmp_path / f"ewc-{lam:g}"
        trainer = ContinualTrainer(
            _run("ewc", data_root, base_dir, out, ewc_lambda=lam, ewc_fisher_samples=8, steps=6),
            progress=False,
        )
        res = trainer.run_all()
        method = trainer.method
        assert isinstance(method, EWCMethod)
        assert method.consolidated == list(TASKS)
        assert len(res["matrix"]) == 2 and res["BWT"] is not None
        assert res["throughput"]["train_examples"] == 2 * 6 * 4
        fisher = method.fisher
        assert set(fisher) == {k for k in _lora_tensors(out)[0]}
        assert all(bool((f >= 0).all()) for f in fisher.values())
        assert sum(float(f.sum()) for f in fisher.values()) > 0
        v1, v2 = _lora_tensors(out)
        # The Fisher of task 1 alone weights the distance (recomputed: it is deterministic).
        method.fisher, method.anchors = {}, {}
        method.adapter.load_adapter_state_dict(v1)
        f1 = method.fisher_diagonal(trainer.train_sets["sqa"])
        drift[lam] = sum(float((f1[k] * (v2[k] - v1[k]) ** 2).sum()) for k in f1)
    assert drift[0.0] > 0
    assert drift[1e6] < 0.5 * drift[0.0], drift


def test_ewc_resume_replays_the_fisher_exactly(
    tmp_path: Path, data_root: Path, base_dir: Path
) -> None:
    out = tmp_path / "ewc"
    run = _run("ewc", data_root, base_dir, out, ewc_lambda=1e4, ewc_fisher_samples=4)
    res = ContinualTrainer(run, progress=False).run_all()
    before = _lora_tensors(out)[-1]
    last = list_versions(out / "registry")[-1]
    shutil.rmtree(last.path)
    (out / "registry" / "latest").unlink()
    res2 = ContinualTrainer(run, progress=False).run_all()
    after = _lora_tensors(out)[-1]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res2["matrix"] == res["matrix"]


def test_dora_trains_two_tasks_and_its_checkpoint_evaluates(
    tmp_path: Path, data_root: Path, base_dir: Path
) -> None:
    out = tmp_path / "dora"
    res = ContinualTrainer(_run("dora", data_root, base_dir, out), progress=False).run_all()
    assert len(res["matrix"]) == 2 and isinstance(res["AP"], float)
    versions = list_versions(out / "registry")
    assert [v.task for v in versions] == list(TASKS)
    v1, v2 = (load_checkpoint(v.path) for v in versions)
    assert v2.manifest.adapter_kind == "dora"
    mags = [k for k in v2.tensors if k.endswith(".magnitude")]
    assert mags and any(not torch.equal(v1.tensors[k], v2.tensors[k]) for k in mags)
    assert any(not torch.equal(v1.tensors[k], v2.tensors[k]) for k in v2.tensors)
    # The published checkpoint re-attaches to a fresh base with identical tensors.
    model, _ = load_llava(base_dir)
    adapter, manifest = attach_checkpoint(model, versions[-1].path, base_dir)
    assert isinstance(adapter, DoRAModel) and manifest.tasks == list(TASKS)
    state = adapter.adapter_state_dict()
    assert all(torch.equal(state[k], v2.tensors[k]) for k in state)
    results = json.loads((out / "results.json").read_text())
    assert results["AP_balanced"] == pytest.approx(res["AP_balanced"])
