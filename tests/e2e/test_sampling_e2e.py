"""End to end: vLLM's sampling extras through the real server and engine, via `openai`.

`ignore_eos` yields exactly the requested completion tokens (streaming and not) for
requests that otherwise end at EOS; `logprobs` + `top_logprobs` come back in OpenAI's
shape with the greedy choice the most likely token; `top_k=1` samples greedily; bad
values and a lone UTF-16 surrogate in the text are typed 400s naming the field.
Shares the session's `remote` server (tests/e2e/conftest.py).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import RemoteServer
from tests.server.api.helpers import data_url, image_bytes, user_message

pytestmark = pytest.mark.e2e

IMG = data_url(image_bytes("PNG", (32, 32), (40, 200, 40)))
QUESTIONS = [
    "Describe the image.",
    "What is in the picture?",
    "Where is the ball?",
    "Is there a cat?",
]


def _client(remote: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=remote.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, text: str, **kw: Any) -> Any:
    kw.setdefault("model", "tiny-llava")
    return client.chat.completions.create(messages=[user_message(text, [IMG])], **kw)


def test_ignore_eos_gives_exactly_the_requested_tokens(remote: RemoteServer) -> None:
    client = _client(remote)
    max_tokens = 60
    early = []
    for seed in range(24):  # hot sampling over 512 tokens: some requests meet EOS early
        resp = _ask(client, QUESTIONS[seed % 4], max_tokens=max_tokens, temperature=2.0, seed=seed)
        if resp.choices[0].finish_reason == "stop" and resp.usage.completion_tokens < max_tokens:
            early.append(seed)
    assert early, "no request met EOS: the test would not show that ignore_eos ignores it"
    for seed in early:
        resp = _ask(
            client,
            QUESTIONS[seed % 4],
            max_tokens=max_tokens,
            temperature=2.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        assert (
            resp.usage.completion_tokens == max_tokens and resp.choices[0].finish_reason == "length"
        )
        stream = _ask(
            client,
            QUESTIONS[seed % 4],
            max_tokens=max_tokens,
            temperature=2.0,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == max_tokens


def test_logprobs_through_the_sdk(remote: RemoteServer) -> None:
    client = _client(remote)
    resp = _ask(client, QUESTIONS[0], max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(
            entry.token.encode("utf-8", errors="replace")
        )
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-6)
        assert entry.top_logprobs[0].token == entry.token
    stream = _ask(
        client,
        QUESTIONS[0],
        max_tokens=6,
        temperature=0.0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    streamed = [
        e
        for c in stream
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])


def test_top_k_one_and_penalties_are_served(remote: RemoteServer) -> None:
    client = _client(remote)
    greedy = _ask(client, QUESTIONS[1], max_tokens=8, temperature=0.0)
    top1 = _ask(
        client, QUESTIONS[1], max_tokens=8, temperature=1.0, seed=3, extra_body={"top_k": 1}
    )
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    extras = {"min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 4}
    resp = _ask(
        client,
        QUESTIONS[1],
        max_tokens=8,
        temperature=0.7,
        seed=1,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body=extras,
    )
    assert resp.usage.completion_tokens >= 4


@pytest.mark.parametrize(
    "body,param",
    [
        ({"extra_body": {"top_k": -2}}, "top_k"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"extra_body": {"min_tokens": 9}}, "min_tokens"),
    ],
)
def test_bad_sampling_values_are_400s_naming_the_field(
    remote: RemoteServer, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        _ask(_client(remote), QUESTIONS[0], max_tokens=4, **body)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_lone_surrogate_is_a_400_naming_the_field(remote: RemoteServer) -> None:
    body = {
        "model": "tiny-llava",
        "max_tokens": 2,
        "messages": [
            {"role": "system", "content": "Be brief."},
            user_message("Hi \ud800 there", [IMG]),
        ],
    }
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as the escape \ud800
    assert b"\\ud800" in raw
    r = httpx.post(
        remote.url + "/v1/chat/completions",
        content=raw,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].content[1].text"
    assert "surrogate" in r.json()["error"]["message"]
    assert _ask(_client(remote), QUESTIONS[0], max_tokens=2).choices[0].message.content is not None


def _bench_server_module() -> Any:
    """`bench/server.py` (bench/ is scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "server.py"
    spec = importlib.util.spec_from_file_location("bench_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_vllm_benchmark_client_gets_exactly_the_requested_tokens(
    remote: RemoteServer, tiny_model_dir: Any, tmp_path: Any
) -> None:
    """vLLM's own serving benchmark client (openai-chat, random-mm, --ignore-eos), as
    bench/server.py runs it, against our server: every request generates exactly the requested
    tokens."""
    bench = _bench_server_module()
    run = bench.VllmBenchRun(num_prompts=6, input_len=24, output_len=40, max_concurrency=3)
    result = bench.vllm_bench_client(run, remote.url, tiny_model_dir, tmp_path)
    assert bench.exact_output_problems(result, run) == []
    assert result["completed"] == 6 and result["output_lens"] == [40] * 6
