"""The one seam between the HTTP layer and the engine: request/response types, typed errors,
and the `EngineClient` protocol.

The chat handler builds a `GenerateRequest` and hands it to `EngineClient.generate`; the
engine streams `GenerateChunk`s back and raises the `EngineError` family, which
`server/api/errors.py` maps onto HTTP errors. Versions cross as `VersionInfo`, routes as
`LayerRoute`. `SMoLoRAEngine` (`engine.py`) implements the protocol on vLLM; the HTTP-layer
tests hold it with a scripted double. Nothing here imports vLLM or torch models.

Version semantics (see README): a request is served, from its first to its last token, by
exactly one checkpoint version -- the one it named, or the active version when it started --
and its result names that version. Loading a version never disturbs in-flight requests.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from PIL import Image

from smolora.adapters.instructions import InstructionTable
from smolora.adapters.smolora.config import VU_ROUTINGS, VuRouting

FinishReason = Literal["stop", "length", "abort"]

#: Most stop strings one request may carry (OpenAI's limit).
MAX_STOP_STRINGS = 4
#: Most alternatives per token a request may ask log-probabilities of (OpenAI's and vLLM's
#: default limit).
MAX_TOP_LOGPROBS = 20


# -- errors --------------------------------------------------------------------------------
class EngineError(Exception):
    """Base of the engine's typed errors; `code` is a stable machine-readable name."""

    code = "engine_error"


class InvalidRequestError(EngineError, ValueError):
    """The request is malformed (the message says which field and why)."""

    code = "invalid_request"


class VersionNotResidentError(EngineError, LookupError):
    """The named checkpoint version is not loaded in the engine."""

    code = "version_not_loaded"


class NoFreeSlotError(EngineError):
    """Every version slot is active or serving in-flight requests; retry when they finish."""

    code = "no_free_slot"


class VersionLoadError(EngineError):
    """A checkpoint was refused (corrupt, unknown format, other base model, other layout).

    Attributes:
        reason: the underlying error class name (e.g. "IntegrityError").
    """

    code = "version_refused"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class VersionInUseError(EngineError):
    """A resident version cannot be unloaded now: it is the active version, or in-flight
    requests are pinned to it (activate another version / retry once they finish)."""

    code = "version_in_use"


class EngineUnavailableError(EngineError):
    """The engine is not running (not started, shut down, or its core died)."""

    code = "engine_unavailable"


