"""The logic of POST /v1/chat/completions, on the engine's `EngineClient` seam.

`ChatService.create` first makes the cheap checks (`check`: readiness, model and version
names, `n`, stop count, roles, image count, reserved placeholders, the `max_prompt_chars`
text cap) and the caller's rate limit, then takes admission slots -- waiting in the
bounded queue, or refused at once with 429 -- and only then does the expensive work
(`prepare`): image decoding, instruction resolution (explicit text, a known type, or
extracted from the user's text and snapped; MiniLM), prompt rendering and tokenization,
all in the app's worker threads, never on the event loop. It then checks the context
length and sampling rules, builds one engine `GenerateRequest` per choice (the type the
engine itself takes: prompt, image, instruction embedding, version, sampling, trace),
runs them, and answers either one JSON completion or an SSE stream. Both carry `usage`,
each choice's `finish_reason`, the model as `name@version`, and the `smolora` extension
object (version, instruction source, and the routing trace when asked for; on the last
chunk when streaming). It feeds the latency, token, finish and expert-selection metrics,
the caller's token bucket and the request's access record.

With adapters off (base-only serving) there is no version and no instruction: the model
is the plain served name, the instruction embedding is never computed, a request naming a
version (`name@N`: 404; `smolora.version`: 400) or an instruction (400, code
`adapters_disabled`) is refused, and the `smolora` object says `"adapters": false` with
no version, instruction or trace.

Every caller mistake becomes a typed 4xx error before anything is submitted; an engine
failure after a stream has started becomes an SSE error event followed by `[DONE]`, and
so does the end of the shutdown grace period (`api/drain.py`). A request whose client
disconnects while it waits in the queue or is prepared is withdrawn (its slots
released); a non-streaming one is cancelled while it generates too, which aborts its
engine requests (a streaming one is aborted when its body iterator is closed).
It knows nothing of vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from smolora.server.api.access_log import AccessRecord
from smolora.server.api.chat.protocol import ChatCompletionRequest, ChatMessage, ImagePart, TextPart
from smolora.server.api.drain import DrainState
from smolora.server.api.errors import (
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
    engine_busy,
    engine_error_to_api,
    sse_error_event,
)
from smolora.server.api.state import ServerState
from smolora.server.engine.protocol import (
    EngineClient,
    EngineError,
    GenerateChunk,
    GenerateRequest,
    LayerRoute,
    TokenLogprob,
    VersionInfo,
)
from smolora.server.images import ImageError
from smolora.server.instruction_source import (
    InstructionResolver,
    ResolvedInstruction,
    UnknownInstructionTypeError,
)
from smolora.server.promotion import SOURCE_ACTIVE, SOURCE_NAMED
from smolora.server.prompt import PromptRenderer
from smolora.server.versions import VersionManager

log = logging.getLogger("smolora.server.chat")

_END = object()  # a choice's engine stream has ended


@dataclass
class PreparedChat:
    """A validated request: one engine request per choice, and what the response needs."""

    request_id: str
    created: int
    model_label: str
    version: VersionInfo | None  # None with adapters off
    prompt_tokens: int
    instruction: ResolvedInstruction | None  # None with adapters off
    requests: list[GenerateRequest]  # one per choice, in choice order
    logprobs: bool  # the choices carry OpenAI `logprobs` objects
    trace_requested: bool
    stream: bool
    include_usage: bool
    arrival: float
    client_key: str | None = None  # rate-limit key charged with the tokens
    access: AccessRecord | None = None  # the access-log record filled in as it runs

    @property
    def log_id(self) -> str:
        """The id a 500 cites and the log carries: the HTTP request id when there is one."""
        return self.access.request_id if self.access is not None else self.request_id


@dataclass
class CheckedChat:
    """A request past the cheap checks: nothing decoded or tokenized yet."""

    req: ChatCompletionRequest
    engine: EngineClient
    renderer: PromptRenderer
    resolver: InstructionResolver | None  # None with adapters off
    info: VersionInfo | None  # None with adapters off
    version_source: str | None  # named, active or canary (promotion.py); None: adapters off
    stops: list[str]
    template_messages: list[dict[str, Any]]
    image_urls: list[tuple[str, str]]  # (param, url) per image part
    user_text: str


def _render(
    renderer: PromptRenderer, messages: list[dict[str, Any]], num_images: int
) -> tuple[str, int]:
    """The prompt text and its token count (runs in a worker thread)."""
    prompt = renderer.render(messages)
    return prompt, renderer.count_tokens(prompt, num_images)


async def _unless_disconnected(
    coro: Any, receive: Receive | None, drain: DrainState, retry_after_s: int
) -> tuple[Any, bool]:
    """Run `coro` to its end unless the client disconnects first (then cancel it) or the
    shutdown grace period ends first (then cancel it and raise a 503 `shutting_down`).

    Returns:
        (its result, False), or (None, True) when the client left first.
    """
    work = asyncio.ensure_future(coro)
    watchers = [asyncio.ensure_future(drain.ended.wait())]
    if receive is not None:
        watchers.append(asyncio.ensure_future(until_disconnected(receive)))
    try:
        await asyncio.wait({work, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise
    finally:
        for w in watchers:
            w.cancel()
    if work.done():
        return work.result(), False  # re-raises an APIError
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    if drain.ended.is_set():
        raise ServiceUnavailableError(
            "the server is shutting down and its grace period is over; the request was "
            f"ended early; retry after {retry_after_s}s",
            retry_after_s=retry_after_s,
            code="shutting_down",
        )
    return None, True


@dataclass
class _ChoiceState:
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    trace: list[LayerRoute] | None = None
    vu_routing: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_tokens: int | None = None
    queue_seconds: float | None = None
    last_token_at: float | None = None


def parse_model_name(model: str, served: str) -> int | None:
    """`name` -> None (the active version); `name@3` or `name@v3` -> 3.

    Raises:
        NotFoundError: another model name, or a malformed version.
    """
    name, sep, ver = model.partition("@")
    hint = (
        f"this server serves {served!r} (the active checkpoint version) and {served}@<version> "
        "for each resident version; see GET /v1/models"
    )
    if name != served:
        raise NotFoundError(
            f"the model {model!r} does not exist; {hint}", param="model", code="model_not_found"
        )
    if not sep:
        return None
    digits = ver[1:] if ver[:1] in ("v", "V") else ver
    if not digits.isdigit() or int(digits) < 1:
        raise NotFoundError(
            f"the model {model!r} does not exist: {ver!r} is not a version number; {hint}",
            param="model",
            code="model_not_found",
        )
    return int(digits)


def check_base_only_request(req: ChatCompletionRequest, served: str) -> None:
    """Refuse what a base-only server (adapters off) cannot honour.

    Raises:
        NotFoundError: another model name, or `name@N` (there are no versions).
        InvalidRequestError: `smolora.version`, `smolora.instruction`,
            `smolora.instruction_type` or `smolora.vu_routing` (code `adapters_disabled`).
    """
    name, sep, _ = req.model.partition("@")
    if name != served or sep:
        raise NotFoundError(
            f"the model {req.model!r} does not exist; this server serves the base model {served!r} "
            "with adapters disabled (no checkpoint versions); see GET /v1/models",
            param="model",
            code="model_not_found",
        )
    ext = req.smolora
    if ext is None:
        return
    for field_name in ("version", "instruction", "instruction_type", "vu_routing"):
        if getattr(ext, field_name) is not None:
            raise InvalidRequestError(
                f"smolora.{field_name} cannot be honoured: this server serves the base model "
                "with adapters disabled (started with --no-adapters); drop the field",
                param=f"smolora.{field_name}",
                code="adapters_disabled",
            )


async def until_disconnected(receive: Receive) -> None:
    """Return once the HTTP client has disconnected (call after the body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class LeasedStreamingResponse(StreamingResponse):
    """A streaming response that always runs `on_close` once the response is over.

    Starlette does not close a body iterator it never started (e.g. when the client left
    before the first byte); admission slots and engine requests must be released anyway.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Any, **kw: Any):
        super().__init__(content, **kw)
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._content.aclose()  # type: ignore[attr-defined]
            finally:
                self._on_close()


class ChatService:
    """Serves chat completions for one app (its `ServerState`)."""

    def __init__(self, state: ServerState):
        self.state = state
        self.settings = state.settings

    # --- validation and preparation -----------------------------------------------------------
    def check(self, req: ChatCompletionRequest) -> CheckedChat:
        """The cheap checks, before the request is admitted: readiness, model and version,
        `n`, stop strings, messages and the text cap. Nothing is decoded or tokenized.

        Raises:
            APIError: a 4xx naming the field to fix, or 503 when not ready or draining.
        """
        engine, versions, resolver, renderer = self.state.require_serving()
        s = self.settings
        if versions is None:
            check_base_only_request(req, s.served_model_name)
            info, source = None, None
        else:
            info, source = self._resolve_version(req, versions)

        if req.n > s.max_n or req.n > s.max_concurrent_requests:
            raise InvalidRequestError(
                f"n={req.n} is over this server's limit of "
                f"{min(s.max_n, s.max_concurrent_requests)}",
                param="n",
                code="invalid_value",
            )
        stops = req.stop_list()
        if len(stops) > s.max_stop_sequences:
            raise InvalidRequestError(
                f"{len(stops)} stop strings given; at most {s.max_stop_sequences} are allowed",
                param="stop",
                code="invalid_value",
            )
        template_messages, image_urls, user_text = self._check_messages(req.messages, renderer)
        return CheckedChat(
            req,
            engine,
            renderer,
            resolver,
            info,
            source,
            stops,
            template_messages,
            image_urls,
            user_text,
        )

    async def prepare(self, checked: CheckedChat, arrival: float) -> PreparedChat:
        """The expensive part, once admitted: decode the images, resolve the instruction
        (MiniLM), render and tokenize the prompt -- all in the worker threads, off the event
        loop -- and build one engine request per choice.

        Raises:
            APIError: a 4xx naming the field to fix.
        """
        s = self.settings
        req, engine, renderer, resolver, info = (
            checked.req,
            checked.engine,
            checked.renderer,
            checked.resolver,
            checked.info,
        )
        ext = req.smolora
        loop = asyncio.get_running_loop()
        images = await self._load_images(checked.image_urls)

        instruction: ResolvedInstruction | None = None
        if info is not None and resolver is not None:
            try:
                instruction = await loop.run_in_executor(
                    self.state.executor,
                    resolver.resolve,
                    info.instruction_table,
                    checked.user_text,
                    ext.instruction if ext else None,
                    ext.instruction_type if ext else None,
                )
            except UnknownInstructionTypeError as e:
                raise InvalidRequestError(
                    str(e), param="smolora.instruction_type", code="unknown_instruction_type"
                ) from None

        prompt, prompt_tokens = await loop.run_in_executor(
            self.state.executor, _render, renderer, checked.template_messages, len(images)
        )
        max_tokens = self._completion_budget(req, prompt_tokens, len(images), renderer, engine)
        logprobs = self._check_sampling_rules(req, max_tokens)

        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        trace_requested = s.trace_default if (ext is None or ext.trace is None) else ext.trace
        engine_trace = info is not None and (trace_requested or s.record_expert_metrics)
        stops = checked.stops
        try:
            requests = [
                GenerateRequest(
                    prompt=prompt,
                    image=images[0] if images else None,
                    request_id=f"{request_id}-{i}",
                    instruction=instruction.embedding if instruction else None,
                    instruction_source=instruction.source if instruction else "explicit",
                    instruction_similarity=instruction.similarity if instruction else None,
                    version=info.version if info else None,
                    trace=engine_trace,
                    vu_routing=ext.vu_routing if ext else None,
                    max_tokens=max_tokens,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    seed=None if req.seed is None else _wrap_seed(req.seed + i),
                    top_k=0 if req.top_k is None else req.top_k,
                    min_p=req.min_p or 0.0,
                    repetition_penalty=1.0
                    if req.repetition_penalty is None
                    else req.repetition_penalty,
                    presence_penalty=req.presence_penalty or 0.0,
                    frequency_penalty=req.frequency_penalty or 0.0,
                    min_tokens=req.min_tokens or 0,
                    ignore_eos=bool(req.ignore_eos),
                    logprobs=logprobs,
                    stop=list(stops) or None,
                )
                for i in range(req.n)
            ]
        except EngineError as e:  # the engine's own checks of a request (after ours)
            raise engine_error_to_api(e, s.retry_after_s) from None
        return PreparedChat(
            request_id=request_id,
            created=int(time.time()),
            model_label=s.served_model_name
            if info is None
            else f"{s.served_model_name}@{info.version}",
            version=info,
            prompt_tokens=prompt_tokens,
            instruction=instruction,
            requests=requests,
            logprobs=logprobs is not None,
            trace_requested=trace_requested and info is not None,
            stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            arrival=arrival,
        )

    @staticmethod
    def _check_sampling_rules(req: ChatCompletionRequest, max_tokens: int) -> int | None:
        """Rules between sampling fields; returns the engine's `logprobs` (None: not asked).

        Raises:
            InvalidRequestError: naming the field to fix.
        """
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError(
                "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value"
            )
        if req.min_tokens is not None and req.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens={req.min_tokens} is over the completion limit of {max_tokens} "
                "tokens (max_tokens, or what the context leaves); lower it",
                param="min_tokens",
                code="invalid_value",
            )
        return (req.top_logprobs or 0) if req.logprobs else None

    def _resolve_version(
        self, req: ChatCompletionRequest, versions: VersionManager
    ) -> tuple[VersionInfo, str]:
        """The version serving `req` and how it was chosen: named by the request, else the
        active one -- or a promotion canary, for its share of such requests."""
        from_model = parse_model_name(req.model, self.settings.served_model_name)
        from_ext = req.smolora.version if req.smolora else None
        if from_model is not None and from_ext is not None and from_model != from_ext:
            raise InvalidRequestError(
                f"model names version {from_model} but smolora.version is {from_ext}; "
                "give one or make them agree",
                param="smolora.version",
                code="invalid_value",
            )
        version, source = from_model or from_ext, SOURCE_NAMED
        if version is None:
            promoter = self.state.promoter
            version, source = promoter.route() if promoter else (versions.active(), SOURCE_ACTIVE)
        if version is None:
            raise ServiceUnavailableError(
                "no checkpoint version is active",
                retry_after_s=self.settings.retry_after_s,
                code="not_ready",
            )
        info = versions.get(version)
        if info is None:
            resident = (
                ", ".join(
                    f"{self.settings.served_model_name}@{v.version}" for v in versions.resident()
                )
                or "none"
            )
            raise NotFoundError(
                f"checkpoint version {version} is not loaded on this server (resident: "
                f"{resident}); see GET /v1/models (an admin can load published versions)",
                param="model" if from_model else "smolora.version",
                code="model_not_found",
            )
        return info, source

    def _check_messages(
        self, messages: list[ChatMessage], renderer: PromptRenderer
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]], str]:
        image_urls: list[tuple[str, str]] = []
        template: list[dict[str, Any]] = []
        for i, m in enumerate(messages):
            parts: list[dict[str, Any]] = []
            content = m.content
            if content is None or isinstance(content, str):
                if content:
                    parts.append({"type": "text", "text": content})
                    self._check_text(content, f"messages[{i}].content", renderer)
            else:
                for j, part in enumerate(content):
                    if isinstance(part, ImagePart):
                        if m.role != "user":
                            raise InvalidRequestError(
                                f"images are only accepted in user messages, not {m.role!r}",
                                param=f"messages[{i}].content[{j}]",
                                code="invalid_value",
                            )
                        image_urls.append(
                            (f"messages[{i}].content[{j}].image_url.url", part.image_url.url)
                        )
                        parts.append({"type": "image_url"})
                    elif isinstance(part, TextPart):
                        self._check_text(part.text, f"messages[{i}].content[{j}].text", renderer)
                        parts.append({"type": "text", "text": part.text})
            if m.role == "user" and not parts:
                raise InvalidRequestError(
                    "a user message needs text or an image",
                    param=f"messages[{i}].content",
                    code="invalid_value",
                )
            role = "system" if m.role == "developer" else m.role
            template.append({"role": role, "content": parts})
        chars = sum(len(p["text"]) for m in template for p in m["content"] if p["type"] == "text")
        if chars > self.settings.max_prompt_chars:
            raise InvalidRequestError(
                f"the messages hold {chars} characters of text; this server takes at most "
                f"{self.settings.max_prompt_chars} per request (max_prompt_chars); shorten them",
                param="messages",
                code="text_too_long",
            )
        if messages[-1].role != "user":
            raise InvalidRequestError(
                "the last message must be from the user",
                param=f"messages[{len(messages) - 1}].role",
                code="invalid_value",
            )
        engine = self.state.engine
        limit = min(
            self.settings.max_images_per_request, engine.max_images_per_prompt if engine else 1
        )
        if len(image_urls) > limit:
            raise InvalidRequestError(
                f"{len(image_urls)} images sent; this server takes at most {limit} per request",
                param="messages",
                code="too_many_images",
            )
        last = template[-1]["content"]
        user_text = "\n".join(p["text"] for p in last if p["type"] == "text")
        return template, image_urls, user_text

    @staticmethod
    def _check_text(text: str, param: str, renderer: PromptRenderer) -> None:
        if renderer.image_token in text:
            raise InvalidRequestError(
                f"text must not contain the reserved image placeholder {renderer.image_token!r}; "
                "send images as image_url parts",
                param=param,
                code="invalid_value",
            )

    async def _load_images(self, urls: list[tuple[str, str]]) -> list[Image.Image]:
        results = await asyncio.gather(
            *(self.state.images.load(url) for _, url in urls), return_exceptions=True
        )
        out: list[Image.Image] = []
        for (param, _), res in zip(urls, results):
            if isinstance(res, ImageError):
                raise InvalidRequestError(f"{param}: {res}", param=param, code=res.code)
            if isinstance(res, BaseException):
                raise res
            out.append(res)
        return out

    def _completion_budget(
        self,
        req: ChatCompletionRequest,
        prompt_tokens: int,
        num_images: int,
        renderer: PromptRenderer,
        engine: EngineClient,
    ) -> int:
        max_len = engine.max_model_len
        if prompt_tokens >= max_len:
            images = (
                f", of which {num_images} image(s) x {renderer.image_tokens} tokens"
                if num_images
                else ""
            )
            raise InvalidRequestError(
                f"the prompt is {prompt_tokens} tokens{images}; this model's context is "
                f"{max_len} tokens including the completion; shorten the messages or send "
                "fewer images",
                param="messages",
                code="context_length_exceeded",
            )
        room = max_len - prompt_tokens
        limit = req.completion_limit()
        if limit is not None and limit > room:
            param = (
                "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            )
            raise InvalidRequestError(
                f"{param}={limit} with a {prompt_tokens}-token prompt exceeds the context of "
                f"{max_len} tokens; ask for at most {room}",
                param=param,
                code="context_length_exceeded",
            )
        return limit if limit is not None else min(self.settings.default_max_tokens, room)

    # --- generation -----------------------------------------------------------------------------
    async def create(
        self,
        req: ChatCompletionRequest,
        receive: Receive | None = None,
        client_key: str | None = None,
        access: AccessRecord | None = None,
    ) -> Response:
        """Serve one request: a JSON completion or an SSE stream.

        The cheap checks and the rate limit come first; then the request takes its
        admission slots (waiting in the queue, or refused with 429 when it is full), and
        only then are its images decoded and its prompt tokenized. The slots are held until
        the response has ended.

        Args:
            req: the parsed request.
            receive: the ASGI receive channel (after the body was read); when given, a
                request whose client disconnects while it waits, is prepared or (not
                streaming) generates is cancelled -- its slots released, its engine requests
                aborted. A stream is aborted when its body iterator is closed.
            client_key: the rate-limit key of the caller (None: not rate-limited).
            access: the request's access record, filled in as the request runs.
        """
        arrival = time.perf_counter()
        checked = self.check(req)
        if client_key is not None:
            self.state.rate_limiter.check(client_key)
        n = req.n
        admission = self.state.admission

        async def admit() -> tuple[float, PreparedChat]:
            waited = await admission.acquire(n)
            try:
                prepared = await self.prepare(checked, arrival)
            except BaseException:
                admission.release(n)
                raise
            prepared.client_key, prepared.access = client_key, access
            if access is not None:
                access.completion_id = prepared.request_id
                access.model = prepared.model_label
                access.version = prepared.version.version if prepared.version else None
                access.version_source = checked.version_source
                access.stream = prepared.stream
                access.queue_s = waited
            if prepared.instruction is not None:
                self.state.metrics.instruction_sources.labels(
                    source=prepared.instruction.source
                ).inc()
            return waited, prepared

        if req.stream:
            admitted, left = await _unless_disconnected(
                admit(), receive, self.state.drain, self.settings.retry_after_s
            )
            if left:
                log.info("client disconnected before its stream started; request withdrawn")
                return Response(status_code=499)
            waited, prepared = admitted
            released = False

            def release() -> None:
                nonlocal released
                if not released:
                    released = True
                    admission.release(n)

            body = self._sse(prepared, waited)
            return LeasedStreamingResponse(
                body,
                release,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        async def run() -> tuple[PreparedChat, dict[int, _ChoiceState]]:
            waited, prepared = await admit()
            try:
                choices: dict[int, _ChoiceState] = {i: _ChoiceState() for i in range(n)}
                await self._complete(prepared, waited, choices)
                return prepared, choices
            finally:
                admission.release(n)

        result, left = await _unless_disconnected(
            run(), receive, self.state.drain, self.settings.retry_after_s
        )
        if left:  # the client left: its slots are released and its engine requests aborted
            log.info("client disconnected; request withdrawn or aborted")
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        prepared, choices = result
        return JSONResponse(self._completion_body(prepared, choices))

    async def _complete(
        self, prepared: PreparedChat, waited: float, choices: dict[int, _ChoiceState]
    ) -> None:
        """Run a non-streaming request's choices to the end (its slots are held by the caller)."""
        try:
            async with aclosing(self._events(prepared, waited, choices)) as events:
                async for _ in events:
                    pass
        except Exception as e:
            raise engine_error_to_api(e, self.settings.retry_after_s, prepared.log_id) from None

    async def _events(
        self, prepared: PreparedChat, waited: float, choices: dict[int, _ChoiceState]
    ) -> AsyncIterator[tuple[int, GenerateChunk]]:
        """Run every choice's engine request; yield chunks as they come, keep per-choice state
        and metrics.

        A chunk the engine finished with reason "abort" (it dropped the request) raises a 503,
        and so does a drain interrupt (`DrainState.interrupt_all`, code `shutting_down`).
        """
        engine = self.state.engine
        assert engine is not None
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def run(index: int) -> None:
            stream: Any = None
            try:
                stream = engine.generate(prepared.requests[index])
                async for chunk in stream:
                    queue.put_nowait((index, chunk))
                    if chunk.finished:
                        break
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((index, e))
            finally:
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
                queue.put_nowait((index, _END))

        metrics = self.state.metrics
        tasks = [
            asyncio.create_task(run(i), name=f"{prepared.request_id}-{i}")
            for i in range(len(choices))
        ]
        retry = self.settings.retry_after_s
        interrupt = self.state.drain.register(
            lambda: queue.put_nowait(
                (
                    -1,
                    ServiceUnavailableError(
                        "the server is shutting down and its grace period is over; the "
                        f"request was ended early; retry after {retry}s",
                        retry_after_s=retry,
                        code="shutting_down",
                    ),
                )
            )
        )
        first_token_at: float | None = None
        open_choices = len(tasks)
        completed = False
        try:
            while open_choices:
                index, item = await queue.get()
                if item is _END:
                    open_choices -= 1
                    if choices[index].finish_reason is None:
                        # The engine ended the stream without a finish chunk: close the choice.
                        choices[index].finish_reason = "stop"
                        yield (
                            index,
                            GenerateChunk(
                                prepared.requests[index].request_id or "",
                                [],
                                "",
                                finished=True,
                                finish_reason="stop",
                            ),
                        )
                    continue
                if isinstance(item, BaseException):
                    raise item
                chunk: GenerateChunk = item
                if chunk.finished and chunk.finish_reason == "abort":
                    raise engine_busy("the engine aborted the request", self.settings.retry_after_s)
                if chunk.finished and chunk.finish_reason is None:
                    chunk.finish_reason = "stop"
                st = choices[index]
                now = time.perf_counter()
                num_tokens = len(chunk.token_ids)
                if num_tokens > 0:
                    if first_token_at is None:
                        first_token_at = now
                        metrics.time_to_first_token.observe(now - prepared.arrival)
                    if st.last_token_at is not None:
                        gap = (now - st.last_token_at) / num_tokens
                        for _ in range(num_tokens):
                            metrics.inter_token_latency.observe(gap)
                    st.last_token_at = now
                st.text.append(chunk.text)
                st.tokens += num_tokens
                if chunk.logprobs:
                    st.logprobs.extend(chunk.logprobs)
                if chunk.finished:
                    st.finish_reason = chunk.finish_reason
                    st.trace = (
                        chunk.trace.layers
                        if chunk.trace is not None and prepared.version is not None
                        else None
                    )
                    st.vu_routing = chunk.trace.vu_routing if st.trace is not None else None
                    st.prompt_tokens = chunk.prompt_tokens
                    st.queue_seconds = chunk.queue_seconds
                yield index, chunk
            completed = True
        finally:
            self.state.drain.unregister(interrupt)
            for t in tasks:
                t.cancel()  # a cancelled task aborts its engine request in its own `finally`
            # Metrics first, without awaiting: when a streaming client leaves, Starlette cancels
            # the response's scope and every await in it (this one included) is cancelled again.
            now = time.perf_counter()
            metrics.e2e_latency.observe(now - prepared.arrival)
            engine_queue = choices[0].queue_seconds or 0.0
            metrics.queue_time.observe(waited + engine_queue)
            prompt_tokens = self._prompt_tokens(prepared, choices)
            completion_tokens = sum(c.tokens for c in choices.values())
            metrics.observe_tokens(prompt_tokens, completion_tokens)
            if prepared.client_key is not None:
                self.state.rate_limiter.charge_tokens(
                    prepared.client_key, prompt_tokens + completion_tokens
                )
            if prepared.access is not None:
                prepared.access.prompt_tokens = prompt_tokens
                prepared.access.completion_tokens = completion_tokens
                if first_token_at is not None:
                    prepared.access.ttft_s = first_token_at - prepared.arrival
            for c in choices.values():
                metrics.observe_finish(
                    c.finish_reason if completed and c.finish_reason else "abort"
                )
                if c.trace:
                    metrics.observe_routes(c.trace)
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _prompt_tokens(prepared: PreparedChat, choices: dict[int, _ChoiceState]) -> int:
        reported = choices[0].prompt_tokens
        return reported if reported is not None else prepared.prompt_tokens

    def _usage(self, prepared: PreparedChat, choices: dict[int, _ChoiceState]) -> dict[str, int]:
        p = self._prompt_tokens(prepared, choices)
        c = sum(x.tokens for x in choices.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _extension(
        self, prepared: PreparedChat, choices: dict[int, _ChoiceState]
    ) -> dict[str, Any]:
        if prepared.version is None:  # base-only serving
            return {
                "model": prepared.model_label,
                "adapters": False,
                "version": None,
                "version_name": None,
                "instruction": None,
                "trace": None,
            }
        trace = None
        if prepared.trace_requested:
            trace = [
                {
                    "index": i,
                    "vu_routing": c.vu_routing,
                    "layers": [r.to_dict() for r in (c.trace or ())],
                }
                for i, c in sorted(choices.items())
            ]
        assert prepared.instruction is not None
        return {
            "model": prepared.model_label,
            "adapters": True,
            "version": prepared.version.version,
            "version_name": prepared.version.name,
            "instruction": prepared.instruction.to_trace(),
            "trace": trace,
        }

    def _completion_body(
        self, prepared: PreparedChat, choices: dict[int, _ChoiceState]
    ) -> dict[str, Any]:
        return {
            "id": prepared.request_id,
            "object": "chat.completion",
            "created": prepared.created,
            "model": prepared.model_label,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": openai_logprobs(c.logprobs) if prepared.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in sorted(choices.items())
            ],
            "usage": self._usage(prepared, choices),
            "system_fingerprint": None,
            "smolora": self._extension(prepared, choices),
        }

    def _chunk(self, prepared: PreparedChat, choices: list[dict[str, Any]], **extra: Any) -> str:
        body: dict[str, Any] = {
            "id": prepared.request_id,
            "object": "chat.completion.chunk",
            "created": prepared.created,
            "model": prepared.model_label,
            "choices": choices,
        }
        if prepared.include_usage:
            body["usage"] = None
        body.update(extra)
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    async def _sse(self, prepared: PreparedChat, waited: float) -> AsyncIterator[str]:
        n = len(prepared.requests)
        choices: dict[int, _ChoiceState] = {i: _ChoiceState() for i in range(n)}
        try:
            for i in range(n):
                yield self._chunk(
                    prepared,
                    [
                        {
                            "index": i,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                )
            finished = 0
            async with aclosing(self._events(prepared, waited, choices)) as events:
                async for index, chunk in events:
                    logprobs = openai_logprobs(chunk.logprobs or []) if prepared.logprobs else None
                    if not chunk.finished:
                        if chunk.text or chunk.logprobs:
                            yield self._chunk(
                                prepared,
                                [
                                    {
                                        "index": index,
                                        "delta": {"content": chunk.text},
                                        "logprobs": logprobs,
                                        "finish_reason": None,
                                    }
                                ],
                            )
                        continue
                    finished += 1
                    choice = [
                        {
                            "index": index,
                            "delta": {"content": chunk.text} if chunk.text else {},
                            "logprobs": logprobs,
                            "finish_reason": chunk.finish_reason,
                        }
                    ]
                    if finished == n and not prepared.include_usage:
                        yield self._chunk(
                            prepared, choice, smolora=self._extension(prepared, choices)
                        )
                    else:
                        yield self._chunk(prepared, choice)
            if prepared.include_usage:
                yield self._chunk(
                    prepared,
                    [],
                    usage=self._usage(prepared, choices),
                    smolora=self._extension(prepared, choices),
                )
            yield "data: [DONE]\n\n"
        except Exception as e:  # the stream has started: report in-band, then end it
            err = engine_error_to_api(e, self.settings.retry_after_s, prepared.log_id)
            if prepared.access is not None:
                prepared.access.error = err.code
            yield sse_error_event(err)
            yield "data: [DONE]\n\n"


#: Log-probabilities below this are reported as it (JSON has no -inf; vLLM does the same).
MIN_LOGPROB = -9999.0


def openai_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's choice `logprobs` object:
    `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`."""

    def entry(t: TokenLogprob) -> dict[str, Any]:
        return {
            "token": t.token,
            "logprob": max(t.logprob, MIN_LOGPROB),
            "bytes": list(t.token.encode("utf-8", errors="replace")),
        }

    return {"content": [{**entry(t), "top_logprobs": [entry(a) for a in t.top]} for t in tokens]}


def _wrap_seed(seed: int) -> int:
    """Keep `seed + choice index` inside the signed 64-bit range."""
    return (seed + 2**63) % 2**64 - 2**63
