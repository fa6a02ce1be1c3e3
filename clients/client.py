"""A Python client for smolora-serve on top of the official `openai` SDK.

`SmoloraClient.chat(image, question, ...)` sends one image (a path, `PIL.Image`, or bytes:
turned into a base64 data URL) and a question, with the SMoLoRA extension (instruction
text or type, checkpoint version, trace) in `extra_body`, and returns a `ChatResult` with
the answer, usage, the version that served it, how the instruction was chosen and the
routing trace. `routing_trace(completion)` reads the trace off any completion the SDK
returned. Checkpoint admin (list, load, activate, roll back, unload) goes over plain HTTP
with the admin key. `SmoloraClient.openai` is the underlying `openai.OpenAI` for
everything else.

It imports nothing from the server: the wire format is the contract.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from PIL import Image

ImageLike = str | Path | bytes | Image.Image
_MEDIA = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class SmoloraAPIError(RuntimeError):
    """A non-2xx answer of an admin endpoint.

    Attributes:
        status: HTTP status code.
        error: the server's `{"message", "type", "param", "code"}` object.
    """

    def __init__(self, status: int, error: dict[str, Any]):
        super().__init__(f"HTTP {status}: {error.get('message', error)}")
        self.status = status
        self.error = error


def image_to_data_url(image: ImageLike) -> str:
    """A `data:image/...;base64,...` URL for a path, PIL image or encoded bytes.

    PNG, JPEG and WebP bytes are sent as they are; a PIL image or any other format is
    re-encoded as PNG.
    """
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data, media = buf.getvalue(), "image/png"
    else:
        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            if fmt in _MEDIA:
                media = _MEDIA[fmt]
            else:
                buf = io.BytesIO()
                img.convert("RGB").save(buf, format="PNG")
                data, media = buf.getvalue(), "image/png"
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def _extension(completion: Any) -> dict[str, Any] | None:
    ext = getattr(completion, "smolora", None)
    if ext is None and isinstance(completion, dict):
        ext = completion.get("smolora")
    if ext is None:
        extra = getattr(completion, "model_extra", None) or {}
        ext = extra.get("smolora")
    return ext


def routing_trace(completion: Any, index: int = 0) -> list[dict[str, Any]] | None:
    """The per-layer routes of choice `index` of a completion (or its last stream chunk).

    Returns:
        `[{"layer", "vu_expert", "if_expert", "w_vu", "w_if"}, ...]`, or None when the
        response carries no trace (the request did not ask for one).
    """
    ext = _extension(completion)
    if not ext or not ext.get("trace"):
        return None
    for t in ext["trace"]:
        if t.get("index") == index:
            return t.get("layers")
    return None


@dataclass
class ChatResult:
    """One answer and what the server says about how it was produced.

    Attributes:
        text: the answer.
        finish_reason: "stop" or "length".
        usage: prompt/completion/total token counts.
        model: `name@version` that served it.
        version: the checkpoint version number.
        instruction: how the instruction was chosen (source, text, type, similarity, rule).
        trace: per-layer routes (None unless asked for).
        raw: the SDK's completion object (or the last stream chunk).
    """

    text: str
    finish_reason: str | None
    usage: dict[str, int]
    model: str
    version: int | None
    instruction: dict[str, Any] | None
    trace: list[dict[str, Any]] | None
    raw: Any = field(repr=False, default=None)


class SmoloraClient:
    """Client of one smolora-serve server.

    Args:
        base_url: server root, e.g. `http://127.0.0.1:8000` (no `/v1`).
        api_key: inference key (servers without keys accept anything).
        admin_api_key: key for the checkpoint admin endpoints.
        timeout: seconds per HTTP request.
        http_client: an `httpx.Client` to use for both the SDK and admin calls.
        max_retries: SDK retries on 429/5xx/connection errors.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        admin_api_key: str | None = None,
        timeout: float = 120.0,
        http_client: httpx.Client | None = None,
        max_retries: int = 2,
    ):
        self.base_url = base_url.rstrip("/")
        self.admin_api_key = admin_api_key
        self._http = http_client or httpx.Client(timeout=timeout)
        self.openai = openai.OpenAI(
            base_url=self.base_url + "/v1",
            api_key=api_key or "EMPTY",
            timeout=timeout,
            http_client=self._http,
            max_retries=max_retries,
        )
        self._model: str | None = None

    # --- inference --------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Served model ids: the name (active version) and `name@N` per resident version."""
        return [m.id for m in self.openai.models.list()]

    def default_model(self) -> str:
        if self._model is None:
            self._model = self.models()[0]
        return self._model

    def _request(
        self,
        image: ImageLike | None,
        question: str,
        instruction: str | None,
        instruction_type: str | None,
        version: int | None,
        trace: bool,
        model: str | None,
        kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if image is not None:
            content.append({"type": "image_url", "image_url": {"url": image_to_data_url(image)}})
        content.append({"type": "text", "text": question})
        ext: dict[str, Any] = {"trace": trace}
        if instruction is not None:
            ext["instruction"] = instruction
        if instruction_type is not None:
            ext["instruction_type"] = instruction_type
        if version is not None:
            ext["version"] = version
        extra_body = dict(kwargs.pop("extra_body", None) or {})
        extra_body["smolora"] = ext
        return dict(
            model=model or self.default_model(),
            messages=[{"role": "user", "content": content}],
            extra_body=extra_body,
            **kwargs,
        )

    def chat(
        self,
        image: ImageLike | None,
        question: str,
        *,
        instruction: str | None = None,
        instruction_type: str | None = None,
        version: int | None = None,
        trace: bool = True,
        model: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        **kwargs: Any,
    ) -> ChatResult:
        """Ask one question about one image.

        Args:
            image: path, PIL image, encoded bytes, or None for a text-only question.
            question: the user's text (the server extracts the instruction from it unless
                `instruction` or `instruction_type` is given).
            instruction: instruction text to route by.
            instruction_type: a known instruction type of the checkpoint.
            version: checkpoint version to serve with (default: the active one).
            trace: ask for the routing trace.
            model: model id (default: the server's first, i.e. the active version).
            max_tokens, temperature, **kwargs: OpenAI chat parameters.

        Raises:
            openai.APIStatusError: the server refused the request (its message says why).
        """
        req = self._request(
            image,
            question,
            instruction,
            instruction_type,
            version,
            trace,
            model,
            dict(max_tokens=max_tokens, temperature=temperature, **kwargs),
        )
        completion = self.openai.chat.completions.create(**req)
        ext = _extension(completion) or {}
        choice = completion.choices[0]
        return ChatResult(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason,
            usage=completion.usage.model_dump() if completion.usage else {},
            model=completion.model,
            version=ext.get("version"),
            instruction=ext.get("instruction"),
            trace=routing_trace(completion),
            raw=completion,
        )

    def stream_chat(
        self, image: ImageLike | None, question: str, **kwargs: Any
    ) -> Iterator[str | ChatResult]:
        """Like `chat`, streaming: yields text pieces, then one final `ChatResult`."""
        names = ("instruction", "instruction_type", "version", "model")
        opts = {k: kwargs.pop(k, None) for k in names}
        trace = kwargs.pop("trace", True)
        kwargs.setdefault("max_tokens", 64)
        kwargs.setdefault("temperature", 0.0)
        req = self._request(
            image,
            question,
            opts["instruction"],
            opts["instruction_type"],
            opts["version"],
            trace,
            opts["model"],
            dict(stream=True, stream_options={"include_usage": True}, **kwargs),
        )
        parts: list[str] = []
        finish: str | None = None
        last: Any = None
        for chunk in self.openai.chat.completions.create(**req):
            last = chunk
            for ch in chunk.choices:
                if ch.index == 0 and ch.delta.content:
                    parts.append(ch.delta.content)
                    yield ch.delta.content
                if ch.index == 0 and ch.finish_reason:
                    finish = ch.finish_reason
        ext = _extension(last) or {}
        yield ChatResult(
            text="".join(parts),
            finish_reason=finish,
            usage=last.usage.model_dump() if last is not None and last.usage else {},
            model=last.model if last is not None else "",
            version=ext.get("version"),
            instruction=ext.get("instruction"),
            trace=routing_trace(last) if last else None,
            raw=last,
        )

    # --- checkpoint admin ---------------------------------------------------------------------
    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.admin_api_key}"} if self.admin_api_key else {}
        resp = self._http.request(method, self.base_url + path, json=body, headers=headers)
        try:
            payload = resp.json()
        except ValueError:
            payload = {"error": {"message": resp.text}}
        if resp.status_code >= 400:
            raise SmoloraAPIError(resp.status_code, payload.get("error", payload))
        return payload

    def list_checkpoints(self) -> dict[str, Any]:
        """Registry versions, which are resident, the active one and the activation history."""
        return self._admin("GET", "/admin/checkpoints")

    def load(self, version: int, activate: bool = False) -> dict[str, Any]:
        """Make a published version resident (and optionally active)."""
        return self._admin(
            "POST", "/admin/checkpoints/load", {"version": version, "activate": activate}
        )

    def activate(self, version: int) -> dict[str, Any]:
        return self._admin("POST", "/admin/checkpoints/activate", {"version": version})

    def rollback(self) -> dict[str, Any]:
        """Re-activate the version that was active before the current one."""
        return self._admin("POST", "/admin/checkpoints/rollback", {})

    def unload(self, version: int) -> dict[str, Any]:
        return self._admin("POST", "/admin/checkpoints/unload", {"version": version})

    def ready(self) -> bool:
        """Whether the server answers /ready with 200."""
        try:
            return self._http.get(self.base_url + "/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self._http.close()
