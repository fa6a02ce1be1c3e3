"""Prompt rendering with chat templates we did not write (`server/prompt.py`).

Folders are built in llava-hf's layout (`tests/fixtures/hf_llava.py`) with llava-1.5's
published template, an interleaving ChatML template, a Vicuna-style string template, and a
template that drops images; the embedded model's own template is checked too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from smolora.server.prompt import ChatTemplateError, PromptRenderer
from tests.fixtures.hf_llava import INTERLEAVED_TEMPLATE, TEMPLATES, build_hf_llava

IMAGE = {"type": "image_url", "image_url": {"url": "data:..."}}


def _msgs(*parts: dict, system: str | None = None) -> list[dict]:
    head = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return head + [{"role": "user", "content": list(parts)}]


def _text(t: str) -> dict:
    return {"type": "text", "text": t}


@pytest.fixture(scope="module")
def llava15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_llava(tmp_path_factory.mktemp("llava15-hf"))


def _with_template(src: Path, dst: Path, template: Path) -> Path:
    """A copy of `src` whose chat template is `template` (a .jinja file)."""
    shutil.copytree(src, dst)
    (dst / "chat_template.json").unlink(missing_ok=True)
    (dst / "chat_template.jinja").write_text(template.read_text())
    return dst


def test_llava15_template_gets_image_parts_and_string_content(llava15_dir: Path) -> None:
    r = PromptRenderer.from_model_dir(llava15_dir)
    assert r.content_format == "openai" and r.image_token == "<image>"
    prompt = r.render(_msgs(_text("What colour is the circle?"), IMAGE, system="Be brief."))
    assert prompt == "Be brief. USER: <image>\nWhat colour is the circle? ASSISTANT:"
    # a plain string content (which this template alone renders as nothing) keeps its text
    assert r.render([{"role": "user", "content": "Hello there"}]) == "USER: Hello there ASSISTANT:"
    history = [
        {"role": "user", "content": [IMAGE, _text("Q1")]},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    assert r.render(history) == "USER: <image>\nQ1 ASSISTANT: A1 USER: Q2 ASSISTANT:"


def test_count_tokens_expands_the_image_at_the_config_token_id(llava15_dir: Path) -> None:
    r = PromptRenderer.from_model_dir(llava15_dir)
    prompt = r.render(_msgs(IMAGE, _text("What colour?")))
    ids = r.tokenizer(prompt)["input_ids"]
    image_id = r.tokenizer.convert_tokens_to_ids("<image>")
    assert (
        image_id >= 500 and ids.count(image_id) == 1
    )  # added at the end of the vocabulary, as llava-hf's
    assert r.count_tokens(prompt, 1) == len(ids) + r.image_tokens - 1 and r.image_tokens == 16


def test_interleaved_template_keeps_the_image_where_it_stands(
    llava15_dir: Path, tmp_path: Path
) -> None:
    r = PromptRenderer.from_model_dir(
        _with_template(llava15_dir, tmp_path / "m", INTERLEAVED_TEMPLATE)
    )
    assert r.content_format == "openai"
    prompt = r.render(_msgs(_text("Look: "), IMAGE, _text(" what is it?")))
    assert (
        prompt == "<|im_start|>user\nLook: <image> what is it?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_string_template_gets_placeholders_before_the_text(
    llava15_dir: Path, tmp_path: Path
) -> None:
    r = PromptRenderer.from_model_dir(
        _with_template(llava15_dir, tmp_path / "m", TEMPLATES / "vicuna-string.jinja")
    )
    assert r.content_format == "string"
    assert (
        r.render(_msgs(_text("What colour?"), IMAGE, system="Sys."))
        == "Sys. USER: <image>\nWhat colour? ASSISTANT:"
    )
    assert r.render([{"role": "user", "content": "Hi"}]) == "USER: Hi ASSISTANT:"


def test_template_that_drops_images_is_refused_naming_the_folder(
    llava15_dir: Path, tmp_path: Path
) -> None:
    bad = _with_template(llava15_dir, tmp_path / "bad", TEMPLATES / "drops-images.jinja")
    with pytest.raises(ChatTemplateError) as e:
        PromptRenderer.from_model_dir(bad)
    assert str(bad) in str(e.value) and "exactly one '<image>'" in str(e.value)


def test_folder_without_template_is_refused(llava15_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(llava15_dir, bare)
    (bare / "chat_template.json").unlink()
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        PromptRenderer.from_model_dir(bare)


def test_embedded_model_template_unchanged(tiny_model_dir: Path) -> None:
    r = PromptRenderer.from_model_dir(tiny_model_dir)
    assert r.render(_msgs(IMAGE, _text("What colour?"))) == "USER: <image>\nWhat colour? ASSISTANT:"
