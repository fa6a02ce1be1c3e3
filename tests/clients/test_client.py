"""`SmoloraClient`, its image helpers and routing-trace access, against the HTTP layer
(ScriptedEngine)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import openai
import pytest
from PIL import Image

from smolora.clients import (
    ChatResult,
    SmoloraAPIError,
    SmoloraClient,
    image_to_data_url,
    routing_trace,
)
from tests.server.api.helpers import image_bytes


def test_image_to_data_url_accepts_paths_pil_and_bytes(tmp_path: Path) -> None:
    png = image_bytes("PNG")
    path = tmp_path / "x.jpg"
    path.write_bytes(image_bytes("JPEG"))
    assert image_to_data_url(png).startswith("data:image/png;base64,")
    assert image_to_data_url(path).startswith("data:image/jpeg;base64,")
    assert image_to_data_url(str(path)) == image_to_data_url(path)
    pil = image_to_data_url(Image.new("RGB", (5, 7)))
    assert Image.open(io.BytesIO(base64.b64decode(pil.split(",", 1)[1]))).size == (5, 7)
    gif = image_to_data_url(image_bytes("GIF"))
    assert gif.startswith("data:image/png;base64,")  # re-encoded: the server takes PNG/JPEG/WebP


def test_routing_trace_reads_dicts_and_objects() -> None:
    body = {"smolora": {"trace": [{"index": 0, "layers": [{"layer": "l", "vu_expert": 1}]}]}}
    assert routing_trace(body) == [{"layer": "l", "vu_expert": 1}]
    assert (
        routing_trace(body, index=1) is None and routing_trace({"smolora": {"trace": None}}) is None
    )


def test_chat_stream_and_admin(server) -> None:
    srv, engine, _ = server
    c = SmoloraClient(srv.base_url, api_key="sk-c", admin_api_key="adm-c", max_retries=0)
    assert c.models() == ["tiny-llava", "tiny-llava@2"]
    r = c.chat(
        image_bytes(),
        "What colour is it?\nAnswer the question using a single word or phrase.",
        max_tokens=3,
    )
    assert (
        isinstance(r, ChatResult)
        and r.text == "a red circle"
        and r.version == 2
        and r.finish_reason == "length"
    )
    assert r.instruction["source"] == "snapped" and r.trace and r.usage["completion_tokens"] == 3
    r = c.chat(None, "Hello", instruction_type="caption", max_tokens=1, trace=False)
    assert r.trace is None and r.instruction["source"] == "type"
    pieces = list(c.stream_chat(image_bytes(), "Describe it.", max_tokens=2))
    assert pieces[:-1] == ["a", " red"] and isinstance(pieces[-1], ChatResult) and pieces[-1].trace
    assert pieces[-1].usage["completion_tokens"] == 2
    assert c.load(1)["loaded"]["version"] == 1
    assert c.activate(1)["active"] == 1
    assert c.chat(None, "hi", max_tokens=1, version=2).version == 2
    assert c.rollback()["active"] == 2
    assert c.unload(1)["unloaded"] == 1
    assert [v["resident"] for v in c.list_checkpoints()["versions"]] == [False, True]
    with pytest.raises(SmoloraAPIError) as e:
        c.activate(42)
    assert e.value.status == 404
    with pytest.raises(openai.BadRequestError):
        c.chat(None, "hi", instruction_type="nope")
    assert c.ready()
    c.close()
