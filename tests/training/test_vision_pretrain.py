"""Vision-tower pretraining: targets read from descriptions, a trained tower, a frozen one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smolora.adapters.tiny_llava import build_tiny_llava, get_preset
from smolora.training.data.scene import SceneObject, parse_description
from smolora.training.pretrain import PretrainConfig, pretrain_base
from smolora.training.vision_pretrain import CELLS, HEAD_CLASSES, fact_targets


def test_parse_description_inverts_describe():
    from smolora.training.data.scene import Scene, describe

    scene = Scene(
        "beach",
        [SceneObject("star", "red", "small", (0, 2)), SceneObject("ring", "blue", "large", (2, 1))],
        sign="open",
    )
    facts = parse_description(describe(scene))
    assert facts.background == "beach" and facts.sign == "open" and facts.cover is None
    assert facts.objects == tuple(scene.objects)
    huge = parse_description("This is a city scene. There is a green hexagon in the middle.")
    assert huge.objects == (SceneObject("hexagon", "green", "huge", (1, 1)),)
    cover = parse_description(
        "This is a red book cover. The title is milk. There is a blue circle at the top."
    )
    assert cover.cover == ("red", "milk") and cover.background is None
    assert cover.objects == (SceneObject("circle", "blue", "small", (0, 1)),)
    with pytest.raises(ValueError, match="unknown object"):
        parse_description("This is a city scene. There is a small red blob at the top.")


def test_fact_targets():
    t = fact_targets(
        "This is a night scene. There is a large red square at the right. A sign says cat."
    )
    right = CELLS.index((1, 2))
    assert t["shape"][right] == HEAD_CLASSES["shape"].index("square")
    assert t["colour"][right] == HEAD_CLASSES["colour"].index("red")
    assert t["size"][right] == HEAD_CLASSES["size"].index("large")
    assert int((t["shape"] > 0).sum()) == 1  # every other cell: none
    assert HEAD_CLASSES["scene"][int(t["scene"])] == "night"
    assert HEAD_CLASSES["sign"][int(t["sign"])] == "cat"
    cover = fact_targets(
        "This is a red book cover. The title is milk. There is a blue ring at the top."
    )
    assert HEAD_CLASSES["scene"][int(cover["scene"])] == "cover"


def _tower(folder: Path) -> dict[str, torch.Tensor]:
    w = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in w.items() if "vision_tower" in k}


def test_tower_pretraining_then_a_frozen_tower(data_root: Path, tmp_path: Path):
    kw = dict(data_root=data_root, preset="tiny", steps=3, batch_size=4, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        initial = _tower(Path(build_tiny_llava(get_preset("tiny"), tmp, seed=0)))
    # "language" alone keeps the random tower as built.
    frozen = pretrain_base(
        PretrainConfig(out_dir=tmp_path / "a", train_modules="language", **kw), progress=False
    )
    assert all(torch.equal(initial[k], v) for k, v in _tower(frozen).items())
    # Tower steps change the tower; the language-only alignment after them does not.
    tower = dict(train_modules="language", tower_steps=4, tower_batch_size=4, heldout=4)
    towered = pretrain_base(PretrainConfig(out_dir=tmp_path / "b", **tower, **kw), progress=False)
    after = _tower(towered)
    assert any(not torch.equal(initial[k], v) for k, v in after.items())
    shorter = pretrain_base(
        PretrainConfig(out_dir=tmp_path / "c", **tower, **{**kw, "steps": 1}), progress=False
    )
    assert all(torch.equal(after[k], v) for k, v in _tower(shorter).items())  # alignment left it
    import json

    info = json.loads((towered / "alignment.json").read_text())
    assert info["tower"]["steps"] == 4
    assert set(info["tower"]["heldout_accuracy"]) == set(HEAD_CLASSES)
    assert all(0.0 <= a <= 100.0 for a in info["tower"]["heldout_accuracy"].values())
