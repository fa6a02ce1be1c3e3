"""The embedded tiny LLaVA: deterministic build, tokenizer, chat template, processor."""

from __future__ import annotations

import pytest
import torch

from smolora.adapters.checkpoint import base_model_fingerprint
from smolora.adapters.tiny_llava import PRESETS, build_tiny_llava, get_preset, load_llava
from smolora.adapters.tiny_llava.presets import TinyLlavaPreset
from tests.adapters.helpers import chat_prompt, shape_image


def test_same_seed_builds_the_same_model(tiny_model_dir, tmp_path) -> None:
    again = build_tiny_llava(get_preset("tiny"), tmp_path / "again", seed=0)
    assert base_model_fingerprint(again) == base_model_fingerprint(tiny_model_dir)
    other = build_tiny_llava(get_preset("tiny"), tmp_path / "other", seed=1)
    assert base_model_fingerprint(other) != base_model_fingerprint(tiny_model_dir)


def test_tokenizer_specials_roundtrip_and_chat_template(tiny_model_dir) -> None:
    _, processor = load_llava(tiny_model_dir)
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "<image>",
    ]
    text = "Ünïcode and unseen words: zebra 42!"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    prompt = chat_prompt(processor, "What colour is the shape?")
    assert prompt == "USER: <image>\nWhat colour is the shape? ASSISTANT:"
    full = processor.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}]
    )
    assert full == "USER: hi ASSISTANT: red</s>"


def test_processor_expands_image_tokens_and_model_runs(tiny_model_dir) -> None:
    model, processor = load_llava(tiny_model_dir)
    preset = get_preset("tiny")
    inputs = processor(
        images=[shape_image((10, 200, 10))],
        text=[chat_prompt(processor, "What colour?")],
        return_tensors="pt",
    )
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == preset.image_tokens
    assert inputs["pixel_values"].shape == (1, 3, preset.image_size, preset.image_size)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], preset.vocab_size)
    assert torch.isfinite(logits).all()


def test_presets_respect_vllm_cpu_head_dim() -> None:
    for p in PRESETS.values():
        assert p.text_hidden // p.text_heads >= 32
    with pytest.raises(ValueError, match="head_dim"):
        TinyLlavaPreset(**{**get_preset("tiny").to_dict(), "text_heads": 4})
    with pytest.raises(KeyError, match="known"):
        get_preset("huge")
