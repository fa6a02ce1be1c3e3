"""`ScriptedEngine`: an in-process double of the `ServingEngine` seam, for HTTP-layer tests only.

It does not run a model and proves nothing about the engine: it replies with a scripted
word sequence (one "token" per word), honours `max_tokens` and `stop`, derives a fake but
deterministic routing trace from the instruction embedding, and keeps checkpoint
versions by reading their manifests. What it lets tests check is the HTTP layer's own
behaviour: validation, error mapping, SSE framing, usage, metrics, auth, queue limits,
version selection. Hooks: `hold()` / `release()` to keep requests in flight,
`fail_next` to make the next `generate` raise, `dead` to fail health checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Callable

from smolora.adapters.checkpoint import verify_checkpoint
from smolora.adapters.instructions import InstructionTable
from smolora.server.api.engine_protocol import (CheckpointRejectedError, EngineError, GenerationDelta,
                                                GenerationInput, LayerRoute, UnknownVersionError, VersionInfo)
from smolora.server.settings import ServerSettings

LAYERS = ("projector.linear_1", "layers.0.mlp.up_proj", "layers.1.mlp.down_proj")


class ScriptedEngine:
    """Test double of `ServingEngine` (HTTP-layer tests only; see the module docstring).

    Args:
        reply: the words every request answers with, in order.
        max_model_len: the context length it claims.
        num_experts: E of the fake routes.
    """

    def __init__(self, reply: str = "a red circle on the left of a blue square", max_model_len: int = 256,
                 num_experts: int = 8):
        self.reply = reply.split()
        self.max_model_len = max_model_len
        self.max_images_per_prompt = 4
        self.num_experts = num_experts
        self.inputs: list[GenerationInput] = []
        self.aborted: list[str] = []
        self.fail_next: Exception | None = None
        self.dead = False
        self._versions: dict[int, VersionInfo] = {}
        self._active: int | None = None
        self._hold = threading.Event()
        self._hold.set()
        self.in_flight = 0
        self.pinned: dict[int, int] = {}  # version -> in-flight requests on it

    # --- test hooks -------------------------------------------------------------------------
    def hold(self) -> None:
        """Requests wait before their first token until `release()`."""
        self._hold.clear()

    def release(self) -> None:
        self._hold.set()

    # --- ServingEngine ----------------------------------------------------------------------
    async def generate(self, request: GenerationInput) -> AsyncIterator[GenerationDelta]:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if request.version is not None and request.version not in self._versions:
            raise UnknownVersionError(f"version {request.version} is not resident")
        self.inputs.append(request)
        self.in_flight += 1
        if request.version is not None:
            self.pinned[request.version] = self.pinned.get(request.version, 0) + 1
        finished = False
        try:
            while not self._hold.is_set():
                await asyncio.sleep(0.001)  # a double's wait loop, not a test sleep: released by the test
            sp = request.sampling
            text, produced, reason = "", 0, "length"
            words = list(self.reply)
            for i, word in enumerate(words):
                if produced >= sp.max_tokens:
                    reason = "length"
                    break
                piece = word if i == 0 else " " + word
                candidate = text + piece
                hit = min((candidate.find(s) for s in sp.stop if s in candidate), default=-1)
                if hit >= 0:
                    piece = candidate[:hit][len(text):]
                    produced += 1
                    yield GenerationDelta(text=piece, num_tokens=1, finish_reason="stop",
                                          prompt_tokens=self._prompt_tokens(request), trace=self._trace(request),
                                          queue_seconds=0.0)
                    finished = True
                    return
                text = candidate
                produced += 1
                last = produced >= sp.max_tokens or i == len(words) - 1
                if last:
                    reason = "length" if produced >= sp.max_tokens and i < len(words) - 1 else "stop"
                    yield GenerationDelta(text=piece, num_tokens=1, finish_reason=reason,
                                          prompt_tokens=self._prompt_tokens(request), trace=self._trace(request),
                                          queue_seconds=0.0)
                    finished = True
                    return
                yield GenerationDelta(text=piece, num_tokens=1)
                await asyncio.sleep(0)
        finally:
            self.in_flight -= 1
            if request.version is not None:
                self.pinned[request.version] -= 1
            if not finished:
                self.aborted.append(request.request_id)

    def _prompt_tokens(self, request: GenerationInput) -> int:
        return len(request.prompt.split()) + 16 * len(request.images)

    def _trace(self, request: GenerationInput) -> tuple[LayerRoute, ...] | None:
        if not request.trace or request.instruction_embedding is None:
            return None
        half = self.num_experts // 2
        emb = request.instruction_embedding
        if_expert = half + max(range(half), key=lambda k: emb[k])
        seed = int(hashlib.sha256(request.prompt.encode()).hexdigest(), 16)
        return tuple(LayerRoute(layer, (seed >> (4 * j)) % half, if_expert, 0.5, 0.5) for j, layer in enumerate(LAYERS))

    async def load_version(self, path: Path) -> VersionInfo:
        try:
            manifest = await asyncio.to_thread(verify_checkpoint, path)
        except Exception as e:
            raise CheckpointRejectedError(str(e)) from e
        assert manifest.version is not None
        t0 = time.time()
        info = VersionInfo(version=manifest.version, name=Path(path).name, tasks=tuple(manifest.tasks), path=Path(path),
                           instruction_types=InstructionTable.from_list(manifest.instruction_types), loaded_at=t0,
                           load_seconds=0.0)
        self._versions[info.version] = info
        return info

    async def activate_version(self, version: int) -> None:
        if version not in self._versions:
            raise UnknownVersionError(f"version {version} is not resident")
        self._active = version

    async def unload_version(self, version: int) -> None:
        if version not in self._versions:
            raise UnknownVersionError(f"version {version} is not resident")
        if version == self._active:
            raise EngineError("cannot unload the active version")
        if self.pinned.get(version):
            raise EngineError(f"{self.pinned[version]} in-flight request(s) are pinned to version {version}")
        del self._versions[version]

    def resident_versions(self) -> list[VersionInfo]:
        return sorted(self._versions.values(), key=lambda v: v.version)

    def active_version(self) -> int | None:
        return self._active

    async def check_health(self) -> None:
        if self.dead:
            raise EngineError("scripted engine marked dead")


def scripted_factory(engine: ScriptedEngine) -> Callable[[ServerSettings], object]:
    """An `engine_factory` that hands out `engine` (and does nothing on exit)."""

    @asynccontextmanager
    async def factory(settings: ServerSettings) -> AsyncIterator[ScriptedEngine]:
        yield engine

    return factory
