"""`create_app(settings, engine_factory)`: the FastAPI app, its lifespan and middleware.

The lifespan creates everything per app (no globals): metrics registry, admission
controller, rate limiter, the worker threads of a request's CPU work (image decoding,
tokenization, embedding), image loader, then, in a background task so that `/health`
answers at once, the prompt renderer (tokenizer), the instruction encoder (MiniLM), the
engine (from `engine_factory`, an async context manager), the start-up checkpoint version
and the registry watcher. `/ready` turns 200 once all of that is up and a version is
active. With adapters off (`settings.adapters=False`, base-only serving) only the
renderer and the engine come up -- no instruction encoder, no version manager, no
watcher, no checkpoint admin routes -- and `/ready` turns 200 once the engine is up.
While serving, an engine monitor checks every `engine_check_interval_s` that the engine is
alive; once it has died the server is not ready for good and `on_engine_failure` is called
(the CLI drains and exits with status 3 for the supervisor to restart it). On shutdown the
watcher stops and the engine context exits (draining before that is
`server/api/drain.py`'s, started by the CLI on SIGTERM or an engine failure).

`RequestContextMiddleware` (outermost) gives every response an `x-request-id` and emits
the access log; `GuardMiddleware` bounds request bodies (413 before any parsing) and
counts chat completion responses by status code. It does not know about vLLM: the engine
arrives through `engine_factory` (`server/engine_factory.py` provides the vLLM one), an
async context manager yielding an `EngineClient` (`server/engine/protocol.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smolora.server.api.access_log import AccessRecord
from smolora.server.api.admission import AdmissionController
from smolora.server.api.chat.router import router as chat_router
from smolora.server.api.checkpoints.router import router as checkpoints_router
from smolora.server.api.console.router import router as console_router
from smolora.server.api.errors import PayloadTooLargeError, install_exception_handlers
from smolora.server.api.health.router import engine_unhealthy
from smolora.server.api.health.router import router as health_router
from smolora.server.api.models.router import router as models_router
from smolora.server.api.rate_limit import RateLimiter
from smolora.server.api.request_id import RequestContextMiddleware
from smolora.server.api.state import ServerState
from smolora.server.engine.protocol import EngineClient
from smolora.server.images import ImageLimits, ImageLoader, RemoteImageFetcher, Resolver
from smolora.server.instruction_source import Embedder, InstructionResolver
from smolora.server.metrics import Metrics
from smolora.server.promotion import Promoter
from smolora.server.prompt import PromptRenderer
from smolora.server.registry_watch import RegistryWatcher
from smolora.server.serving_state import ServingStateStore, default_state_file
from smolora.server.settings import ServerSettings
from smolora.server.versions import VersionManager

log = logging.getLogger("smolora.server")

EngineFactory = Callable[[ServerSettings], AbstractAsyncContextManager[EngineClient]]
EmbedderFactory = Callable[[], Embedder]
#: Called once, with the reason, when the engine monitor sees the engine die.
EngineFailureHandler = Callable[[str], None]
CHAT_PATH = "/v1/chat/completions"


def default_embedder() -> Embedder:
    """The packaged all-MiniLM-L6-v2 encoder."""
    from smolora.adapters.instructions import InstructionEncoder

    return InstructionEncoder()


class GuardMiddleware:
    """Body-size limit for every request; status counting for chat completions.

    Args:
        app: the wrapped ASGI app.
        max_body_bytes: larger bodies get 413 without being parsed.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == CHAT_PATH:
            send = self._counting(scope, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = PayloadTooLargeError(
            f"the request body is over the limit of {self.max_body_bytes} bytes; send smaller "
            "or fewer images",
            code="request_too_large",
        )
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_json(send, too_large.status_code, too_large.to_dict())
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > self.max_body_bytes:
                    await _send_json(send, too_large.status_code, too_large.to_dict())
                    return
                if not message.get("more_body", False):
                    break
            receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    @staticmethod
    def _counting(scope: Scope, send: Send) -> Send:
        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state = getattr(scope["app"].state, "smolora", None) if "app" in scope else None
                if state is not None:
                    state.metrics.observe_request(message["status"])
            await send(message)

        return counting_send


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _serve_until_stopped(
    state: ServerState,
    stop: asyncio.Event,
    on_engine_failure: EngineFailureHandler | None,
) -> None:
    """Wait for `stop`, checking every `engine_check_interval_s` that `state.engine` is alive
    (the same check as the health probes).
    When it has died: record why (`/health` and `/ready` answer 503 from then on) and call
    `on_engine_failure` once (the CLI drains and exits with status 3, so a supervisor
    starts a fresh server: a vLLM engine core cannot be restarted inside its process)."""
    interval = state.settings.engine_check_interval_s
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
        if stop.is_set() or state.engine_failure is not None:
            continue
        reason = await engine_unhealthy(state)
        if reason is None or stop.is_set():  # a server shutting down closes its engine
            continue
        state.engine_failure = reason
        log.critical("the engine stopped serving: %s", reason)
        if on_engine_failure is not None:
            on_engine_failure(reason)


async def _bring_up(
    state: ServerState,
    engine_factory: EngineFactory,
    embedder_factory: EmbedderFactory,
    stop: asyncio.Event,
    on_engine_failure: EngineFailureHandler | None = None,
) -> None:
    """Start the slow parts, serve until `stop`, then shut the engine down."""
    s = state.settings
    try:
        state.renderer = await asyncio.to_thread(PromptRenderer.from_model_dir, s.model_dir)
        if not s.adapters:
            async with engine_factory(s) as engine:
                state.engine = engine
                state.started = True
                log.info("serving %s (base model, adapters disabled)", s.served_model_name)
                try:
                    await _serve_until_stopped(state, stop, on_engine_failure)
                finally:
                    state.engine = None
            return
        assert s.registry_dir is not None
        embedder = await asyncio.to_thread(embedder_factory)
        state.resolver = InstructionResolver(embedder, s.snap_threshold, s.default_instruction)
        store = (
            ServingStateStore(
                s.state_file or default_state_file(s.registry_dir, s.served_model_name)
            )
            if s.keep_state
            else None
        )
        async with engine_factory(s) as engine:
            versions = VersionManager(
                engine,
                s.registry_dir,
                state.metrics,
                s.max_resident_versions,
                s.retry_after_s,
                max_resident_bytes=s.max_resident_bytes,
                state=store,
            )
            promoter = Promoter(s.promotion, versions, state.metrics) if s.promotion.gated else None
            state.engine, state.versions, state.promoter = engine, versions, promoter
            watcher = RegistryWatcher(
                versions, s.watch_interval_s, s.watch_activate, promoter=promoter, state=store
            )
            if s.watch_registry:
                await watcher.prime()
            try:
                await versions.load_initial(s.initial_version)
            except Exception as e:  # noqa: BLE001 - keep serving; an admin or the watcher can fix it
                log.error("the start-up checkpoint version was not loaded: %s", e)
            state.started = True
            log.info("serving %s (active version %s)", s.served_model_name, versions.active())
            watch = (
                asyncio.create_task(watcher.run(stop), name="registry-watcher")
                if s.watch_registry
                else None
            )
            try:
                await _serve_until_stopped(state, stop, on_engine_failure)
            finally:
                if watch is not None:
                    watch.cancel()
                    await asyncio.gather(watch, return_exceptions=True)
                state.versions = None
                state.promoter = None
                state.engine = None
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - reported through /health and /ready
        state.startup_error = f"{type(e).__name__}: {e}"
        log.exception("server start-up failed")
    finally:
        state.started = True


def create_app(
    settings: ServerSettings,
    engine_factory: EngineFactory,
    *,
    embedder_factory: EmbedderFactory = default_embedder,
    image_transport: httpx.AsyncBaseTransport | None = None,
    image_resolver: Resolver | None = None,
    on_engine_failure: EngineFailureHandler | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        settings: server settings.
        engine_factory: `settings -> async context manager yielding an EngineClient`.
        embedder_factory: builds the instruction encoder (MiniLM by default).
        image_transport: httpx transport for remote image fetches (tests pass a mock).
        image_resolver: host name resolver of remote image fetches (tests pass a fake one).
        on_engine_failure: called once when the engine monitor sees the engine die (the
            CLI's drains and exits non-zero); None: the server stays up, not ready.

    Returns:
        The FastAPI app; its lifespan starts and stops everything.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        limits = ImageLimits(
            settings.max_image_bytes,
            settings.max_image_pixels,
            settings.image_formats,
            settings.max_images_per_request,
        )
        fetcher = RemoteImageFetcher(
            settings.image_url_allowlist,
            settings.image_fetch_timeout_s,
            settings.max_image_bytes,
            transport=image_transport,
            allow_networks=settings.image_url_allow_networks,
            **({"resolver": image_resolver} if image_resolver is not None else {}),
        )
        executor = ThreadPoolExecutor(
            settings.preparation_threads, thread_name_prefix="smolora-prepare"
        )
        state = ServerState(
            settings=settings,
            metrics=metrics,
            admission=AdmissionController(
                settings.max_concurrent_requests,
                settings.max_waiting_requests,
                settings.queue_timeout_s,
                settings.retry_after_s,
                metrics,
            ),
            images=ImageLoader(limits, fetcher, executor, metrics.images_decoded.inc),
            rate_limiter=RateLimiter(
                settings.rate_limit_requests_per_min, settings.rate_limit_tokens_per_min
            ),
            executor=executor,
        )
        app.state.smolora = state
        stop = asyncio.Event()
        task = asyncio.create_task(
            _bring_up(state, engine_factory, embedder_factory, stop, on_engine_failure),
            name="engine",
        )
        state.background.append(task)
        try:
            yield
        finally:
            stop.set()
            if not state.started:
                task.cancel()  # still starting: do not wait for the engine just to stop it
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=60)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            await fetcher.aclose()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="smolora-serve",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible chat completions for SMoLoRA vision-language models.",
    )
    install_exception_handlers(app)
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_request_bytes)

    def observe(record: AccessRecord) -> None:
        state = getattr(app.state, "smolora", None)
        if state is not None and state.promoter is not None:
            state.promoter.observe(record)

    # outermost: ids on every response, 413s too; finished requests feed a promotion canary
    app.add_middleware(RequestContextMiddleware, on_done=observe)
    app.include_router(chat_router)
    app.include_router(models_router)
    if settings.adapters:
        app.include_router(
            checkpoints_router
        )  # base-only serving has no checkpoint versions to manage
    app.include_router(health_router)
    app.include_router(console_router)  # the operator console at /console
    return app
