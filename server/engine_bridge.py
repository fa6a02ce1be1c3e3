"""The thin adapter from the vLLM engine of `server/engine/` to the HTTP layer's `ServingEngine`.

`VllmServingEngine` wraps a started `SMoLoRAEngine` (the engine's `EngineClient`):
- `generate` maps a `GenerationInput` onto the engine's `GenerateRequest` (one image, the
  384-d instruction embedding, sampling with stop strings, version, trace) and its
  `GenerateChunk`s onto `GenerationDelta`s; the engine's typed errors become the seam's
  errors. Stop strings are applied by the engine (vLLM), so a request cut by one finishes
  there with reason "stop" and keeps its routing trace. An input without an instruction
  embedding and version (base-only mode) is served by the base model with adapters off.
- versions: `load_version` loads without activating, `activate_version` activates,
  `unload_version` frees the version's slot in the engine (refused for the active version
  and for one pinned by in-flight requests), `resident_versions` lists what the engine holds.
- `check_health` asks the engine core.

`vllm_engine_factory(settings)` starts the engine on the model folder: with adapters, on
the first checkpoint version (the one named by `initial_version`, else the registry's
latest, waiting for one to be published if the registry is empty); without adapters
(`settings.adapters=False`), on the base model alone (no registry, no routing hook). It
shuts the engine down on exit. Engine options (`--engine-option KEY=VALUE`) are
`EngineConfig` fields.

Nothing else in the HTTP layer imports `server/engine/`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from smolora.adapters.checkpoint import latest_version, list_versions
from smolora.adapters.instructions import InstructionTable
from smolora.server.api.engine_protocol import (CheckpointRejectedError, EngineBusyError, EngineError,
                                                EngineInputError, GenerationDelta, GenerationInput, LayerRoute,
                                                UnknownVersionError, VersionInfo)
from smolora.server.settings import ServerSettings

log = logging.getLogger("smolora.server.engine_bridge")


def _map_engine_error(e: Exception) -> Exception:
    from smolora.server.engine import protocol as ep

    if isinstance(e, ep.InvalidRequestError):
        return EngineInputError(str(e))
    if isinstance(e, ep.VersionNotResidentError):
        return UnknownVersionError(str(e))
    if isinstance(e, ep.NoFreeSlotError):
        return EngineBusyError(str(e))
    if isinstance(e, ep.VersionLoadError):
        return CheckpointRejectedError(str(e))
    if isinstance(e, ep.EngineError):
        return EngineError(str(e))
    return e


class VllmServingEngine:
    """`ServingEngine` over `smolora.server.engine.engine.SMoLoRAEngine`.

    Args:
        engine: a started `SMoLoRAEngine`.
    """

    max_images_per_prompt = 1  # the engine's vLLM limit_mm_per_prompt

    def __init__(self, engine: Any):
        self.engine = engine
        self.max_model_len = int(engine.vllm.model_config.max_model_len)
        self._loaded: dict[int, tuple[float, float]] = {}
        now = time.time()
        for v in engine.list_versions():
            self._loaded[v.version] = (now, 0.0)

    async def generate(self, request: GenerationInput) -> AsyncIterator[GenerationDelta]:
        from smolora.server.engine.protocol import EngineError as NativeEngineError
        from smolora.server.engine.protocol import GenerateRequest

        if len(request.images) > self.max_images_per_prompt:
            raise EngineInputError(f"this engine takes at most {self.max_images_per_prompt} image per request")
        if (request.instruction_embedding is None) != (request.version is None):
            raise EngineInputError("an instruction embedding and a version go together (both None = base model)")
        sp = request.sampling
        base_only = request.instruction_embedding is None
        try:
            native = GenerateRequest(
                prompt=request.prompt, image=request.images[0] if request.images else None,
                instruction=None if base_only else list(request.instruction_embedding or ()),
                max_tokens=sp.max_tokens, temperature=sp.temperature, top_p=sp.top_p, seed=sp.seed,
                stop=list(sp.stop) or None, version=request.version, trace=request.trace and not base_only,
                request_id=request.request_id)
        except NativeEngineError as e:
            raise _map_engine_error(e) from None
        stream = self.engine.generate(native)
        try:
            async for chunk in stream:
                n = len(chunk.token_ids)
                if not chunk.finished:
                    if chunk.text or n:
                        yield GenerationDelta(text=chunk.text, num_tokens=n)
                    continue
                if chunk.finish_reason == "abort":
                    raise EngineBusyError("the engine aborted the request")
                yield GenerationDelta(
                    text=chunk.text, num_tokens=n, finish_reason=chunk.finish_reason or "stop",
                    prompt_tokens=chunk.prompt_tokens, trace=_routes(chunk.trace) if native.trace else None)
                return
        except NativeEngineError as e:
            raise _map_engine_error(e) from None
        finally:
            await stream.aclose()

    async def load_version(self, path: Path) -> VersionInfo:
        from smolora.server.engine.protocol import EngineError as NativeEngineError

        t0 = time.perf_counter()
        try:
            info = await self.engine.load_version(path, activate=False)
        except NativeEngineError as e:
            raise _map_engine_error(e) from None
        self._loaded[info.version] = (time.time(), time.perf_counter() - t0)
        return self._info(info)

    async def activate_version(self, version: int) -> None:
        from smolora.server.engine.protocol import EngineError as NativeEngineError

        try:
            await self.engine.activate(version)
        except NativeEngineError as e:
            raise _map_engine_error(e) from None

    async def unload_version(self, version: int) -> None:
        from smolora.server.engine.protocol import EngineError as NativeEngineError

        try:
            await self.engine.unload_version(version)
        except NativeEngineError as e:
            raise _map_engine_error(e) from None
        self._loaded.pop(version, None)

    def resident_versions(self) -> list[VersionInfo]:
        return sorted((self._info(v) for v in self.engine.list_versions()), key=lambda v: v.version)

    def active_version(self) -> int | None:
        v = self.engine.active_version()
        return None if v is None else int(v.version)

    async def check_health(self) -> None:
        h = await self.engine.health()
        if not h.ok:
            raise EngineError(f"engine core unhealthy: {h.detail}")

    def _info(self, v: Any) -> VersionInfo:
        loaded_at, seconds = self._loaded.get(v.version, (time.time(), 0.0))
        path = Path(v.path)
        return VersionInfo(version=int(v.version), name=path.name, tasks=tuple(v.tasks), path=path,
                           instruction_types=InstructionTable.from_list(v.instruction_types), loaded_at=loaded_at,
                           load_seconds=seconds)


def _routes(trace: Any) -> tuple[LayerRoute, ...] | None:
    if trace is None:
        return None
    return tuple(LayerRoute(r.layer, int(r.vu_expert), int(r.if_expert), float(r.w_vu), float(r.w_if))
                 for r in trace.layers)


async def first_checkpoint(settings: ServerSettings) -> Path:
    """The folder to start the engine with; waits (polling) while the registry is empty."""
    announced = False
    while True:
        entries = await asyncio.to_thread(list_versions, settings.registry_dir)
        if settings.initial_version is not None:
            match = next((e for e in entries if e.version == settings.initial_version), None)
            if match is None:
                raise ValueError(f"--initial-version {settings.initial_version} is not published in "
                                 f"{settings.registry_dir} (published: {[e.version for e in entries]})")
            return match.path
        latest = await asyncio.to_thread(latest_version, settings.registry_dir)
        if latest is not None:
            return latest.path
        if not announced:
            log.warning("registry %s has no published version; the engine starts when one appears",
                        settings.registry_dir)
            announced = True
        await asyncio.sleep(settings.watch_interval_s)


def engine_config(settings: ServerSettings, checkpoint: Path | None) -> Any:
    """The engine's `EngineConfig` from the settings (engine options are its fields).

    Args:
        settings: server settings; `settings.adapters=False` gives a base-only engine.
        checkpoint: the first checkpoint folder (None, and ignored, without adapters).
    """
    from smolora.server.engine.config import EngineConfig

    fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"model_dir", "checkpoint", "adapters"}
    unknown = set(settings.engine_options) - fields
    if unknown:
        raise ValueError(f"unknown engine options {sorted(unknown)}; known: {sorted(fields)}")
    options = dict(settings.engine_options)
    if not settings.adapters:
        return EngineConfig(model_dir=settings.model_dir, adapters=False, **options)
    options.setdefault("num_slots", settings.max_resident_versions)
    return EngineConfig(model_dir=settings.model_dir, checkpoint=checkpoint, **options)


@asynccontextmanager
async def vllm_engine_factory(settings: ServerSettings) -> AsyncIterator[VllmServingEngine]:
    """Start the vLLM engine for the server (tens of seconds) and stop it on exit."""
    from smolora.server.engine.engine import SMoLoRAEngine

    checkpoint = await first_checkpoint(settings) if settings.adapters else None
    config = engine_config(settings, checkpoint)
    log.info("starting the vLLM engine on %s with %s", settings.model_dir,
             checkpoint.name if checkpoint is not None else "adapters disabled (base model only)")
    engine = await SMoLoRAEngine.start(config)
    try:
        yield VllmServingEngine(engine)
    finally:
        await engine.shutdown()
