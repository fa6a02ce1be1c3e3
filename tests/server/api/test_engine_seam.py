"""The one engine seam (`server/engine/protocol.py`) as the HTTP layer uses it.

What the former bridge tests checked, now at the seam itself: the engine's typed errors
map onto HTTP errors (`engine_error_to_api`), the request type validates what the engine
refuses (more than 4 stop strings), versions carry what the HTTP layer shows (name,
instruction table, load time), an engine-aborted request is a 503, and engine options are
`EngineConfig` fields. `ScriptedEngine` implements the same `EngineClient` protocol as the
vLLM engine (checked here; the real engine is checked in tests/server/engine/test_engine.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from smolora.server.api.errors import (
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    engine_error_to_api,
)
from smolora.server.engine import protocol as ep
from smolora.server.engine_factory import engine_config
from smolora.server.settings import ServerSettings
from tests.server.api.conftest import running_app
from tests.server.api.helpers import data_url, image_bytes, user_message
from tests.server.api.scripted_engine import ScriptedEngine

AUTH = {"Authorization": "Bearer sk-test"}


@pytest.mark.parametrize(
    "native,status,code",
    [
        (ep.InvalidRequestError("too long"), 400, "invalid_input"),
        (ep.VersionNotResidentError("gone"), 404, "version_not_found"),
        (ep.NoFreeSlotError("all slots busy"), 503, "engine_busy"),
        (ep.EngineUnavailableError("dead"), 503, "engine_unavailable"),
        (ep.VersionLoadError("corrupt", "IntegrityError"), 500, "engine_error"),
        (RuntimeError("boom"), 500, "internal_error"),
    ],
)
def test_engine_errors_are_mapped(native: Exception, status: int, code: str) -> None:
    err = engine_error_to_api(native, retry_after_s=2)
    assert err.status_code == status and err.code == code
    if status == 503:
        assert isinstance(err, ServiceUnavailableError) and err.headers["Retry-After"] == "2"
    if status == 500:  # a generic message with an id: the exception's text stays in the log
        assert isinstance(err, InternalServerError)
        assert str(native) not in err.message and "request id" in err.message
    if status == 400:
        assert isinstance(err, InvalidRequestError) and "too long" in err.message
    if status == 404:
        assert isinstance(err, NotFoundError) and err.param == "smolora.version"


def test_request_type_refuses_what_the_engine_cannot_serve() -> None:
    with pytest.raises(ep.InvalidRequestError, match="at most 4"):
        ep.GenerateRequest(prompt="USER: hi ASSISTANT:", stop=list("abcde"))
    req = ep.GenerateRequest(
        prompt="USER: hi ASSISTANT:", stop=[" is", "END"], max_tokens=5, seed=3
    )
    assert req.stop == [" is", "END"] and req.max_tokens == 5 and req.seed == 3


def test_scripted_engine_implements_the_engine_client_protocol() -> None:
    assert isinstance(ScriptedEngine(), ep.EngineClient)


def test_version_info_carries_name_table_and_load_time(
    tiny_model_dir: Path, registry: Path
) -> None:
    async def go() -> None:
        engine = ScriptedEngine()
        info = await engine.load_version(next(registry.glob("v0001-*")), activate=False)
        assert (
            info.name.startswith("v0001-")
            and info.loaded_at > 0
            and engine.active_version() is None
        )
        assert [t.name for t in info.instruction_table.types] == ["vqa_short", "mc_letter"]
        active = await engine.activate(1)
        assert (
            active.active
            and engine.active_version() is not None
            and engine.active_version().version == 1
        )

    asyncio.run(go())


class AbortingEngine(ScriptedEngine):
    """Finishes every request with reason "abort", as vLLM does when it drops a request."""

    async def generate(self, request: ep.GenerateRequest) -> AsyncIterator[ep.GenerateChunk]:  # type: ignore[override]
        self.inputs.append(request)
        yield ep.GenerateChunk(request.request_id or "", [1], "a")
        yield ep.GenerateChunk(
            request.request_id or "", [], "", finished=True, finish_reason="abort"
        )


def test_an_engine_aborted_request_is_a_503(tiny_model_dir: Path, registry: Path) -> None:
    img = data_url(image_bytes())
    body: dict[str, Any] = {
        "model": "tiny-llava",
        "max_tokens": 3,
        "messages": [user_message("Hi?", [img])],
    }
    with running_app(tiny_model_dir, registry, engine=AbortingEngine(), api_keys=("sk-test",)) as (
        client,
        _,
        _e,
    ):
        r = client.post("/v1/chat/completions", headers=AUTH, json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_busy"
        r = client.post("/v1/chat/completions", headers=AUTH, json={**body, "stream": True})
        assert '"engine_busy"' in r.text and r.text.rstrip().endswith("data: [DONE]")


def test_engine_options_are_engine_config_fields(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = ServerSettings(
        model_dir=tiny_model_dir, registry_dir=tmp_path, engine_options={"max_num_seqs": 4}
    )
    cfg = engine_config(s, tmp_path / "v0001-a")
    assert cfg.max_num_seqs == 4 and cfg.num_slots == s.max_resident_versions + 1
    assert cfg.cpu_overlap == "off"  # the server's own processes use the spare CPUs
    auto = ServerSettings(
        model_dir=tiny_model_dir, registry_dir=tmp_path, engine_options={"cpu_overlap": "auto"}
    )
    assert engine_config(auto, tmp_path / "v0001-a").cpu_overlap == "auto"
    with pytest.raises(ValueError, match="unknown engine options"):
        engine_config(
            ServerSettings(
                model_dir=tiny_model_dir, registry_dir=tmp_path, engine_options={"warp": 9}
            ),
            tmp_path,
        )
