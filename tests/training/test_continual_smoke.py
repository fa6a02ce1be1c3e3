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

from smolora.adapters.checkpoint import (
    base_model_fingerprint,
    latest_version,
    list_versions,
    load_checkpoint,
)
from smolora.adapters.smolora import SMoLoRAConfig
from smolora.training.cli import main
from smolora.training.config import METHOD_NAMES

TASKS = "sqa,textvqa"
SIZES = [
    "--rank",
    "8",
    "--alpha",
    "16",
    "--num-experts",
    "4",
    "--lora-rank",
    "4",
    "--lora-alpha",
    "8",
]


def _train(data_root: Path, base_dir: Path, out: Path, method: str, *extra: str) -> dict:
    argv = [
        "--no-progress",
        "train",
        "--method",
        method,
        "--data",
        str(data_root),
        "--base",
        str(base_dir),
        "--out",
        str(out),
        "--tasks",
        TASKS,
        "--steps-per-task",
        "2",
        "--batch-size",
        "4",
        "--test-limit",
        "4",
        "--few-shot",
        "1",
        "--few-shot-steps",
        "1",
        *SIZES,
        *extra,
    ]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def smolora_run(
    tmp_path_factory: pytest.TempPathFactory, data_root: Path, base_dir: Path
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run") / "smolora_learned"
    return out, _train(data_root, base_dir, out, "smolora_learned")


def test_publishes_a_complete_checkpoint_per_task(
    smolora_run: tuple[Path, dict], base_dir: Path
) -> None:
    out, _ = smolora_run
    versions = list_versions(out / "registry")
    assert [v.task for v in versions] == ["sqa", "textvqa"]
    assert latest_version(out / "registry").version == 2  # type: ignore[union-attr]
    ck = load_checkpoint(versions[-1].path, expected_fingerprint=base_model_fingerprint(base_dir))
    m = ck.manifest
    assert m.adapter_kind == "smolora" and m.tasks == ["sqa", "textvqa"]
    expected = SMoLoRAConfig(
        num_experts=4, rank=8, alpha=16, dropout=0.05, router_training="learned"
    ).to_dict()
    assert m.adapter_config == expected
    assert {t["task"] for t in m.instruction_types} == {"sqa", "textvqa"}
    assert all(len(t["embedding"]) == 384 for t in m.instruction_types)
    assert set(m.eval["row"]) == {"sqa", "textvqa"}
    assert m.training["method"] == "smolora_learned" and "run_key" in m.training
    assert set(ck.tensors) == {
        f"{layer}.{t}"
        for layer in m.layers
        for t in ("lora_A", "lora_B", "gate_vu", "gate_if", "fuse_vu", "fuse_if")
    }


def test_learned_router_gives_tasks_distinct_routes_and_holds_old_ones(
    smolora_run: tuple[Path, dict],
) -> None:
    """The learned router refits its gates before each task: task 2's instruction gets its
    own IF expert, and task 1's instruction still routes where it did after task 1."""
    from smolora.adapters.instructions import InstructionEncoder

    out, _ = smolora_run
    (e1, v1), (e2, v2) = (
        (v, load_checkpoint(v.path).tensors) for v in list_versions(out / "registry")
    )
    m2 = load_checkpoint(e2.path).manifest
    texts = {t["task"]: t["text"] for t in m2.instruction_types}
    emb = InstructionEncoder().encode([texts["sqa"], texts["textvqa"]]).float()
    layers = [k[: -len(".gate_if")] for k in v1 if k.endswith(".gate_if")]
    assert layers
    for layer in layers:
        r1 = (emb @ v1[f"{layer}.gate_if"].float().t()).argmax(-1)
        r2 = (emb @ v2[f"{layer}.gate_if"].float().t()).argmax(-1)
        assert int(r2[0]) == int(r1[0]), layer  # task 1's route held after refitting
        assert int(r2[0]) != int(r2[1]), layer  # the two instructions use different IF experts
    state = torch.load(out / "method_state.pt", weights_only=True)
    assert {e["task"] for e in state["route_memory"]} == {"sqa", "textvqa"}
    for log in state["fit_log"]:
        for layer, v in log["layers"].items():
            assert v["fit_accuracy"]["if"] == 1.0, layer
            # Text layers see the prompt (instruction, question), so tasks separate; the
            # projector sees only the image, which tasks may share.
            if "projector" not in layer:
                assert v["fit_accuracy"]["vu"] == 1.0, layer


def test_learned_router_keeps_earlier_tasks_parameters(smolora_run: tuple[Path, dict]) -> None:
    """Task 2 trains only the experts it owns: task 1's experts and the (shared) fusion
    vectors are bit-identical after task 2, projector VU experts never train, and task 2's
    own experts did train."""
    out, _ = smolora_run
    v1, v2 = (load_checkpoint(v.path).tensors for v in list_versions(out / "registry"))
    state = torch.load(out / "method_state.pt", weights_only=True)
    half = 2  # --num-experts 4
    routes: dict[tuple[int, str], list[int]] = {}
    for e in state["route_memory"]:
        routes.setdefault((e["stage"], e["layer"]), []).append(
            e["expert"] + (half if e["kind"] == "if" else 0)
        )
    layers = sorted({layer for _, layer in routes})
    assert layers
    changed = 0
    for layer in layers:
        for t in ("fuse_vu", "fuse_if"):
            assert torch.equal(v1[f"{layer}.{t}"], v2[f"{layer}.{t}"]), (layer, t)
        for e in routes[(0, layer)]:
            for t in ("lora_A", "lora_B"):
                assert torch.equal(v1[f"{layer}.{t}"][e], v2[f"{layer}.{t}"][e]), (layer, e)
        changed += sum(
            not torch.equal(v1[f"{layer}.lora_B"][e], v2[f"{layer}.lora_B"][e])
            for e in routes[(1, layer)]
        )
        if layer.startswith("projector."):
            assert torch.count_nonzero(v2[f"{layer}.lora_B"][:half]) == 0, layer
            assert len(routes[(0, layer)]) == 1  # IF only: no VU route is remembered there
    assert changed > 0
    # Every text layer remembers each task's prompt-only mean inputs for its VU gate.
    vu = [e for e in state["route_memory"] if e["kind"] == "vu"]
    assert vu and all(
        e["feats"].shape[0] > 0 and not e["layer"].startswith("projector.") for e in vu
    )


def test_reference_parity_gates_never_change(
    tmp_path: Path, data_root: Path, base_dir: Path
) -> None:
    out = tmp_path / "smolora"
    _train(data_root, base_dir, out, "smolora", "--no-unseen", "--no-robustness", "--few-shot", "1")
    v1, v2 = (load_checkpoint(v.path).tensors for v in list_versions(out / "registry"))
    gates = [k for k in v1 if k.rsplit(".", 1)[1] in ("gate_vu", "gate_if")]
    assert gates and all(torch.equal(v1[k], v2[k]) for k in gates)
    assert any(not torch.equal(v1[k], v2[k]) for k in v1 if k.endswith("lora_B"))


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
    res2 = _train(data_root, base_dir, copy, "smolora_learned")
    versions = list_versions(copy / "registry")
    assert [v.task for v in versions] == ["sqa", "textvqa"]
    after = load_checkpoint(versions[-1].path).tensors
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert res2["matrix"] == res["matrix"]
    # Nothing left to train: a re-run publishes nothing new.
    _train(data_root, base_dir, copy, "smolora_learned")
    assert len(list_versions(copy / "registry")) == 2


@pytest.mark.parametrize(
    "method", [m for m in METHOD_NAMES if m not in ("smolora_learned", "smolora")]
)
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
