"""End-to-end smoke run of continual training on the tiny preset (2 tasks, few steps).

Checks the pipeline, not accuracy: checkpoints published per task with a complete
manifest, the accuracy matrix and metrics written, gate freezing after task 1, resuming
from the last published task reproducing the same tensors, and every method running.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from smolora.adapters.checkpoint import base_model_fingerprint, latest_version, list_versions, load_checkpoint
from smolora.adapters.smolora import SMoLoRAConfig
from smolora.training.cli import main
from smolora.training.config import METHOD_NAMES

TASKS = "sqa,textvqa"
SIZES = ["--rank", "8", "--alpha", "16", "--num-experts", "4", "--lora-rank", "4", "--lora-alpha", "8"]


def _train(data_root: Path, base_dir: Path, out: Path, method: str, *extra: str) -> dict:
    argv = [
        "--no-progress", "train", "--method", method, "--data", str(data_root), "--base", str(base_dir),
        "--out", str(out), "--tasks", TASKS, "--steps-per-task", "2", "--batch-size", "4", "--test-limit", "4",
        "--few-shot", "1", "--few-shot-steps", "1", *SIZES, *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def smolora_run(tmp_path_factory: pytest.TempPathFactory, data_root: Path, base_dir: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "smolora_learned"
    return out, _train(data_root, base_dir, out, "smolora_learned", "--router-balance-weight", "0.01")


def test_publishes_a_complete_checkpoint_per_task(smolora_run: tuple[Path, dict], base_dir: Path) -> None:
    out, _ = smolora_run
    versions = list_versions(out / "registry")
    assert [v.task for v in versions] == ["sqa", "textvqa"]
    assert latest_version(out / "registry").version == 2  # type: ignore[union-attr]
    ck = load_checkpoint(versions[-1].path, expected_fingerprint=base_model_fingerprint(base_dir))
    m = ck.manifest
    assert m.adapter_kind == "smolora" and m.tasks == ["sqa", "textvqa"]
    expected = SMoLoRAConfig(num_experts=4, rank=8, alpha=16, dropout=0.05, router_training="learned").to_dict()
    assert m.adapter_config == expected
    assert {t["task"] for t in m.instruction_types} == {"sqa", "textvqa"}
    assert all(len(t["embedding"]) == 384 for t in m.instruction_types)
    assert set(m.eval["row"]) == {"sqa", "textvqa"}
    assert m.training["method"] == "smolora_learned" and "run_key" in m.training
    assert set(ck.tensors) == {f"{layer}.{t}" for layer in m.layers for t in ("lora_A", "lora_B", "gate_vu", "gate_if", "fuse_vu", "fuse_if")}


def test_gates_train_in_task_one_only(smolora_run: tuple[Path, dict]) -> None:
    out, _ = smolora_run
    v1, v2 = (load_checkpoint(v.path).tensors for v in list_versions(out / "registry"))
    gates = [k for k in v1 if k.rsplit(".", 1)[1] in ("gate_vu", "gate_if")]
    assert gates and all(torch.equal(v1[k], v2[k]) for k in gates)
    experts = [k for k in v1 if k.endswith("lora_B")]
    assert any(not torch.equal(v1[k], v2[k]) for k in experts)


def test_matrix_and_metrics_are_written(smolora_run: tuple[Path, dict]) -> None:
    out, res = smolora_run
    matrix = json.loads((out / "matrix.json").read_text())
    assert matrix["tasks"] == ["sqa", "textvqa"]
    assert matrix["matrix"][0][1] is None and None not in matrix["matrix"][1]
    assert res["matrix"] == matrix["matrix"]
    for key in ("AP", "MAP", "BWT", "MIF"):
        assert isinstance(res[key], float)
    a = res["matrix"]
    assert res["AP"] == pytest.approx((a[1][0] + a[1][1]) / 2)
    assert res["BWT"] == pytest.approx(a[1][0] - a[0][0])
    assert set(res["unseen"]) == {"vizwiz", "textcaps", "ocrvqa", "places_1shot"}
    assert set(res["robustness"]["per_task"]) == {"sqa", "textvqa"}


def test_resume_from_last_published_task_is_deterministic(
    smolora_run: tuple[Path, dict], tmp_path: Path, data_root: Path, base_dir: Path
) -> None:
    out, res = smolora_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=True)
    last = list_versions(copy / "registry")[-1]
    before = load_checkpoint(last.path).tensors
    shutil.rmtree(last.path)
    (copy / "registry" / "latest").unlink()
    res2 = _train(data_root, base_dir, copy, "smolora_learned", "--router-balance-weight", "0.01")
    versions = list_versions(copy / "registry")
    assert [v.task for v in versions] == ["sqa", "textvqa"]
    after = load_checkpoint(versions[-1].path).tensors
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res2["matrix"] == res["matrix"]
    # Nothing left to train: a re-run publishes nothing new.
    _train(data_root, base_dir, copy, "smolora_learned", "--router-balance-weight", "0.01")
    assert len(list_versions(copy / "registry")) == 2


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "smolora_learned"])
def test_every_method_runs(method: str, tmp_path: Path, data_root: Path, base_dir: Path) -> None:
    res = _train(data_root, base_dir, tmp_path / method, method, "--no-unseen", "--no-robustness")
    versions = list_versions(tmp_path / method / "registry")
    if method == "zeroshot":
        assert versions == [] and res["BWT"] == 0.0
    elif method == "multitask":
        assert len(versions) == 1 and len(res["matrix"]) == 1 and res["BWT"] is None
    else:
        assert len(versions) == 2 and len(res["matrix"]) == 2
    if method == "dirlora":  # oracle per-task LoRAs cannot forget
        assert res["BWT"] == 0.0


def test_learned_gates_move_in_task_one(smolora_run: tuple[Path, dict], base_dir: Path) -> None:
    from smolora.adapters.smolora import SMoLoRAModel
    from smolora.adapters.tiny_llava import load_llava

    out, _ = smolora_run
    v1 = load_checkpoint(list_versions(out / "registry")[0].path).tensors
    model, _ = load_llava(base_dir)
    init = SMoLoRAModel(model, SMoLoRAConfig(num_experts=4, rank=8, alpha=16, router_training="learned"), seed=0)
    start = init.adapter_state_dict()
    gates = [k for k in v1 if k.rsplit(".", 1)[1] in ("gate_vu", "gate_if")]
    assert any(not torch.equal(v1[k], start[k]) for k in gates)


def test_published_checkpoint_evaluates_like_the_trainer(smolora_run: tuple[Path, dict], data_root: Path, base_dir: Path) -> None:
    from smolora.training.checkpoint_eval import evaluate_checkpoint

    out, res = smolora_run
    got = evaluate_checkpoint(out / "registry", base_dir, data_root, "single", ["sqa", "textvqa"], test_limit=4, progress=False)
    assert got["checkpoint"]["version"] == 2
    assert {t: r["score"] for t, r in got["tasks"].items()} == {t: r["score"] for t, r in res["final"].items()}


def test_routing_report_of_smolora(smolora_run: tuple[Path, dict]) -> None:
    _, res = smolora_run
    share = res["routing"]["sharing"]
    assert share["tasks"] == ["sqa", "textvqa"]
    for kind in ("vu", "if", "both"):
        assert share[kind][0][0] == 1.0 and share[kind][0][1] == share[kind][1][0]
    usage = res["routing"]["usage"]["sqa"]
    assert all(sum(u["vu"]) == sum(u["if"]) == 4 for u in usage.values())
