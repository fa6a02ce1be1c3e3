"""End to end: the real server (subprocess) with the real vLLM engine on the tiny model, via
`openai`.

These prove the HTTP layer and the engine together: OpenAI schema in and out, SSE,
usage that matches the engine's own prompt count, the routing trace of the serving
version, snapping to a known instruction type (same embedding -> same routes and tokens),
hot publishing picked up by the watcher with per-request version choice, a version copied
in without the atomic rename loaded once complete, unloading a version, stop strings
applied by the engine (finish_reason "stop" with the trace), typed errors with the server
still serving, metrics, and the load generator; and, on a second server started with
`--no-adapters`, base-only serving.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from smolora.adapters.checkpoint import MANIFEST, TENSORS, list_versions
from smolora.server.prompt import PromptRenderer
from tests.e2e.conftest import ADMIN_KEY, RemoteServer, publish_smolora
from tests.server.api.helpers import data_url, image_bytes, user_message, wait_until

pytestmark = pytest.mark.e2e

IMG = data_url(image_bytes("PNG", (32, 32), (200, 40, 40)))
QUESTION = "What colour is the circle?\nAnswer the question using a single word or phrase."


def _client(remote: RemoteServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=remote.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(client: openai.OpenAI, text: str = QUESTION, **kw: Any) -> Any:
    kw.setdefault("model", "tiny-llava")
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0.0)
    return client.chat.completions.create(messages=[user_message(text, [IMG])], **kw)


def test_chat_completion_with_trace_and_usage(remote: RemoteServer, tiny_model_dir: Path) -> None:
    resp = _ask(_client(remote), extra_body={"smolora": {"trace": True}})
    assert resp.model == "tiny-llava@1" and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens >= 1
    renderer = PromptRenderer.from_model_dir(tiny_model_dir)
    prompt = renderer.render(
        [{"role": "user", "content": [{"type": "image_url"}, {"type": "text", "text": QUESTION}]}]
    )
    assert resp.usage.prompt_tokens == renderer.count_tokens(
        prompt, 1
    )  # engine's count == the server's check
    ext = resp.smolora
    assert ext["version"] == 1 and ext["instruction"]["source"] == "snapped"
    assert (
        ext["instruction"]["type"] == "vqa_short"
        and ext["instruction"]["rule"] == "trailing_imperative"
    )
    layers = ext["trace"][0]["layers"]
    names = {layer["layer"] for layer in layers}
    assert "projector.linear_1" in names and any(n.startswith("layers.1.mlp") for n in names)
    assert all(0 <= layer["vu_expert"] < 2 and 2 <= layer["if_expert"] < 4 for layer in layers)
    assert all(abs(layer["w_vu"] + layer["w_if"] - 1.0) < 1e-4 for layer in layers)


def test_streaming_matches_non_streaming_and_snapping_matches_the_named_type(
    remote: RemoteServer,
) -> None:
    client = _client(remote)
    plain = _ask(client, extra_body={"smolora": {"trace": True}})
    stream = _ask(
        client,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"smolora": {"trace": True}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].smolora["trace"] == plain.smolora["trace"]
    named = _ask(
        client,
        text="What colour is the circle?",
        extra_body={"smolora": {"trace": True, "instruction_type": "vqa_short"}},
    )
    assert named.smolora["instruction"]["source"] == "type"

    def ifs(r: Any) -> list[Any]:
        return [layer["if_expert"] for layer in r.smolora["trace"][0]["layers"]]

    assert ifs(named) == ifs(plain)  # the snapped instruction routes exactly like the named type


def test_bad_input_gets_4xx_and_the_server_keeps_serving(remote: RemoteServer) -> None:
    client = _client(remote)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny-llava", messages=[user_message("x", ["data:image/png;base64,@@"])]
        )
    assert e.value.body["code"] == "invalid_base64"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-llava", messages=[user_message("x", [IMG, IMG])])
    assert e.value.body["code"] == "too_many_images"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny-llava", messages=[user_message("x " * 400, [IMG])]
        )
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny-llava@9", messages=[user_message("x", [IMG])])
    r = httpx.post(
        remote.url + "/v1/chat/completions",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert _ask(client).choices[0].message.content is not None


def test_hot_publish_is_picked_up_and_versions_are_selectable(
    remote: RemoteServer, e2e_registry: Path, tiny_model_dir: Path, instruction_encoder: Any
) -> None:
    client = _client(remote)
    before = _ask(client, extra_body={"smolora": {"trace": True}})
    publish_smolora(e2e_registry, tiny_model_dir, instruction_encoder, "caption", seed=2)
    wait_until(
        lambda: "tiny-llava@2" in [m.id for m in client.models.list()], 120, "v2 to be loaded"
    )
    wait_until(
        lambda: httpx.get(remote.url + "/ready").json().get("active_version") == 2,
        60,
        "v2 to be active",
    )
    v2 = _ask(client, extra_body={"smolora": {"trace": True}})
    v1 = _ask(client, model="tiny-llava@1", extra_body={"smolora": {"trace": True}})
    assert v2.model == "tiny-llava@2" and v1.model == "tiny-llava@1"
    assert v1.choices[0].message.content == before.choices[0].message.content
    assert v1.smolora["trace"] == before.smolora["trace"]
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(remote.url + "/admin/checkpoints/rollback", headers=admin)
    assert r.status_code == 200 and r.json()["active"] == 1
    assert _ask(client).model == "tiny-llava@1"
    # Unloading frees v2's engine slot: it is no longer listed and a request for it gets 404.
    r = httpx.post(remote.url + "/admin/checkpoints/unload", headers=admin, json={"version": 1})
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_active"
    r = httpx.post(remote.url + "/admin/checkpoints/unload", headers=admin, json={"version": 2})
    assert r.status_code == 200 and r.json() == {"unloaded": 2, "active": 1}
    assert "tiny-llava@2" not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError) as e:
        _ask(client, model="tiny-llava@2")
    assert e.value.body["code"] == "model_not_found"
    assert _ask(client).model == "tiny-llava@1"


def _load_errors(remote: RemoteServer) -> float:
    text = httpx.get(remote.url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("smolora_checkpoint_loads_total") and 'result="error"' in line
    )


def test_a_version_copied_in_without_the_atomic_rename_loads_once_complete(
    remote: RemoteServer,
    e2e_registry: Path,
    tiny_model_dir: Path,
    instruction_encoder: Any,
    tmp_path: Path,
) -> None:
    """A version folder copied into the registry file by file is listed (its manifest is
    there) before its tensors are whole: the watcher's load fails, and it loads the version
    as soon as the copy finishes. Afterwards version 1 is made active again and the new
    version unloaded, as the later tests expect."""
    client = _client(remote)
    made = publish_smolora(tmp_path / "elsewhere", tiny_model_dir, instruction_encoder, "copy", 3)
    version = max(e.version for e in list_versions(e2e_registry)) + 1
    target = e2e_registry / f"v{version:04d}-copy"
    target.mkdir()
    tensors = (made.path / TENSORS).read_bytes()
    (target / TENSORS).write_bytes(tensors[: len(tensors) // 2])
    manifest = json.loads((made.path / MANIFEST).read_text())
    manifest["version"] = version
    errors_before = _load_errors(remote)
    (target / MANIFEST).write_text(json.dumps(manifest))  # now listed, tensors half copied
    wait_until(lambda: _load_errors(remote) > errors_before, 60, "the half copy to be refused")
    assert f"tiny-llava@{version}" not in [m.id for m in client.models.list()]
    (target / TENSORS).write_bytes(tensors)  # the copy finishes
    wait_until(
        lambda: f"tiny-llava@{version}" in [m.id for m in client.models.list()],
        60,
        "the completed copy to be loaded",
    )
    assert _ask(client, model=f"tiny-llava@{version}").model == f"tiny-llava@{version}"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = httpx.post(remote.url + "/admin/checkpoints/activate", headers=admin, json={"version": 1})
    assert r.status_code == 200
    r = httpx.post(
        remote.url + "/admin/checkpoints/unload", headers=admin, json={"version": version}
    )
    assert r.status_code == 200


def test_stop_string_is_applied_by_the_engine_and_keeps_the_trace(remote: RemoteServer) -> None:
    client = _client(remote)
    full = _ask(client, max_tokens=16, extra_body={"smolora": {"trace": True}})
    text = full.choices[0].message.content
    assert len(text) > 6, text
    start = next(
        i
        for i in range(2, len(text) - 2)
        if text[i : i + 2].strip() and text.find(text[i : i + 2]) == i
    )
    stop = text[start : start + 2]
    cut = _ask(client, max_tokens=16, stop=[stop], extra_body={"smolora": {"trace": True}})
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:start]
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    assert cut.smolora["trace"][0][
        "layers"
    ]  # the engine finished the request, so the trace came back

    def routes(r: Any) -> list[Any]:
        return [
            (layer["layer"], layer["vu_expert"], layer["if_expert"])
            for layer in r.smolora["trace"][0]["layers"]
        ]

    assert routes(cut) == routes(full)
    streamed = _ask(
        client, max_tokens=16, stop=[stop], stream=True, extra_body={"smolora": {"trace": True}}
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[:start]
    assert (
        chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].smolora["trace"][0]["layers"]
    )


def test_base_only_server_serves_the_base_model(remote_base: RemoteServer) -> None:
    client = _client(remote_base)
    ready = httpx.get(remote_base.url + "/ready").json()
    assert ready["adapters"] is False and ready["active_version"] is None
    assert [m.id for m in client.models.list()] == ["tiny-llava"]
    resp = _ask(client, extra_body={"smolora": {"trace": True}})
    assert resp.model == "tiny-llava" and resp.usage.completion_tokens >= 1
    assert resp.smolora == {
        "model": "tiny-llava",
        "adapters": False,
        "version": None,
        "version_name": None,
        "instruction": None,
        "trace": None,
    }
    chunks = list(_ask(client, stream=True))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == resp.choices[0].message.content
    )
    with pytest.raises(openai.NotFoundError):
        _ask(client, model="tiny-llava@1")
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, extra_body={"smolora": {"version": 1}})
    assert e.value.body["code"] == "adapters_disabled"
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert httpx.get(remote_base.url + "/admin/checkpoints", headers=admin).status_code == 404


def test_metrics_after_traffic(remote: RemoteServer) -> None:
    _ask(_client(remote))
    from prometheus_client.parser import text_string_to_metric_families

    fams = {
        f.name: f for f in text_string_to_metric_families(httpx.get(remote.url + "/metrics").text)
    }
    count = lambda name: next(s.value for s in fams[name].samples if s.name.endswith("_count"))  # noqa: E731
    assert (
        count("smolora_time_to_first_token_seconds") >= 1
        and count("smolora_e2e_request_latency_seconds") >= 1
    )
    assert count("smolora_checkpoint_load_duration_seconds") >= 1
    kinds = {
        s.labels["kind"]
        for s in fams["smolora_expert_selections"].samples
        if s.name.endswith("_total")
    }
    assert kinds == {"vu", "if"}


def test_load_generator_cli(remote: RemoteServer, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smolora.clients",
            "--base-url",
            remote.url,
            "loadgen",
            "--requests",
            "8",
            "--concurrency",
            "4",
            "--max-tokens",
            "6",
            "--image-size",
            "32",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["requests_ok"] == 8 and report["output_tokens_per_s"] > 0
    assert report["ttft_s"]["p50"] is not None and report["e2e_s"]["p99"] >= report["e2e_s"]["p50"]
