"""The adapter from `server/engine`'s EngineClient to the HTTP seam, against a fake EngineClient.

`FakeEngineClient` imitates the engine's public types (GenerateRequest in, GenerateChunk
out, typed errors) so that this tests the bridge's mapping only: request fields, deltas,
stop strings handed to the engine, base-only requests, traces, error types, version
bookkeeping (unload goes to the engine). The real engine is exercised by
tests/server/engine and the e2e tests.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import pytest

from smolora.server.api.engine_protocol import (CheckpointRejectedError, EngineBusyError, EngineError,
                                                EngineInputError, GenerationInput, SamplingOptions,
                                                UnknownVersionError)
from smolora.server.engine import protocol as ep
from smolora.server.engine_bridge import VllmServingEngine, engine_config
from smolora.server.settings import ServerSettings


class FakeEngineClient:
    """Double of `SMoLoRAEngine`'s public surface (bridge tests only)."""

    def __init__(self) -> None:
        self.vllm = SimpleNamespace(model_config=SimpleNamespace(max_model_len=128))
        self.requests: list[ep.GenerateRequest] = []
        self.versions = {1: ep.VersionInfo(1, Path("/reg/v0001-a"), ["a"], 0, True, 0, [])}
        self.raise_on_generate: Exception | None = None
        self.closed = 0
        self.ok = True
        self.unloaded: list[int] = []

    async def generate(self, request: ep.GenerateRequest) -> AsyncIterator[ep.GenerateChunk]:
        self.requests.append(request)
        if self.raise_on_generate is not None:
            raise self.raise_on_generate
        try:
            for i, word in enumerate(["The", " end", " is", " near", "."]):
                yield ep.GenerateChunk(request.request_id or "", [i], word)
            trace = ep.RequestTrace(1, "pinned", "explicit", None, [ep.LayerRoute("layers.0.mlp.up_proj", 1, 6, 0.3, 0.7)])
            yield ep.GenerateChunk(request.request_id or "", [9], "", finished=True, finish_reason="length",
                                   version=1, trace=trace, prompt_tokens=21)
        finally:
            self.closed += 1

    async def load_version(self, path: Any, activate: bool = True) -> ep.VersionInfo:
        if "bad" in str(path):
            raise ep.VersionLoadError("corrupt", "IntegrityError")
        if "full" in str(path):
            raise ep.NoFreeSlotError("all slots busy")
        info = ep.VersionInfo(2, Path(path), ["b"], 1, False, 0, [])
        self.versions[2] = info
        return info

    async def activate(self, version: int) -> ep.VersionInfo:
        if version not in self.versions:
            raise ep.VersionNotResidentError(f"{version} not loaded")
        for v in self.versions.values():
            v.active = v.version == version
        return self.versions[version]

    async def unload_version(self, version: int) -> ep.VersionInfo:
        info = self.versions.get(version)
        if info is None:
            raise ep.VersionNotResidentError(f"{version} not loaded")
        if info.active:
            raise ep.VersionInUseError(f"{version} is active")
        self.unloaded.append(version)
        return self.versions.pop(version)

    def list_versions(self) -> list[ep.VersionInfo]:
        return list(self.versions.values())

    def active_version(self) -> ep.VersionInfo | None:
        return next((v for v in self.versions.values() if v.active), None)

    async def health(self) -> ep.EngineHealth:
        return ep.EngineHealth(self.ok, True, 1, {0: 1}, 0, {})


def _input(stop: tuple[str, ...] = (), trace: bool = True, version: int | None = 1, images: int = 0) -> GenerationInput:
    from PIL import Image

    return GenerationInput("req-1", "USER: hi ASSISTANT:", tuple(Image.new("RGB", (8, 8)) for _ in range(images)),
                           None if version is None else tuple([0.1] * 384), version,
                           SamplingOptions(max_tokens=5, temperature=0.0, seed=3, stop=stop), trace)


async def _collect(engine: VllmServingEngine, inp: GenerationInput) -> list[Any]:
    return [d async for d in engine.generate(inp)]


