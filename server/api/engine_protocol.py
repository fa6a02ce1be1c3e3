"""The seam between the HTTP layer and the engine: exactly what the API needs, nothing more.

`ServingEngine` is a `typing.Protocol`: generate a token stream for one prepared request
(chat-formatted prompt, decoded images, 384-d instruction embedding and a checkpoint
version -- both None in base-only mode --, sampling options with stop strings, trace
flag), and manage resident checkpoint versions (load a
published folder, activate, unload, list), plus a health probe. The data classes here are
plain values that cross the seam; the exceptions are the engine-side failures the HTTP
layer maps onto status codes.

This module does not implement an engine. `server/engine_bridge.py` adapts the vLLM
engine of `server/engine/` to this protocol; HTTP-layer tests hold the seam with a
scripted double. Closing (or cancelling) the async iterator returned by `generate` is how
the HTTP layer aborts a request, e.g. when a streaming client disconnects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Protocol, Sequence, runtime_checkable

from PIL import Image

from smolora.adapters.instructions import InstructionTable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingOptions:
    """Validated sampling options of one choice.

    Attributes:
        max_tokens: most tokens to generate (>= 1; prompt + max_tokens fits the context).
        temperature: 0 = greedy.
        top_p: nucleus mass in (0, 1].
        seed: per-request RNG seed, or None.
        stop: strings that end generation (not included in the output).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class GenerationInput:
    """One engine request (one choice of a chat completion).

    Attributes:
        request_id: unique id; the engine keys per-request routing state by it.
        prompt: chat-formatted prompt with one `<image>` placeholder per image.
        images: decoded RGB images, in placeholder order.
        instruction_embedding: `[384]` MiniLM embedding that routes the IF experts; None
            serves the base model with adapters off (base-only mode).
        version: the resident checkpoint version that must serve it; None in base-only mode.
        sampling: sampling options.
        trace: whether the final output must carry the routing trace.
    """

    request_id: str
    prompt: str
    images: tuple[Image.Image, ...]
    instruction_embedding: tuple[float, ...] | None
    version: int | None
    sampling: SamplingOptions
    trace: bool = False


@dataclass(frozen=True)
class LayerRoute:
    """One adapted layer's routing decision for one request.

    Attributes:
        layer: canonical layer name (`layers.0.mlp.up_proj`, `projector.linear_1`).
        vu_expert: the chosen visual-understanding expert (0 .. E/2-1).
        if_expert: the chosen instruction-following expert (E/2 .. E-1).
        w_vu: mean fusion weight of the VU expert over the request's tokens.
        w_if: mean fusion weight of the IF expert.
    """

    layer: str
    vu_expert: int
    if_expert: int
    w_vu: float
    w_if: float

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "vu_expert": self.vu_expert, "if_expert": self.if_expert,
                "w_vu": self.w_vu, "w_if": self.w_if}


@dataclass(frozen=True)
class GenerationDelta:
    """What one engine step adds to a request's output.

    Attributes:
        text: newly decoded text (may be empty).
        num_tokens: newly generated tokens in this delta.
        finish_reason: None while generating; "stop" or "length" on the last delta.
        prompt_tokens: the prompt's token count (images expanded), on the last delta.
        trace: per-layer routes, on the last delta when the input asked for a trace.
        queue_seconds: time the request waited in the engine's scheduler, on the last
            delta when the engine knows it.
    """

    text: str
    num_tokens: int
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    trace: tuple[LayerRoute, ...] | None = None
    queue_seconds: float | None = None


@dataclass(frozen=True)
class VersionInfo:
    """A checkpoint version resident in the engine.

    Attributes:
        version: registry version number.
        name: the registry folder name (`v0003-gqa`).
        tasks: tasks learned, in order (the last one names the version).
        path: the folder it was loaded from.
        instruction_types: the checkpoint's known instruction types.
        loaded_at: unix time it became resident.
        load_seconds: how long loading took.
    """

    version: int
    name: str
    tasks: tuple[str, ...]
    path: Path
    instruction_types: InstructionTable = field(default_factory=InstructionTable)
    loaded_at: float = 0.0
    load_seconds: float = 0.0


class EngineError(Exception):
    """The engine could not serve a request or an admin action."""


class UnknownVersionError(EngineError):
    """The named checkpoint version is not resident (404)."""


class EngineInputError(EngineError):
    """The engine rejected the request's content (400); the message says what to fix."""


class EngineBusyError(EngineError):
    """The engine cannot take more work now (503 with Retry-After)."""


class CheckpointRejectedError(EngineError):
    """A checkpoint folder could not be loaded (wrong base model, corrupt, incompatible)."""


@runtime_checkable
class ServingEngine(Protocol):
    """What the HTTP layer needs from an engine.

    Attributes:
        max_model_len: context length in tokens (prompt + completion).
        max_images_per_prompt: most images one request may carry.
    """

    max_model_len: int
    max_images_per_prompt: int

    def generate(self, request: GenerationInput) -> AsyncIterator[GenerationDelta]:
        """Stream a request's output; the last delta has a finish_reason.

        Raises:
            UnknownVersionError, EngineInputError, EngineBusyError: see class docs.
        """
        ...

    async def load_version(self, path: Path) -> VersionInfo:
        """Load a published, verified checkpoint folder and make it resident (not active).

        Raises:
            CheckpointRejectedError: the folder cannot serve on this base model.
        """
        ...

    async def activate_version(self, version: int) -> None:
        """Make a resident version the default for requests that name none."""
        ...

    async def unload_version(self, version: int) -> None:
        """Free the slot of a resident, inactive version.

        Raises:
            UnknownVersionError: not resident.
            EngineError: active, or in-flight requests are pinned to it.
        """
        ...

    def resident_versions(self) -> Sequence[VersionInfo]:
        """Resident versions, oldest first."""
        ...

    def active_version(self) -> int | None:
        """The active version, or None before the first activation."""
        ...

    async def check_health(self) -> None:
        """Return if the engine can serve; raise `EngineError` saying why not."""
        ...
