"""A resumed alignment equals an uninterrupted one; held-out losses are recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolora.training import pretrain
from smolora.training.pretrain import PretrainConfig, ResumeMismatchError, pretrain_base


def _cfg(data_root: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(
        data_root=data_root,
        out_dir=out,
        preset="tiny",
        steps=6,
        batch_size=4,
        num_threads=1,
        dtype="float32",
        checkpoint_every=2,
        heldout=4,
    )
    return PretrainConfig(**{**base, **kw})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, batches: int) -> None:
    """Make the `batches`+1-th training batch raise, as a killed process would stop."""
    real = pretrain.ExampleEncoder.collate_train
    calls = {"train": 0}

    def collate(self, examples):
        if len(examples) == 4:  # training batches (held-out batches have 4 too: count all)
            calls["train"] += 1
            if calls["train"] > batches:
                raise KeyboardInterrupt
        return real(self, examples)

    monkeypatch.setattr(pretrain.ExampleEncoder, "collate_train", collate)


def test_resumed_alignment_equals_uninterrupted(data_root: Path, tmp_path: Path, monkeypatch):
    whole = pretrain_base(_cfg(data_root, tmp_path / "whole"), progress=False)
    # 4 training batches, plus the held-out batches of the checkpoints at steps 2 and 4.
    _interrupt_after(monkeypatch, 4 + 2)
    with pytest.raises(KeyboardInterrupt):
        pretrain_base(_cfg(data_root, tmp_path / "split"), progress=False)
    state = tmp_path / "split" / ".resume" / "state.pt"
    assert state.is_file()
    assert torch.load(state, weights_only=False)["step"] == 4
    monkeypatch.undo()
    split = pretrain_base(_cfg(data_root, tmp_path / "split"), progress=False)

    a, b = _weights(whole), _weights(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    info_a = json.loads((whole / "alignment.json").read_text())
    info_b = json.loads((split / "alignment.json").read_text())
    assert info_a["loss_curve"] == info_b["loss_curve"]
    assert info_a["heldout_curve"] == info_b["heldout_curve"]
    assert [s for s, _ in info_a["heldout_curve"]] == [2, 4, 6]
    assert info_a["heldout_loss"] == pytest.approx(info_a["heldout_curve"][-1][1], abs=1e-4)
    assert info_a["heldout_loss"] > 0
    assert not state.exists()  # the state goes once the base is saved


def test_resume_refuses_other_settings(data_root: Path, tmp_path: Path, monkeypatch):
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        pretrain_base(_cfg(data_root, tmp_path / "b", heldout=0), progress=False)
    monkeypatch.undo()
    with pytest.raises(ResumeMismatchError, match="other settings"):
        pretrain_base(_cfg(data_root, tmp_path / "b", heldout=0, lr=1e-3), progress=False)


def test_heldout_must_leave_training_data(data_root: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="leaves no training data"):
        pretrain_base(_cfg(data_root, tmp_path / "c", heldout=10_000), progress=False)