def test_generate_maps_request_deltas_and_trace() -> None:
    fake = FakeEngineClient()
    bridge = VllmServingEngine(fake)
    deltas = asyncio.run(_collect(bridge, _input(images=1)))
    sent = fake.requests[0]
    assert sent.image is not None and len(sent.instruction) == 384 and sent.version == 1 and sent.seed == 3
    assert sent.max_tokens == 5 and sent.trace and sent.request_id == "req-1"
    assert "".join(d.text for d in deltas) == "The end is near."
    assert sum(d.num_tokens for d in deltas) == 6
    last = deltas[-1]
    assert last.finish_reason == "length" and last.prompt_tokens == 21
    assert last.trace[0].layer == "layers.0.mlp.up_proj" and last.trace[0].if_expert == 6
    assert bridge.max_model_len == 128 and bridge.max_images_per_prompt == 1


def test_stop_strings_go_to_the_engine() -> None:
    fake = FakeEngineClient()
    deltas = asyncio.run(_collect(VllmServingEngine(fake), _input(stop=(" is", "END"))))
    assert fake.requests[0].stop == [" is", "END"]  # the engine (vLLM) applies them, the bridge does not
    assert deltas[-1].trace is not None and fake.closed == 1
    asyncio.run(_collect(VllmServingEngine(fake), _input()))
    assert fake.requests[1].stop is None
    with pytest.raises(EngineInputError, match="at most 4"):
        asyncio.run(_collect(VllmServingEngine(fake), _input(stop=tuple("abcde"))))


def test_base_only_input_sends_no_instruction_version_or_trace() -> None:
    fake = FakeEngineClient()
    deltas = asyncio.run(_collect(VllmServingEngine(fake), _input(version=None, trace=True)))
    sent = fake.requests[0]
    assert sent.instruction is None and sent.version is None and not sent.trace
    assert deltas[-1].trace is None and deltas[-1].finish_reason == "length"


@pytest.mark.parametrize("native,mapped", [
    (ep.InvalidRequestError("too long"), EngineInputError),
    (ep.VersionNotResidentError("gone"), UnknownVersionError),
    (ep.EngineUnavailableError("dead"), EngineError),
])
def test_engine_errors_are_mapped(native: Exception, mapped: type) -> None:
    fake = FakeEngineClient()
    fake.raise_on_generate = native
    with pytest.raises(mapped):
        asyncio.run(_collect(VllmServingEngine(fake), _input()))


def test_versions_load_activate_unload() -> None:
    async def go() -> None:
        fake = FakeEngineClient()
        bridge = VllmServingEngine(fake)
        info = await bridge.load_version(Path("/reg/v0002-b"))
        assert info.version == 2 and info.name == "v0002-b" and bridge.active_version() == 1
        await bridge.activate_version(2)
        assert bridge.active_version() == 2
        with pytest.raises(EngineError):
            await bridge.unload_version(2)  # active
        await bridge.unload_version(1)
        assert fake.unloaded == [1] and [v.version for v in bridge.resident_versions()] == [2]
        with pytest.raises(UnknownVersionError):
            await bridge.unload_version(1)
        with pytest.raises(CheckpointRejectedError):
            await bridge.load_version(Path("/reg/bad"))
        with pytest.raises(EngineBusyError):
            await bridge.load_version(Path("/reg/full"))
        with pytest.raises(EngineInputError):
            await _collect(bridge, _input(version=2, images=2))
        fake.ok = False
        with pytest.raises(EngineError):
            await bridge.check_health()

    asyncio.run(go())


def test_engine_options_are_engine_config_fields(tiny_model_dir: Path, tmp_path: Path) -> None:
    s = ServerSettings(model_dir=tiny_model_dir, registry_dir=tmp_path, engine_options={"max_num_seqs": 4})
    cfg = engine_config(s, tmp_path / "v0001-a")
    assert cfg.max_num_seqs == 4 and cfg.num_slots == s.max_resident_versions
    with pytest.raises(ValueError, match="unknown engine options"):
        engine_config(ServerSettings(model_dir=tiny_model_dir, registry_dir=tmp_path, engine_options={"warp": 9}),
                      tmp_path)