# -- requests and results ------------------------------------------------------------------
@dataclass
class GenerateRequest:
    """One generation request.

    Attributes:
        prompt: the chat-formatted prompt (text with one `<image>` where the image goes) or
            its token ids.
        image: the request's image (at most one), or None for text-only.
        instruction: the 384-d instruction embedding that routes the IF experts; None serves
            the request with the base model only (no adapter, no trace).
        instruction_source: how the instruction was chosen (e.g. "explicit", "type:vqa",
            "extracted", "snapped:vqa_short"), echoed in the trace.
        instruction_similarity: similarity of a snapped instruction, echoed in the trace.
        max_tokens: generation limit.
        temperature, top_p, seed: sampling (temperature 0 is greedy).
        top_k: sample from the k most likely tokens only (0 or -1: all tokens).
        min_p: drop tokens less likely than min_p times the most likely one (0: off), in [0, 1].
        repetition_penalty: > 1 discourages, < 1 encourages tokens already in the prompt or
            output (1: off; vLLM's multiplicative penalty), > 0.
        presence_penalty, frequency_penalty: OpenAI's additive penalties for tokens already
            generated (once / per occurrence), in [-2, 2].
        min_tokens: EOS and `stop_token_ids` cannot end generation before this many tokens
            (stop strings still can); at most `max_tokens`.
        logprobs: None for no log-probabilities; k >= 0 returns, per generated token, its
            log-probability and the k most likely tokens' (at most `MAX_TOP_LOGPROBS`).
        stop: stop strings (OpenAI semantics): generation ends at the first one, which is not
            part of the output (`finish_reason` "stop"); at most `MAX_STOP_STRINGS`.
        stop_token_ids: extra stop tokens.
        ignore_eos: keep generating past EOS (benchmarks; EOS stops otherwise).
        version: checkpoint version to serve with; None takes the active version.
        vu_routing: "pinned" or "per_step"; None takes the engine default.
        trace: whether to return the routing trace.
        request_id: caller's id (a unique one is made when None).
    """

    prompt: str | list[int]
    image: Image.Image | None = None
    instruction: Sequence[float] | Any | None = None
    instruction_source: str = "explicit"
    instruction_similarity: float | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    version: int | None = None
    vu_routing: VuRouting | None = None
    trace: bool = True
    request_id: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.prompt, str) and not self.prompt:
            raise InvalidRequestError("prompt must not be empty")
        if isinstance(self.prompt, list) and not self.prompt:
            raise InvalidRequestError("prompt token ids must not be empty")
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        self._check_sampling_extras()
        if self.vu_routing is not None and self.vu_routing not in VU_ROUTINGS:
            raise InvalidRequestError(
                f"vu_routing must be 'pinned' or 'per_step', got {self.vu_routing!r}"
            )
        if self.stop is not None:
            if isinstance(self.stop, str):
                self.stop = [self.stop]
            if len(self.stop) > MAX_STOP_STRINGS:
                raise InvalidRequestError(
                    f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}"
                )
            if any(not isinstance(s, str) or not s for s in self.stop):
                raise InvalidRequestError("stop strings must be non-empty strings")
        if self.image is not None and not isinstance(self.image, Image.Image):
            raise InvalidRequestError(
                "image must be a PIL image (decode it before calling the engine)"
            )

    def _check_sampling_extras(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequestError(
                f"top_k must be an integer >= 1, or 0 / -1 for all tokens, got {self.top_k!r}"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidRequestError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs (top log-probabilities per token) must be in [0, {MAX_TOP_LOGPROBS}], "
                f"got {self.logprobs}"
            )


@dataclass
class LayerRoute:
    """One adapted layer's routing decision for one request, as plain numbers (what a response
    and the metrics carry; the adapters' `BatchLayerRoutes` holds a batch's as tensors).

    Attributes:
        layer: canonical layer name (e.g. "layers.0.mlp.gate_proj", "projector.linear_1").
        vu_expert: VU expert id (in [0, E/2)); in "per_step" mode, the prefill route.
        if_expert: IF expert id (global, in [E/2, E)).
        w_vu, w_if: mean fusion weights over the request's processed tokens.
        vu_steps: "per_step" mode only, if recorded: the VU route of each decode step.
    """

    layer: str
    vu_expert: int
    if_expert: int
    w_vu: float
    w_if: float
    vu_steps: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The route as the HTTP response's `smolora.trace[].layers[]` entry."""
        return {
            "layer": self.layer,
            "vu_expert": self.vu_expert,
            "if_expert": self.if_expert,
            "w_vu": self.w_vu,
            "w_if": self.w_if,
        }


@dataclass
class RequestTrace:
    """Routing trace of one request.

    Attributes:
        version: the checkpoint version that served it.
        vu_routing: the VU routing mode it ran with.
        instruction_source, instruction_similarity: echoed from the request.
        layers: per adapted layer, in model order.
        exact: False if the engine saw the prompt split across steps (never with the
            supported configuration).
    """

    version: int
    vu_routing: VuRouting
    instruction_source: str
    instruction_similarity: float | None
    layers: list[LayerRoute]
    exact: bool = True

    def routes(self) -> list[tuple[str, int, int]]:
        """(layer, vu_expert, if_expert) per layer, handy for comparisons."""
        return [(r.layer, r.vu_expert, r.if_expert) for r in self.layers]


@dataclass
class TokenLogprob:
    """The log-probability (natural log) of one token, with its text.

    Attributes:
        token_id: the token.
        token: its text decoded alone.
        logprob: its log-probability at this position (vLLM's raw log-probabilities: before
            temperature, penalties or top-k/top-p).
        top: for a generated token, the most likely tokens at its position, most likely
            first (as many as the request's `logprobs` asked); empty otherwise.
    """

    token_id: int
    token: str
    logprob: float
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class GenerateChunk:
    """A streamed piece of a generation; the last one has `finished=True`.

    Attributes:
        request_id: the request's id.
        token_ids: new token ids since the previous chunk.
        text: new text since the previous chunk.
        finished: True on the last chunk.
        finish_reason: "stop" / "length" / "abort" on the last chunk.
        version: the checkpoint version serving the request (None for base requests).
        trace: on the last chunk, when asked for and the request used an adapter.
        prompt_tokens: prompt length in tokens (image placeholders included).
        queue_seconds: time the request waited in the engine's scheduler, on the last
            chunk when the engine knows it.
        logprobs: one entry per token of `token_ids`, when the request asked for logprobs.
    """

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    version: int | None = None
    trace: RequestTrace | None = None
    prompt_tokens: int | None = None
    queue_seconds: float | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class VersionInfo:
    """A checkpoint version known to the engine.

    Attributes:
        version: registry version number (manifest `version`).
        path: the checkpoint folder.
        tasks: tasks learned, in order.
        slot: the resident slot, or None once evicted.
        active: whether new requests without a version get this one.
        in_flight: requests being served by it now.
        instruction_types: the checkpoint's instruction table (`InstructionTable.to_list()`).
        loaded_at: unix time it became resident.
        load_seconds: how long loading (verify + copy into the slot) took.
    """

    version: int
    path: Path
    tasks: list[str]
    slot: int | None
    active: bool = False
    in_flight: int = 0
    instruction_types: list[dict[str, Any]] = field(default_factory=list)
    loaded_at: float = 0.0
    load_seconds: float = 0.0

    @property
    def name(self) -> str:
        """The registry folder name (`v0003-gqa`)."""
        return self.path.name

    @property
    def instruction_table(self) -> InstructionTable:
        """`instruction_types` as an `InstructionTable` (what instruction resolution reads)."""
        return InstructionTable.from_list(self.instruction_types)


@dataclass
class EngineHealth:
    """Liveness and state of the engine.

    Attributes:
        ok: the engine core answers.
        adapters: whether SMoLoRA adapters are enabled.
        active_version: the active version number (None without adapters).
        resident_versions: version numbers resident, by slot.
        in_flight: requests being generated now.
        detail: worker counters (e.g. "partial_prefills", which must stay 0).
    """

    ok: bool
    adapters: bool
    active_version: int | None
    resident_versions: dict[int, int]
    in_flight: int
    detail: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class EngineClient(Protocol):
    """What the HTTP layer needs from an engine.

    Closing (or cancelling) the iterator returned by `generate` aborts the request in the
    engine; that is how the HTTP layer drops a request whose client left.

    Attributes:
        max_model_len: context length in tokens (prompt + completion).
        max_images_per_prompt: most images one request may carry.
    """

    max_model_len: int
    max_images_per_prompt: int

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream a generation; raises `InvalidRequestError`, `VersionNotResidentError`,
        `EngineUnavailableError`."""
        ...

    async def load_version(self, path: str | Path, activate: bool = True) -> VersionInfo:
        """Load a checkpoint folder into a free slot (no restart, in-flight requests keep
        their version); raises `VersionLoadError`, `NoFreeSlotError`."""
        ...

    async def load_latest(self, registry: str | Path, activate: bool = True) -> VersionInfo:
        """Load the registry's `latest` version (no-op if resident; activates it)."""
        ...

    async def activate(self, version: int) -> VersionInfo:
        """Make a resident version the default for new requests."""
        ...

    async def unload_version(self, version: int) -> VersionInfo:
        """Free the slot of a resident version (it is no longer servable); raises
        `VersionNotResidentError`, `VersionInUseError` (active, or pinned by in-flight requests)."""
        ...

    def list_versions(self) -> list[VersionInfo]:
        """Resident versions, by slot."""
        ...

    def active_version(self) -> VersionInfo | None:
        """The version new requests get by default (None before the first activation or
        without adapters)."""
        ...

    async def health(self, detail: bool = True) -> EngineHealth:
        """Liveness and state; `detail=False` skips what needs a round trip to the worker
        (health probes and the server's engine monitor ask often)."""
        ...

    async def shutdown(self) -> None:
        """Stop the engine and its processes."""
        ...
