"""The chat request parser (`server/api/chat/protocol.py`) and the prompt renderer
(`server/prompt.py`) under generated input (hypothesis):

- any JSON value as a request body validates or raises pydantic's `ValidationError`, nothing else;
- near-valid bodies (every known field drawn from valid and invalid values) posted to the app
  (scripted engine) never get a 5xx: each answer is a completion or a typed OpenAI error;
- any conversation the server accepts renders with each model's chat template, keeps every text,
  places one image placeholder per image, and counts tokens as the tokenizer does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from smolora.server.api.chat.protocol import ChatCompletionRequest
from smolora.server.prompt import PromptRenderer
from tests.fixtures.hf_llava import build_hf_llava
from tests.server.api.conftest import running_app
from tests.server.api.helpers import data_url, image_bytes

JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=30)
)
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=15,
)
IMG = data_url(image_bytes())
TEXT = st.text(max_size=60)


def body_strategy(noise: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Chat bodies: every known field from values around its valid range; with `noise`, each
    value may also be any JSON."""

    def v(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return valid | JSON if noise else valid

    part = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
        st.fixed_dictionaries(
            {
                "type": st.just("image_url"),
                "image_url": st.fixed_dictionaries({"url": st.just(IMG)}),
            }
        ),
        *([JSON] if noise else []),
    )
    message = st.fixed_dictionaries(
        {
            "role": v(st.sampled_from(["user", "system", "assistant", "developer", "tool"])),
            "content": v(TEXT | st.lists(part, max_size=3)),
        },
        optional={"name": v(TEXT)},
    )
    smolora = st.fixed_dictionaries(
        {},
        optional={
            "instruction": v(TEXT),
            "instruction_type": v(st.sampled_from(["vqa_short", "caption", "nope"])),
            "version": v(st.integers(-2, 5)),
            "trace": v(st.booleans()),
            "vu_routing": v(st.sampled_from(["pinned", "per_step"])),
        },
    )
    return st.fixed_dictionaries(
        {
            "model": v(st.sampled_from(["tiny-llava", "tiny-llava@1", "tiny-llava@v2", "x@"])),
            "messages": v(st.lists(message, min_size=0, max_size=3)),
        },
        optional={
            "max_tokens": v(st.integers(-5, 600)),
            "max_completion_tokens": v(st.integers(-5, 600)),
            "temperature": v(st.floats(-1, 3)),
            "top_p": v(st.floats(-0.5, 1.5)),
            "top_k": v(st.integers(-3, 50)),
            "min_p": v(st.floats(-0.5, 1.5)),
            "seed": v(st.integers(-(2**64), 2**64)),
            "n": v(st.integers(-1, 6)),
            "stop": v(TEXT | st.lists(TEXT, max_size=6)),
            "stream": v(st.booleans()),
            "stream_options": v(st.fixed_dictionaries({"include_usage": st.booleans()})),
            "logprobs": v(st.booleans()),
            "top_logprobs": v(st.integers(-1, 30)),
            "min_tokens": v(st.integers(-1, 300)),
            "repetition_penalty": v(st.floats(-1, 3)),
            "presence_penalty": v(st.floats(-3, 3)),
            "ignore_eos": v(st.booleans()),
            "smolora": v(smolora),
            **({"logit_bias": JSON, "tools": JSON, "response_format": JSON} if noise else {}),
        },
    )


BODY = body_strategy(noise=True) | body_strategy(noise=False)


@settings(max_examples=400, deadline=None)
@given(body=JSON | BODY)
def test_the_request_model_validates_or_raises_a_validation_error(body: Any) -> None:
    try:
        ChatCompletionRequest.model_validate(body)
    except ValidationError:
        pass


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, registry: Path):  # noqa: ANN201 - a (client, engine, embedder) triple
    with running_app(tiny_model_dir, registry, max_images_per_request=2, max_n=4) as ctx:
        yield ctx


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(body=BODY)
def test_no_generated_request_gets_a_server_error(app: Any, body: dict[str, Any]) -> None:
    client = app[0]
    r = client.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True))
    event(f"status {r.status_code}")
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        if body.get("stream") is True:
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            assert r.json()["object"] == "chat.completion"
    else:
        err = r.json()["error"]
        assert err["message"] and err["type"]


VISIBLE = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40
).filter(lambda t: t.strip() and "<image>" not in t and "{" not in t)


@pytest.fixture(scope="module")
def renderers(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    hf = build_hf_llava(tmp_path_factory.mktemp("fuzz-llava15-hf"))
    return [PromptRenderer.from_model_dir(tiny_model_dir), PromptRenderer.from_model_dir(hf)]


CONVERSATION = st.lists(
    st.tuples(st.sampled_from(["system", "user", "assistant"]), st.lists(VISIBLE, max_size=2)),
    min_size=0,
    max_size=3,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=CONVERSATION, last=st.lists(VISIBLE, max_size=2), image=st.booleans())
def test_the_renderer_keeps_texts_places_images_and_counts_tokens(
    renderers: list[Any], history: list[tuple[str, list[str]]], last: list[str], image: bool
) -> None:
    messages = [
        {"role": role, "content": [{"type": "text", "text": t} for t in texts]}
        for role, texts in history
        if texts
    ]
    parts: list[dict[str, Any]] = [{"type": "image_url"}] if image else []
    parts += [{"type": "text", "text": t} for t in last]
    if not parts:
        parts = [{"type": "text", "text": "hi"}]
    messages.append({"role": "user", "content": parts})
    for renderer in renderers:
        prompt = renderer.render(messages)
        assert prompt.count(renderer.image_token) == int(image)
        for m in messages:
            for p in m["content"]:
                if p["type"] == "text":
                    assert p["text"].strip() in prompt
        ids = renderer.tokenizer(prompt)["input_ids"]
        assert renderer.count_tokens(prompt, int(image)) == len(ids) + int(image) * (
            renderer.image_tokens - 1
        )
