"""Pydantic models of the chat completions request (OpenAI schema + the `smolora` extension).

Only the HTTP boundary uses Pydantic. The request model checks types and ranges (so a
bad value becomes a 400 naming the field); limits that depend on the server's settings
or the model (image count, context length, `n`) and rules between fields (`top_logprobs`
needs `logprobs`, `min_tokens` <= the completion limit) are checked in `serving.py`, so
that their 400s name the field. The sampling fields mirror vLLM's `SamplingParams`
(OpenAI's plus vLLM's `top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`).
Fields the OpenAI API has but this server cannot honour are accepted only at their neutral values;
unknown top-level fields are ignored, as OpenAI-compatible servers do. Responses are
built as plain dicts in `serving.py` (they are ours, not a caller's, to validate).

The extension rides in the body as `"smolora": {...}` (the OpenAI SDK sends it with
`extra_body={"smolora": {...}}`); other servers ignore it.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from smolora.server.engine.protocol import MAX_TOP_LOGPROBS, VuRouting

MAX_INSTRUCTION_CHARS = 2000

_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_lone_surrogates(value: str) -> str:
    """Refuse a string holding a UTF-16 surrogate code point (`"\\ud800"` in the JSON): it is
    not a character, cannot be encoded as UTF-8, and would fail the tokenizer."""
    match = _SURROGATE.search(value)
    if match is not None:
        raise ValueError(
            f"contains a lone UTF-16 surrogate (U+{ord(match.group()):04X}) at character "
            f"{match.start()}; send valid Unicode text (pair surrogates or use UTF-8)"
        )
    return value


#: Text a caller sends: any string that is valid Unicode (every `str` field of a request uses it).
Text = Annotated[str, AfterValidator(_no_lone_surrogates)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TextPart(_Strict):
    """`{"type": "text", "text": "..."}`."""

    type: Literal["text"]
    text: Text


class ImageURL(_Strict):
    """`{"url": "data:image/png;base64,..." | "https://...", "detail": "auto"}`."""

    url: Text = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    """`{"type": "image_url", "image_url": {"url": ...}}` (a bare URL string is accepted too)."""

    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, v: Any) -> Any:
        return {"url": v} if isinstance(v, str) else v


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message. Roles: system, developer (treated as system), user, assistant."""

    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class StreamOptions(_Strict):
    """`{"include_usage": true}` adds a final chunk with the usage."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class SmoloraRequestOptions(_Strict):
    """The SMoLoRA extension of a request (`"smolora": {...}`).

    Attributes:
        instruction: the instruction text to route by (embedded as given).
        instruction_type: a known instruction type of the checkpoint to route by.
        version: the checkpoint version to serve with (must be resident).
        trace: include the routing trace in the response.
        vu_routing: "pinned" (VU route decided at prefill and kept) or "per_step" (recomputed
            from each decode step's token, as the reference code does); None takes the
            server's setting, else the serving version's own (imported reference checkpoints:
            per_step).
    """

    instruction: Text | None = Field(default=None, min_length=1, max_length=MAX_INSTRUCTION_CHARS)
    instruction_type: Text | None = Field(default=None, min_length=1, max_length=200)
    version: int | None = Field(default=None, ge=1)
    trace: bool | None = None
    vu_routing: VuRouting | None = None

    @model_validator(mode="after")
    def _one_instruction(self) -> SmoloraRequestOptions:
        if self.instruction is not None and self.instruction_type is not None:
            raise ValueError(
                "give either smolora.instruction or smolora.instruction_type, not both"
            )
        if self.instruction is not None and not self.instruction.strip():
            raise ValueError("smolora.instruction must not be blank")
        return self


class ChatCompletionRequest(BaseModel):
    """The request body of POST /v1/chat/completions."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Text = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, allow_inf_nan=False)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM's sampling extensions (vLLM's OpenAI server accepts them at the top level too).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop: Text | list[Text] | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # OpenAI fields this server honours only at their neutral values.
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    smolora: SmoloraRequestOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in items):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        unsupported = []
        if self.logit_bias:
            unsupported.append("logit_bias")
        if self.tools:
            unsupported.append("tools")
        if self.tool_choice not in (None, "none", "auto"):
            unsupported.append("tool_choice")
        if self.response_format and self.response_format.get("type", "text") != "text":
            unsupported.append("response_format")
        if unsupported:
            raise ValueError(
                f"{', '.join(unsupported)} {'is' if len(unsupported) == 1 else 'are'} "
                "not supported by this server; leave unset"
            )
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def completion_limit(self) -> int | None:
        """`max_completion_tokens` (current OpenAI name) or else `max_tokens`."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
