"""Chat completions through the HTTP layer (engine held by `ScriptedEngine`): JSON, SSE, n, usage,
extension."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from smolora.server.app import create_app
from smolora.server.settings import ServerSettings
from tests.server.api.helpers import (
    HashingEmbedder,
    ServerThread,
    data_url,
    image_bytes,
    user_message,
)
from tests.server.api.scripted_engine import ScriptedEngine, scripted_factory

AUTH = {"Authorization": "Bearer sk-test"}
IMG = data_url(image_bytes())


def _post(client: Any, **body: Any) -> Any:
    body.setdefault("model", "tiny-llava")
    body.setdefault("messages", [user_message("What colour is the circle?", [IMG])])
    return client.post("/v1/chat/completions", headers=AUTH, json=body)


def _events(text: str) -> list[Any]:
    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_completion_shape_usage_and_extension(served) -> None:
    client, engine, _ = served
    r = _post(
        client,
        max_tokens=4,
        smolora={"trace": True},
        messages=[
            user_message(
                "What colour is the circle?\nAnswer the question using a single word or phrase.",
                [IMG],
            )
        ],
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-llava@2"
    choice = body["choices"][0]
    assert (
        choice["message"] == {"role": "assistant", "content": "a red circle on"}
        and choice["finish_reason"] == "length"
    )
    assert body["usage"]["completion_tokens"] == 4
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4
    ext = body["smolora"]
    assert (
        ext["version"] == 2
        and ext["model"] == "tiny-llava@2"
        and ext["version_name"] == "v0002-caption"
    )
    assert ext["instruction"]["source"] == "snapped" and ext["instruction"]["type"] == "vqa_short"
    assert ext["instruction"]["rule"] == "trailing_imperative"
    layers = ext["trace"][0]["layers"]
    assert {layer["layer"] for layer in layers} >= {"layers.0.mlp.up_proj"} and all(
        0 <= layer["vu_expert"] < 4 for layer in layers
    )
    sent = engine.inputs[-1]
    assert sent.prompt.startswith("USER: <image>\n") and sent.prompt.endswith("ASSISTANT:")
    assert sent.image is not None and sent.image.size == (32, 32) and len(sent.instruction) == 384
    assert sent.max_tokens == 4 and sent.version == 2


def test_trace_is_off_by_default_and_versions_are_selectable(served) -> None:
    client, engine, _ = served
    r = _post(client, max_tokens=2)
    assert r.json()["smolora"]["trace"] is None
    client.post(
        "/admin/checkpoints/load",
        headers={"Authorization": "Bearer admin-test"},
        json={"version": 1},
    )
    for body in (
        {"model": "tiny-llava@1"},
        {"model": "tiny-llava@v1"},
        {"smolora": {"version": 1}},
    ):
        r = _post(client, max_tokens=1, **body)
        assert r.status_code == 200 and r.json()["model"] == "tiny-llava@1", body
        assert engine.inputs[-1].version == 1
    r = _post(client, max_tokens=1, model="tiny-llava")
    assert r.json()["model"] == "tiny-llava@2"


def test_instruction_type_and_text_extension(served) -> None:
    client, engine, _ = served
    r = _post(client, max_tokens=1, smolora={"instruction_type": "caption"})
    assert r.json()["smolora"]["instruction"]["source"] == "type"
    r = _post(client, max_tokens=1, smolora={"instruction": "Count the shapes."})
    ins = r.json()["smolora"]["instruction"]
    assert ins["source"] == "explicit" and ins["text"] == "Count the shapes."


def test_vu_routing_choice_reaches_the_engine_and_the_trace(served) -> None:
    client, engine, _ = served
    r = _post(client, max_tokens=1, smolora={"vu_routing": "per_step", "trace": True})
    assert r.status_code == 200 and engine.inputs[-1].vu_routing == "per_step"
    assert r.json()["smolora"]["trace"][0]["vu_routing"] == "per_step"
    _post(client, max_tokens=1)
    assert engine.inputs[-1].vu_routing is None  # the server's setting, else the version's own
    r = _post(client, max_tokens=1, smolora={"vu_routing": "sometimes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "smolora.vu_routing"


def test_sampling_options_reach_the_engine(served) -> None:
    client, engine, _ = served
    r = _post(
        client, max_completion_tokens=6, temperature=0.5, top_p=0.9, seed=7, stop=["circle"], n=2
    )
    body = r.json()
    assert [c["message"]["content"] for c in body["choices"]] == ["a red ", "a red "]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "stop"]
    seeds = sorted(i.seed for i in engine.inputs[-2:])
    assert seeds == [7, 8] and engine.inputs[-1].temperature == 0.5
    assert body["usage"]["completion_tokens"] == 6
    assert engine.inputs[-1].stop == ["circle"]
    r = _post(client, stop=["a", "b", "c", "d", "e"])  # OpenAI allows up to 4 stop strings
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"


def test_default_max_tokens_is_capped_by_the_context_left(served) -> None:
    client, engine, _ = served
    _post(client)
    sent = engine.inputs[-1]
    prompt_tokens = client.app.state.smolora.renderer.count_tokens(
        sent.prompt, int(sent.image is not None)
    )
    assert prompt_tokens > 16  # one image alone is 16 tokens of the tiny model
    assert sent.max_tokens == min(256, engine.max_model_len - prompt_tokens)


def test_streaming_frames_usage_and_last_chunk_extension(served) -> None:
    client, _, _ = served
    r = _post(
        client,
        stream=True,
        max_tokens=3,
        n=2,
        stream_options={"include_usage": True},
        smolora={"trace": True},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(
        c["object"] == "chat.completion.chunk" and c["model"] == "tiny-llava@2" for c in chunks
    )
    assert {c["choices"][0]["delta"].get("role") for c in chunks[:2]} == {"assistant"}
    text = {0: "", 1: ""}
    finishes = {}
    for c in chunks[:-1]:
        assert "smolora" not in c and c["usage"] is None
        for ch in c["choices"]:
            text[ch["index"]] += ch["delta"].get("content", "")
            if ch["finish_reason"]:
                finishes[ch["index"]] = ch["finish_reason"]
    assert text == {0: "a red circle", 1: "a red circle"} and finishes == {0: "length", 1: "length"}
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    assert [t["index"] for t in last["smolora"]["trace"]] == [0, 1]


def test_streaming_without_usage_puts_extension_on_the_finish_chunk(served) -> None:
    client, _, _ = served
    events = _events(_post(client, stream=True, max_tokens=2).text)
    last = events[-2]
    assert (
        last["choices"][0]["finish_reason"] == "length"
        and last["smolora"]["version"] == 2
        and "usage" not in last
    )


def test_engine_failure_mid_request_is_a_typed_error_and_serving_goes_on(served) -> None:
    from smolora.server.engine.protocol import InvalidRequestError as EngineInputError

    client, engine, _ = served
    engine.fail_next = EngineInputError("prompt has 300 tokens, over the 256 of this model")
    r = _post(client, max_tokens=1)
    assert r.status_code == 400 and "300 tokens" in r.json()["error"]["message"]
    engine.fail_next = EngineInputError("bad things")
    events = _events(_post(client, stream=True, max_tokens=1).text)
    assert events[-2]["error"]["type"] == "invalid_request_error" and events[-1] == "[DONE]"
    engine.fail_next = RuntimeError("boom")
    r = _post(client, max_tokens=1)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert _post(client, max_tokens=1).status_code == 200


def test_official_openai_client_over_a_real_socket(tiny_model_dir: Path, registry: Path) -> None:
    engine = ScriptedEngine()
    settings = ServerSettings(
        model_dir=tiny_model_dir,
        registry_dir=registry,
        served_model_name="tiny-llava",
        api_keys=("sk-x",),
        watch_registry=False,
    )
    app = create_app(settings, scripted_factory(engine), embedder_factory=HashingEmbedder)
    with ServerThread(app) as srv:
        srv.wait_ready()
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="sk-x", max_retries=0)
        msgs = [user_message("Describe the image briefly in one sentence.", [IMG])]
        resp = client.chat.completions.create(
            model="tiny-llava", messages=msgs, max_tokens=3, extra_body={"smolora": {"trace": True}}
        )
        assert (
            resp.choices[0].message.content == "a red circle" and resp.usage.completion_tokens == 3
        )
        assert resp.model == "tiny-llava@2" and resp.smolora["trace"][0]["layers"]
        stream = client.chat.completions.create(
            model="tiny-llava",
            messages=msgs,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a red circle"
        )
        assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].smolora["version"] == 2
        assert [m.id for m in client.models.list()] == ["tiny-llava", "tiny-llava@2"]
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model="gpt-4", messages=msgs)
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=srv.base_url + "/v1", api_key="wrong", max_retries=0
            ).models.list()


def _one_slot_server(tiny_model_dir: Path, registry: Path, engine: ScriptedEngine) -> ServerThread:
    """A server (not yet started) on the scripted engine that admits one request and queues none."""
    settings = ServerSettings(
        model_dir=tiny_model_dir,
        registry_dir=registry,
        served_model_name="tiny-llava",
        watch_registry=False,
        max_concurrent_requests=1,
        max_waiting_requests=0,
    )
    return ServerThread(
        create_app(settings, scripted_factory(engine), embedder_factory=HashingEmbedder)
    )


def test_client_disconnect_aborts_the_engine_request(tiny_model_dir: Path, registry: Path) -> None:
    import httpx

    from tests.server.api.helpers import wait_until

    engine = ScriptedEngine()
    with _one_slot_server(tiny_model_dir, registry, engine) as srv:
        srv.wait_ready()
        engine.hold()
        body = {
            "model": "tiny-llava",
            "messages": [user_message()],
            "stream": True,
            "max_tokens": 5,
        }
        with httpx.Client(base_url=srv.base_url, timeout=10) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                wait_until(lambda: engine.in_flight == 1, what="the request to reach the engine")
                busy = c.post("/v1/chat/completions", json={**body, "stream": False})
                assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        # The stream was closed by the client: the engine request is aborted and the slot freed.
        wait_until(lambda: engine.in_flight == 0, what="the engine request to be aborted")
        engine.release()
        assert engine.aborted
        # ... and counted as aborted (Starlette cancels every await of the response's scope, so
        # the metrics must be recorded before the cleanup awaits anything)
        metrics = httpx.get(srv.base_url + "/metrics").text
        assert 'smolora_request_finish_total{reason="abort"} 1.0' in metrics
        ok = httpx.post(
            srv.base_url + "/v1/chat/completions", json={**body, "stream": False}, timeout=10
        )
        assert ok.status_code == 200


def test_non_streaming_client_disconnect_aborts_the_engine_request(
    tiny_model_dir: Path, registry: Path
) -> None:
    import socket
    from urllib.parse import urlsplit

    import httpx

    from tests.server.api.helpers import wait_until

    engine = ScriptedEngine()
    with _one_slot_server(tiny_model_dir, registry, engine) as srv:
        srv.wait_ready()
        engine.hold()
        payload = json.dumps(
            {"model": "tiny-llava", "messages": [user_message()], "max_tokens": 5}
        ).encode()
        url = urlsplit(srv.base_url)
        sock = socket.create_connection((url.hostname, url.port))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload
        )
        wait_until(lambda: engine.in_flight == 1, what="the request to reach the engine")
        request_id = engine.inputs[-1].request_id
        sock.close()  # the client leaves before any byte of the answer
        wait_until(lambda: request_id in engine.aborted, what="the engine request to be aborted")
        assert engine.in_flight == 0
        engine.release()
        # the admission slot was released too: the only slot serves the next request
        ok = httpx.post(srv.base_url + "/v1/chat/completions", json=json.loads(payload), timeout=10)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def test_vllm_sampling_extras_reach_the_engine(served) -> None:
    client, engine, _ = served
    r = _post(
        client,
        max_tokens=3,
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        min_tokens=2,
        ignore_eos=True,
    )
    assert r.status_code == 200, r.text
    sent = engine.inputs[-1]
    assert (sent.top_k, sent.min_p, sent.repetition_penalty) == (5, 0.1, 1.2)
    assert (sent.presence_penalty, sent.frequency_penalty) == (0.5, -0.5)
    assert sent.min_tokens == 2 and sent.ignore_eos and sent.logprobs is None
    assert r.json()["choices"][0]["logprobs"] is None
    _post(client, max_tokens=1)  # unset: vLLM's neutral values
    sent = engine.inputs[-1]
    assert (
        sent.top_k,
        sent.min_p,
        sent.repetition_penalty,
        sent.presence_penalty,
        sent.frequency_penalty,
        sent.min_tokens,
        sent.ignore_eos,
        sent.logprobs,
    ) == (0, 0.0, 1.0, 0.0, 0.0, 0, False, None)


def _check_logprobs_content(content: list[dict[str, Any]], top: int) -> None:
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode()) and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == top
        for alt in entry["top_logprobs"]:
            assert set(alt) == {"token", "logprob", "bytes"}


def test_logprobs_in_the_openai_shape_json_and_streaming(served) -> None:
    client, engine, _ = served
    body = _post(client, max_tokens=4, logprobs=True, top_logprobs=2).json()
    assert engine.inputs[-1].logprobs == 2
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 4
    assert "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]
    _check_logprobs_content(content, 2)
    assert [e["logprob"] for e in content] == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    body = _post(
        client, max_tokens=2, logprobs=True
    ).json()  # top_logprobs unset: the chosen tokens only
    assert engine.inputs[-1].logprobs == 0
    _check_logprobs_content(body["choices"][0]["logprobs"]["content"], 0)

    events = _events(_post(client, stream=True, max_tokens=3, logprobs=True, top_logprobs=1).text)
    chunks = [e for e in events[:-1] if e["choices"] and e["choices"][0]["logprobs"] is not None]
    streamed = [entry for e in chunks for entry in e["choices"][0]["logprobs"]["content"]]
    assert len(streamed) == 3
    _check_logprobs_content(streamed, 1)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert "".join(entry["token"] for entry in streamed) == text
