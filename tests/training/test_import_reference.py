"""`python -m smolora.training import-reference`: the command a user runs to publish a paper
checkpoint (the conversion itself is tested in tests/adapters/test_reference_checkpoint.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from smolora.adapters.checkpoint import base_model_fingerprint, latest_version, load_checkpoint
from smolora.adapters.reference_checkpoint import cvit_instructions
from smolora.training.cli import main
from tests.adapters.reference_layout import write_reference_checkpoint


def test_import_publishes_with_the_cvit_defaults(
    tmp_path: Path, tiny_model_dir: Path, instruction_encoder, capsys: pytest.CaptureFixture[str]
) -> None:
    emb = instruction_encoder.encode([s.text for s in cvit_instructions()])
    ref = write_reference_checkpoint(
        tmp_path / "ckpt", ins_emb=emb, ins_type=5, dtype=torch.bfloat16
    )
    code = main(
        [
            "import-reference",
            str(ref.path),
            "--base",
            str(tiny_model_dir),
            "--registry",
            str(tmp_path / "reg"),
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == 1 and summary["vu_routing"] == "per_step"
    assert summary["tasks"] == ["scienceqa", "textvqa", "flickr30k", "imagenet", "gqa", "vqav2"]
    assert summary["serve_base"] == str(tiny_model_dir)
    assert min(summary["instruction_similarity"]) > 0.9999
    entry = latest_version(tmp_path / "reg")
    assert (
        entry is not None
        and entry.path.name == "v0001-vqav2"
        and str(entry.path) == summary["path"]
    )
    ckpt = load_checkpoint(entry.path, base_model_fingerprint(tiny_model_dir))
    assert ckpt.manifest.adapter_config["vu_routing"] == "per_step"


def test_import_refusals_exit_2_with_the_reason(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = write_reference_checkpoint(tmp_path / "ckpt", ins_rows=3, ins_type=0)
    args = [
        "import-reference",
        str(ref.path),
        "--base",
        str(tiny_model_dir),
        "--registry",
        str(tmp_path / "reg"),
        "--no-instruction-check",
    ]
    assert main([*args, "--tasks", "a,b"]) == 2
    assert "2 task names given, but ins_emb has 3 rows" in capsys.readouterr().err
    # A projector trained by the reference run needs a patched base copy.
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("multi_modal_projector.linear_1.weight")
    torch.save(
        {"base_model.model.model.mm_projector.0.weight": w + 1},
        ref.path / "non_lora_trainables.bin",
    )
    assert main(args) == 2
    assert "--patch-base" in capsys.readouterr().err
    assert main([*args, "--patch-base", str(tmp_path / "patched")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["serve_base"] == str(tmp_path / "patched") and summary["tasks"] == ["scienceqa"]
    assert latest_version(tmp_path / "reg") is not None
