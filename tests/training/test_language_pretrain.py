"""Language-model pretraining on text-only skill exercises: text-only batches carry no
picture and decode like one-row batches, the stage trains the language model and leaves the
tower and projector as they were, and an alignment records what it measured."""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from smolora.adapters.tiny_llava import build_tiny_llava, get_preset, load_llava
from smolora.training.data.collate import IGNORE_INDEX, ExampleEncoder
from smolora.training.data.mini_cvit import load_pretrain
from smolora.training.data.reading import KIND_WEIGHTS, exercise_kind, reading_exercise
from smolora.training.evaluate import greedy_generate, no_scope
from smolora.training.language_pretrain import (
    CURRICULUM,
    curriculum_weights,
    pretrain_language,
    skill_exercises,
)
from smolora.training.pretrain import PretrainConfig, pretrain_base
from tests.fixtures.hf_llava import build_hf_llava


def test_text_only_batches_have_no_picture_and_decode_row_by_row(
    base_dir: Path, data_root: Path
) -> None:
    model, processor = load_llava(base_dir)
    enc = ExampleEncoder(processor)
    descriptions = load_pretrain(data_root, limit=4)
    exercises = skill_exercises(descriptions, random.Random(0), text_only=True)
    batch = enc.collate_train(exercises)
    assert "pixel_values" not in batch
    assert not bool((batch["input_ids"] == enc.image_token_id).any())
    for i, ex in enumerate(exercises):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        target = enc.tokenizer.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=False)
        assert target.strip() == ex.answer + enc.eos_token
        assert ex.prompt.split("\n")[-1] in enc.tokenizer.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="mixes text-only and image"):
        enc.collate_train([exercises[0], descriptions[0]])
    with torch.no_grad():
        together = greedy_generate(model, enc.collate_generate(exercises), no_scope, 6, -1)
        alone = [
            greedy_generate(model, enc.collate_generate([ex]), no_scope, 6, -1)[0]
            for ex in exercises
        ]
    assert together == alone  # left padding and positions from the mask: no effect


def test_text_only_prompt_with_llava_15_template(tmp_path: Path, data_root: Path) -> None:
    """A llava-hf folder with llava-1.5's published chat template: a text-only example's
    prompt is its text with no image token, an image example's keeps its image tokens."""
    _, processor = load_llava(build_hf_llava(tmp_path / "hf"))
    enc = ExampleEncoder(processor)
    (description,) = load_pretrain(data_root, limit=1)
    (exercise,) = skill_exercises([description], random.Random(0), True, {"repeat": 1.0})
    text = enc.prompt_text(exercise)
    assert enc.image_token not in text and exercise.prompt in text
    ids = enc.collate_train([exercise])["input_ids"][0]
    assert not bool((ids == enc.image_token_id).any())
    with_image = enc.collate_train([description])["input_ids"][0]
    assert int((with_image == enc.image_token_id).sum()) == enc.num_image_tokens


def test_curriculum_copies_first_and_ends_with_every_kind(data_root: Path) -> None:
    assert abs(sum(share for share, _ in CURRICULUM) - 1.0) < 1e-9
    phases = [curriculum_weights(step, 100) for step in range(100)]
    assert phases[0] == {"repeat": 1.0} and set(phases[-1]) == set(KIND_WEIGHTS)
    starts = [i for i in range(100) if i == 0 or phases[i] is not phases[i - 1]]
    assert [phases[i] for i in starts] == [w for _, w in CURRICULUM]  # in order, once each
    rng = random.Random(0)
    descriptions = load_pretrain(data_root, limit=20)
    drawn = skill_exercises(descriptions, rng, True, {"repeat": 1.0})
    assert {exercise_kind(ex) for ex in drawn} == {"repeat"}
    with pytest.raises(ValueError, match="unknown kind"):
        reading_exercise(descriptions[0], rng, {"spelling": 1.0})


def test_language_stage_trains_only_the_language_model(data_root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model, processor = load_llava(build_tiny_llava(get_preset("tiny"), tmp, seed=0))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = load_pretrain(data_root, limit=12)
    info = pretrain_language(
        model,
        ExampleEncoder(processor),
        data[:8],
        data[8:],
        steps=3,
        batch_size=4,
        lr=1e-3,
        seed=0,
        device=torch.device("cpu"),
        autocast_bf16=False,
        progress=False,
    )
    after = {k: v.detach() for k, v in model.state_dict().items()}
    changed = {k for k, v in initial.items() if not torch.equal(v, after[k])}
    assert changed and all("vision_tower" not in k and "projector" not in k for k in changed)
    assert any("embed_tokens" in k for k in changed) and any("lm_head" in k for k in changed)
    assert info["steps"] == 3 and info["train_seconds"] <= info["seconds"]
    accuracy = info["heldout_accuracy"]
    assert "all" in accuracy and set(accuracy) <= {"all", *KIND_WEIGHTS}
    assert all(0.0 <= v <= 100.0 for v in accuracy.values())
    assert not any(p.requires_grad for p in model.parameters())


def test_alignment_runs_the_language_stage_first(data_root: Path, tmp_path: Path) -> None:
    cfg = PretrainConfig(
        data_root=data_root,
        out_dir=tmp_path / "base",
        preset="tiny",
        steps=1,
        batch_size=4,
        dtype="float32",
        heldout=4,
        language_steps=2,
        language_batch_size=4,
    )
    info = json.loads((pretrain_base(cfg, progress=False) / "alignment.json").read_text())
    assert info["language"]["steps"] == 2 and info["config"]["language_steps"] == 2
    assert "all" in info["language"]["heldout_accuracy"]
    with pytest.raises(ValueError, match="language_steps"):
        replace(cfg, language_steps=-1)
