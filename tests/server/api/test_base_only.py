"""Base-only serving (adapters off) through the HTTP layer (engine held by `ScriptedEngine`).

No registry, no instruction encoder, no version manager: `/ready` turns 200 once the
engine is up, `/v1/models` lists the base model alone, chat answers without an instruction
embedding or version, requests naming a version or an instruction get a 4xx, and the
checkpoint admin routes do not exist.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from smolora.server.cli import build_parser, settings_from_args
from smolora.server.settings import ServerSettings
from tests.server.api.conftest import running_app
from tests.server.api.helpers import HashingEmbedder, data_url, image_bytes, user_message
from tests.server.api.scripted_engine import ScriptedEngine

IMG = data_url(image_bytes())


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Iterator[tuple[TestClient, ScriptedEngine, HashingEmbedder]]:
    with running_app(tiny_model_dir, None, adapters=False, admin_api_key="adm") as ctx:
        yield ctx


def _chat(client: TestClient, **body: Any) -> Any:
    body.setdefault("model", "tiny-llava")
    body.setdefault("messages", [user_message("What colour is the circle?", [IMG])])
    body.setdefault("max_tokens", 3)
    return client.post("/v1/chat/completions", json=body)


def test_ready_and_models_list_the_base_model_only(base) -> None:
    client, _, _ = base
    ready = client.get("/ready").json()
    assert (
        ready["status"] == "ready"
        and ready["adapters"] is False
        and ready["active_version"] is None
    )
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny-llava"] and models[0]["smolora"]["adapters"] is False


def test_chat_serves_the_base_model_without_instruction_or_version(base) -> None:
    client, engine, embedder = base
    calls_before = len(embedder.calls)
    r = _chat(client, smolora={"trace": True})  # a trace is not an error: it comes back null
    assert r.status_code == 200, r.text
    body = r.json()
    assert (
        body["model"] == "tiny-llava" and body["choices"][0]["message"]["content"] == "a red circle"
    )
    assert body["smolora"] == {
        "model": "tiny-llava",
        "adapters": False,
        "version": None,
        "version_name": None,
        "instruction": None,
        "trace": None,
    }
    sent = engine.inputs[-1]
    assert sent.instruction is None and sent.version is None and not sent.trace
    assert len(embedder.calls) == calls_before  # no instruction embedding is ever computed


def test_streaming_and_stop_strings_in_base_mode(base) -> None:
    client, engine, _ = base
    r = _chat(client, stream=True, stop=["circle"], max_tokens=8)
    events = [json.loads(b[6:]) for b in r.text.split("\n\n") if b.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "a red " and events[-1]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["smolora"]["adapters"] is False and engine.inputs[-1].stop == ["circle"]


@pytest.mark.parametrize(
    "body,status,code,param",
    [
        ({"model": "tiny-llava@1"}, 404, "model_not_found", "model"),
        ({"smolora": {"version": 1}}, 400, "adapters_disabled", "smolora.version"),
        (
            {"smolora": {"instruction_type": "vqa_short"}},
            400,
            "adapters_disabled",
            "smolora.instruction_type",
        ),
        (
            {"smolora": {"instruction": "Answer briefly."}},
            400,
            "adapters_disabled",
            "smolora.instruction",
        ),
    ],
)
def test_version_or_instruction_requests_get_a_clear_4xx(
    base, body: dict, status: int, code: str, param: str
) -> None:
    client, _, _ = base
    r = _chat(client, **body)
    assert (
        r.status_code == status
        and r.json()["error"]["code"] == code
        and r.json()["error"]["param"] == param
    )
    assert "adapters disabled" in r.json()["error"]["message"]


def test_there_are_no_checkpoint_admin_routes(base) -> None:
    client, _, _ = base
    assert (
        client.get("/admin/checkpoints", headers={"Authorization": "Bearer adm"}).status_code == 404
    )
    assert (
        client.post(
            "/admin/checkpoints/unload",
            headers={"Authorization": "Bearer adm"},
            json={"version": 1},
        ).status_code
        == 404
    )


def test_settings_and_cli(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = build_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--no-adapters"])
    s = settings_from_args(args, environ={})
    assert s.adapters is False and s.registry_dir is None
    with pytest.raises(ValueError, match="registry_dir is required"):
        settings_from_args(
            build_parser().parse_args(["serve", "--model", str(tiny_model_dir)]), environ={}
        )
    with pytest.raises(ValueError, match="must not be set with adapters off"):
        ServerSettings(model_dir=tiny_model_dir, registry_dir=tmp_path, adapters=False)
