"""`ScriptedEngine`: an in-process double of the `EngineClient` seam, for HTTP-layer tests only.

It does not run a model and proves nothing about the engine: it replies with a scripted
word sequence (one "token" per word), honours `max_tokens` and `stop`, derives a fake but
deterministic routing trace from the instruction embedding, fake log-probabilities
(word i: -0.1 * (i + 1); alternatives "alt0".."altK" below it) when asked, and keeps checkpoint
versions by reading their manifests. What it lets tests check is the HTTP layer's own
behaviour: validation, error mapping, SSE framing, usage, metrics, auth, queue limits,
version selection. Hooks: `hold()` / `release()` to keep requests in flight,
`fail_next` to make the next `generate` raise, `fail_versions` to make every request on
those versions raise, `dead` to fail health checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from smolora.adapters.checkpoint import verify_checkpoint
from smolora.server.engine.protocol import (
    EngineHealth,
    EngineUnavailableError,
    GenerateChunk,
    GenerateRequest,
    LayerRoute,
    RequestTrace,
    TokenLogprob,
    VersionInfo,
    VersionInUseError,
    VersionLoadError,
    VersionNotResidentError,
)
from smolora.server.settings import ServerSettings

LAYERS = ("projector.linear_1", "layers.0.mlp.up_proj", "layers.1.mlp.down_proj")


class ScriptedEngine:
    """Test double of `EngineClient` (HTTP-layer tests only; see the module docstring).

    Args:
        reply: the words every request answers with, in order.
        max_model_len: the context length it claims.
        num_experts: E of the fake routes.
    """

    def __init__(
        self,
        reply: str = "a red circle on the left of a blue square",
        max_model_len: int = 256,
        num_experts: int = 8,
    ):
        self.reply = reply.split()
        self.max_model_len = max_model_len
        self.max_images_per_prompt = 1
        self.num_experts = num_experts
        self.inputs: list[GenerateRequest] = []
        self.aborted: list[str] = []
        self.fail_next: Exception | None = None
        self.fail_versions: set[int] = set()
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

    # --- EngineClient -----------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if request.version in self.fail_versions:
            raise RuntimeError(f"scripted failure of version {request.version}")
        if request.version is not None and request.version not in self._versions:
            raise VersionNotResidentError(f"version {request.version} is not resident")
        rid = request.request_id or ""
        version = request.version
        self.inputs.append(request)
        self.in_flight += 1
        if request.version is not None:
            self.pinned[request.version] = self.pinned.get(request.version, 0) + 1
        finished = False
        try:
            while not self._hold.is_set():
                await asyncio.sleep(
                    0.001
                )  # a double's wait loop, not a test sleep: released by the test
            sp = request
            stops = sp.stop or []
            text, produced, reason = "", 0, "length"
            words = list(self.reply)
            for i, word in enumerate(words):
                if produced >= sp.max_tokens:
                    reason = "length"
                    break
                piece = word if i == 0 else " " + word
                candidate = text + piece
                hit = min((candidate.find(s) for s in stops if s in candidate), default=-1)
                if hit >= 0:
                    piece = candidate[:hit][len(text) :]
                    produced += 1
                    yield GenerateChunk(
                        rid,
                        [i],
                        piece,
                        finished=True,
                        finish_reason="stop",
                        version=version,
                        prompt_tokens=self._prompt_tokens(request),
                        trace=self._trace(request),
                        queue_seconds=0.0,
                        logprobs=self._logprobs(request, i, piece),
                    )
                    finished = True
                    return
                text = candidate
                produced += 1
                last = produced >= sp.max_tokens or i == len(words) - 1
                if last:
                    reason = (
                        "length" if produced >= sp.max_tokens and i < len(words) - 1 else "stop"
                    )
                    yield GenerateChunk(
                        rid,
                        [i],
                        piece,
                        finished=True,
                        finish_reason=reason,
                        version=version,
                        prompt_tokens=self._prompt_tokens(request),
                        trace=self._trace(request),
                        queue_seconds=0.0,
                        logprobs=self._logprobs(request, i, piece),
                    )
                    finished = True
                    return
                yield GenerateChunk(
                    rid, [i], piece, version=version, logprobs=self._logprobs(request, i, piece)
                )
                await asyncio.sleep(0)
        finally:
            self.in_flight -= 1
            if request.version is not None:
                self.pinned[request.version] -= 1
            if not finished:
                self.aborted.append(request.request_id)

    @staticmethod
    def _logprobs(request: GenerateRequest, i: int, piece: str) -> list[TokenLogprob] | None:
        if request.logprobs is None:
            return None
        lp = -0.1 * (i + 1)
        top = [TokenLogprob(i, piece, lp)] + [
            TokenLogprob(1000 + k, f"alt{k}", lp - 1.0 - k) for k in range(request.logprobs - 1)
        ]
        return [TokenLogprob(i, piece, lp, top[: request.logprobs])]

    def _prompt_tokens(self, request: GenerateRequest) -> int:
        assert isinstance(request.prompt, str)
        return len(request.prompt.split()) + 16 * (request.image is not None)

    def _trace(self, request: GenerateRequest) -> RequestTrace | None:
        if not request.trace or request.instruction is None or request.version is None:
            return None
        half = self.num_experts // 2
        emb = list(request.instruction)
        if_expert = half + max(range(half), key=lambda k: emb[k])
        seed = int(hashlib.sha256(str(request.prompt).encode()).hexdigest(), 16)
        layers = [
            LayerRoute(layer, (seed >> (4 * j)) % half, if_expert, 0.5, 0.5)
            for j, layer in enumerate(LAYERS)
        ]
        return RequestTrace(
            request.version,
            request.vu_routing or "pinned",
            request.instruction_source,
            request.instruction_similarity,
            layers,
        )

    async def load_version(self, path: str | Path, activate: bool = True) -> VersionInfo:
        try:
            manifest = await asyncio.to_thread(verify_checkpoint, path)
        except Exception as e:
            raise VersionLoadError(str(e), type(e).__name__) from e
        assert manifest.version is not None
        info = VersionInfo(
            version=manifest.version,
            path=Path(path),
            tasks=list(manifest.tasks),
            slot=None,
            instruction_types=list(manifest.instruction_types),
            loaded_at=time.time(),
            load_seconds=0.0,
        )
        self._versions[info.version] = info
        if activate:
            await self.activate(info.version)
        return self._info(info.version)

    async def load_latest(self, registry: str | Path, activate: bool = True) -> VersionInfo:
        raise NotImplementedError("the HTTP layer loads versions by number through VersionManager")

    async def activate(self, version: int) -> VersionInfo:
        if version not in self._versions:
            raise VersionNotResidentError(f"version {version} is not resident")
        self._active = version
        return self._info(version)

    async def unload_version(self, version: int) -> VersionInfo:
        if version not in self._versions:
            raise VersionNotResidentError(f"version {version} is not resident")
        if version == self._active:
            raise VersionInUseError("cannot unload the active version")
        if self.pinned.get(version):
            raise VersionInUseError(
                f"{self.pinned[version]} in-flight request(s) are pinned to version {version}"
            )
        return self._versions.pop(version)

    def list_versions(self) -> list[VersionInfo]:
        return [self._info(v) for v in sorted(self._versions)]

    def active_version(self) -> VersionInfo | None:
        return None if self._active is None else self._info(self._active)

    async def health(self, detail: bool = True) -> EngineHealth:
        if self.dead:
            raise EngineUnavailableError("scripted engine marked dead")
        return EngineHealth(
            ok=True,
            adapters=bool(self._versions),
            active_version=self._active,
            resident_versions={i: v for i, v in enumerate(sorted(self._versions))},
            in_flight=self.in_flight,
        )

    async def shutdown(self) -> None:
        pass

    def _info(self, version: int) -> VersionInfo:
        info = self._versions[version]
        info.active = version == self._active
        info.in_flight = self.pinned.get(version, 0)
        return info


def scripted_factory(engine: ScriptedEngine) -> Callable[[ServerSettings], object]:
    """An `engine_factory` that hands out `engine` (and does nothing on exit)."""

    @asynccontextmanager
    async def factory(settings: ServerSettings) -> AsyncIterator[ScriptedEngine]:
        yield engine

    return factory
