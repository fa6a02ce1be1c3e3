"""The per-app state the routers share, created in the lifespan (never a module global).

`ServerState` holds the settings, metrics, admission controller and image loader (ready
at once), and the parts that come up in the background after the process starts: the
instruction resolver (MiniLM), the prompt renderer (tokenizer), the engine and the
checkpoint version manager. `require_serving` is the one check a serving endpoint makes
before touching them; `/ready` reports the same conditions. With adapters off (base-only
serving) the resolver and the version manager stay None and are not waited for.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from smolora.server.api.admission import AdmissionController
from smolora.server.api.drain import DrainState
from smolora.server.api.errors import ServiceUnavailableError
from smolora.server.api.rate_limit import RateLimiter
from smolora.server.engine.protocol import EngineClient
from smolora.server.images import ImageLoader
from smolora.server.instruction_source import InstructionResolver
from smolora.server.metrics import Metrics
from smolora.server.prompt import PromptRenderer
from smolora.server.settings import ServerSettings

if TYPE_CHECKING:
    from smolora.server.promotion import Promoter
    from smolora.server.versions import VersionManager


@dataclass
class ServerState:
    """Everything the HTTP layer shares across requests (one per app).

    Attributes:
        settings: the server settings.
        metrics: the app's metrics registry.
        admission: slot accounting and the wait queue.
        images: image decoding and fetching.
        resolver: instruction resolution (None until MiniLM is loaded).
        renderer: prompt rendering (None until the tokenizer is loaded).
        engine: the engine (None until started).
        versions: checkpoint version manager (None until the engine is up).
        promoter: the promotion policy applied to newly published versions (None: the
            watcher activates them at once, or the engine is not up).
        startup_error: why start-up failed, if it did.
        engine_failure: why the engine stopped serving, once the engine monitor has seen
            it die (the server is then not ready for good).
        started: the background start-up has finished (successfully or not).
        drain: graceful-shutdown state (draining: not ready, no new chat requests).
        rate_limiter: per-API-key request and token limits.
        executor: worker threads for a request's CPU work (decode, tokenize, embed).
    """

    settings: ServerSettings
    metrics: Metrics
    admission: AdmissionController
    images: ImageLoader
    resolver: InstructionResolver | None = None
    renderer: PromptRenderer | None = None
    engine: EngineClient | None = None
    versions: VersionManager | None = None
    promoter: Promoter | None = None
    startup_error: str | None = None
    engine_failure: str | None = None
    started: bool = False
    background: list = field(default_factory=list)
    drain: DrainState = field(default_factory=DrainState)
    rate_limiter: RateLimiter = field(default_factory=lambda: RateLimiter(None, None))
    executor: Executor | None = None

    def not_ready_reason(self) -> str | None:
        """Why the server cannot serve inference now, or None when it can."""
        if self.drain.draining:
            return "the server is shutting down"
        if self.startup_error:
            return f"start-up failed: {self.startup_error}"
        if self.engine_failure:
            return f"the engine failed: {self.engine_failure}"
        if not self.settings.adapters:
            if self.engine is None or self.renderer is None:
                return "the server is starting (loading the engine and tokenizer)"
            return None
        if (
            self.engine is None
            or self.versions is None
            or self.resolver is None
            or self.renderer is None
        ):
            return "the server is starting (loading the engine, tokenizer and instruction encoder)"
        if self.versions.active() is None:
            return (
                "no checkpoint version is active; publish one into the registry "
                f"({self.settings.registry_dir}) or load one through the admin API"
            )
        return None

    def require_serving(
        self,
    ) -> tuple[EngineClient, VersionManager | None, InstructionResolver | None, PromptRenderer]:
        """The serving components, or a 503 saying why they are not there.

        Returns:
            (engine, versions, resolver, renderer); versions and resolver are None with
            adapters off.

        Raises:
            ServiceUnavailableError: starting, failed, or no active version.
        """
        reason = self.not_ready_reason()
        if reason is not None:
            raise ServiceUnavailableError(
                f"{reason}; retry after {self.settings.retry_after_s}s",
                retry_after_s=self.settings.retry_after_s,
                code="shutting_down" if self.drain.draining else "not_ready",
            )
        assert self.engine and self.renderer
        if self.settings.adapters:
            assert self.versions and self.resolver
        return self.engine, self.versions, self.resolver, self.renderer

    def require_versions(self) -> VersionManager:
        """The version manager (admin endpoints work without an active version)."""
        if self.startup_error:
            raise ServiceUnavailableError(
                f"start-up failed: {self.startup_error}",
                retry_after_s=self.settings.retry_after_s,
                code="not_ready",
            )
        if self.versions is None:
            raise ServiceUnavailableError(
                "the engine is starting",
                retry_after_s=self.settings.retry_after_s,
                code="not_ready",
            )
        return self.versions


def get_state(request: Request) -> ServerState:
    """The app's `ServerState` (set by the lifespan)."""
    return request.app.state.smolora
