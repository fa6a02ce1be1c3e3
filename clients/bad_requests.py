"""A table of malformed chat-completion requests and the OpenAI-style error each must get.

Shared by the HTTP-layer tests (`tests/server/api/test_bad_input.py`, against an app on a
scripted engine) and `bench/server.py` (against the real server): `CASES` lists
`(id, request, status, error type, code, param)`, where `request` holds `"json"` (a body)
or `"content"` (raw bytes) and optionally `"headers"` (replacing the default auth header).
`probe_bad_requests` posts every case to a running server and reports 5xx answers and
status differences, then checks that a normal request still succeeds.

The statuses assume the limits of the tests' `served` app: model `tiny-llava`, API key
`sk-test`, at most 2 images per request, 200 KB per image, 256x256 pixels, `n` <= 4, a
2 MB body, a 256-token context. A server with other limits answers some cases differently
(which `probe_bad_requests` reports, but does not count as a failure). Nothing here
imports the server.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any

import httpx
from PIL import Image

MODEL = "tiny-llava"
API_KEY = "sk-test"


def image_bytes(
    fmt: str = "PNG", size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (200, 30, 30)
) -> bytes:
    """A solid-colour image encoded as `fmt`."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def user_message(
    text: str | None = "What colour is the circle?", images: Sequence[str] = ()
) -> dict[str, Any]:
    """An OpenAI user message: image parts first, then the text part."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return {"role": "user", "content": parts}


AUTH = {"Authorization": f"Bearer {API_KEY}"}
IMG = data_url(image_bytes())
_png = image_bytes("PNG", (64, 64))
TRUNCATED = data_url(_png[: len(_png) // 2])
NOISE_PNG = data_url(bytes(range(256)) * 1000)  # ~256 KB, over the 200 KB limit of the `served` app
LONG_TEXT = "describe the red circle and the blue square " * 60


def ok_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [user_message("What colour is it?", [IMG])],
        "max_tokens": 2,
    }
    body.update(over)
    return body


def msgs(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    return list(messages)


def _with_surrogate(body: dict[str, Any], *path: str | int) -> bytes:
    """`body` as JSON bytes whose string at `path` ends in a lone surrogate (`\\ud800` escape)."""
    node: Any = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = node[path[-1]] + "\ud800"
    return json.dumps(body).encode()  # ensure_ascii writes the surrogate as the escape "\\ud800"


# (id, request: dict with "json" or "content" and optional "headers", status, error type,
#  code, param)
CASES: list[tuple[str, dict[str, Any], int, str, str | None, str | None]] = [
    (
        "invalid_json",
        {"content": b'{"model": "tiny-llava", '},
        400,
        "invalid_request_error",
        "invalid_json",
        None,
    ),
    ("body_not_object", {"content": b"[1, 2]"}, 400, "invalid_request_error", "invalid_json", None),
    ("empty_body", {"content": b""}, 400, "invalid_request_error", "invalid_json", None),
    (
        "missing_messages",
        {"json": {"model": MODEL}},
        400,
        "invalid_request_error",
        None,
        "messages",
    ),
    (
        "empty_messages",
        {"json": ok_body(messages=[])},
        400,
        "invalid_request_error",
        None,
        "messages",
    ),
    (
        "unknown_model",
        {"json": ok_body(model="gpt-4o")},
        404,
        "not_found_error",
        "model_not_found",
        "model",
    ),
    (
        "unknown_version",
        {"json": ok_body(model=f"{MODEL}@99")},
        404,
        "not_found_error",
        "model_not_found",
        "model",
    ),
    (
        "malformed_version",
        {"json": ok_body(model=f"{MODEL}@latest")},
        404,
        "not_found_error",
        "model_not_found",
        "model",
    ),
    (
        "unknown_ext_version",
        {"json": ok_body(smolora={"version": 99})},
        404,
        "not_found_error",
        "model_not_found",
        "smolora.version",
    ),
    (
        "conflicting_versions",
        {"json": ok_body(model=f"{MODEL}@2", smolora={"version": 1})},
        400,
        "invalid_request_error",
        None,
        "smolora.version",
    ),
    (
        "bad_base64",
        {
            "json": ok_body(
                messages=[user_message("hi", ["data:image/png;base64,@@@not-base64@@@"])]
            )
        },
        400,
        "invalid_request_error",
        "invalid_base64",
        "messages[0].content[0].image_url.url",
    ),
    (
        "non_image_media_type",
        {"json": ok_body(messages=[user_message("hi", ["data:text/plain;base64,aGk="])])},
        400,
        "invalid_request_error",
        "unsupported_media_type",
        "messages[0].content[0].image_url.url",
    ),
    (
        "non_image_bytes",
        {"json": ok_body(messages=[user_message("hi", [data_url(b"plain text, no pixels")])])},
        400,
        "invalid_request_error",
        "invalid_image",
        None,
    ),
    (
        "truncated_image",
        {"json": ok_body(messages=[user_message("hi", [TRUNCATED])])},
        400,
        "invalid_request_error",
        None,
        "messages[0].content[0].image_url.url",
    ),
    (
        "gif_not_accepted",
        {
            "json": ok_body(
                messages=[user_message("hi", [data_url(image_bytes("GIF"), "image/gif")])]
            )
        },
        400,
        "invalid_request_error",
        "unsupported_image_format",
        None,
    ),
    (
        "too_many_images",
        {"json": ok_body(messages=[user_message("hi", [IMG, IMG, IMG])])},
        400,
        "invalid_request_error",
        "too_many_images",
        "messages",
    ),
    (
        "too_many_pixels",
        {
            "json": ok_body(
                messages=[user_message("hi", [data_url(image_bytes("PNG", (300, 300)))])]
            )
        },
        400,
        "invalid_request_error",
        "image_too_large",
        None,
    ),
    (
        "too_many_bytes",
        {"json": ok_body(messages=[user_message("hi", [NOISE_PNG])])},
        400,
        "invalid_request_error",
        "image_too_large",
        None,
    ),
    (
        "remote_url_disabled",
        {"json": ok_body(messages=[user_message("hi", ["https://example.com/cat.png"])])},
        400,
        "invalid_request_error",
        "remote_images_disabled",
        None,
    ),
    (
        "file_url",
        {"json": ok_body(messages=[user_message("hi", ["file:///etc/passwd"])])},
        400,
        "invalid_request_error",
        "invalid_image_url",
        None,
    ),
    (
        "prompt_over_context",
        {"json": ok_body(messages=[user_message(LONG_TEXT, [IMG])])},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    ),
    (
        "max_tokens_over_context",
        {"json": ok_body(max_tokens=1000)},
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        "temperature_too_high",
        {"json": ok_body(temperature=3.5)},
        400,
        "invalid_request_error",
        None,
        "temperature",
    ),
    (
        "temperature_not_a_number",
        {"json": ok_body(temperature="hot")},
        400,
        "invalid_request_error",
        None,
        "temperature",
    ),
    ("top_p_zero", {"json": ok_body(top_p=0)}, 400, "invalid_request_error", None, "top_p"),
    ("n_zero", {"json": ok_body(n=0)}, 400, "invalid_request_error", None, "n"),
    ("n_over_limit", {"json": ok_body(n=5)}, 400, "invalid_request_error", None, "n"),
    (
        "max_tokens_zero",
        {"json": ok_body(max_tokens=0)},
        400,
        "invalid_request_error",
        None,
        "max_tokens",
    ),
    (
        "seed_out_of_range",
        {"json": ok_body(seed=2**70)},
        400,
        "invalid_request_error",
        None,
        "seed",
    ),
    (
        "too_many_stops",
        {"json": ok_body(stop=[str(i) for i in range(20)])},
        400,
        "invalid_request_error",
        None,
        "stop",
    ),
    ("empty_stop", {"json": ok_body(stop=[""])}, 400, "invalid_request_error", None, "stop"),
    (
        "tool_role",
        {"json": ok_body(messages=[{"role": "tool", "content": "x"}])},
        400,
        "invalid_request_error",
        None,
        "messages[0].role",
    ),
    (
        "unknown_part_type",
        {"json": ok_body(messages=[{"role": "user", "content": [{"type": "input_audio"}]}])},
        400,
        "invalid_request_error",
        None,
        "messages[0].content[0]",
    ),
    (
        "last_message_not_user",
        {
            "json": ok_body(
                messages=msgs(user_message("hi"), {"role": "assistant", "content": "hello"})
            )
        },
        400,
        "invalid_request_error",
        None,
        "messages[1].role",
    ),
    (
        "image_in_system_message",
        {
            "json": ok_body(
                messages=msgs(
                    {
                        "role": "system",
                        "content": [{"type": "image_url", "image_url": {"url": IMG}}],
                    },
                    user_message("hi"),
                )
            )
        },
        400,
        "invalid_request_error",
        None,
        "messages[0].content[0]",
    ),
    (
        "empty_user_message",
        {"json": ok_body(messages=[{"role": "user", "content": ""}])},
        400,
        "invalid_request_error",
        None,
        "messages[0].content",
    ),
    (
        "image_placeholder_in_text",
        {"json": ok_body(messages=[user_message("look <image> here")])},
        400,
        "invalid_request_error",
        None,
        "messages[0].content[0].text",
    ),
    (
        "unknown_instruction_type",
        {"json": ok_body(smolora={"instruction_type": "poetry"})},
        400,
        "invalid_request_error",
        "unknown_instruction_type",
        "smolora.instruction_type",
    ),
    (
        "two_instructions",
        {"json": ok_body(smolora={"instruction": "a", "instruction_type": "caption"})},
        400,
        "invalid_request_error",
        None,
        "smolora",
    ),
    (
        "unknown_extension_field",
        {"json": ok_body(smolora={"experts": 3})},
        400,
        "invalid_request_error",
        None,
        "smolora.experts",
    ),
    (
        "logit_bias_unsupported",
        {"json": ok_body(logit_bias={"5": 10})},
        400,
        "invalid_request_error",
        None,
        None,
    ),
    (
        "top_logprobs_without_logprobs",
        {"json": ok_body(top_logprobs=2)},
        400,
        "invalid_request_error",
        None,
        "top_logprobs",
    ),
    (
        "top_logprobs_over_20",
        {"json": ok_body(logprobs=True, top_logprobs=21)},
        400,
        "invalid_request_error",
        None,
        "top_logprobs",
    ),
    (
        "top_k_below_minus_one",
        {"json": ok_body(top_k=-2)},
        400,
        "invalid_request_error",
        None,
        "top_k",
    ),
    ("min_p_over_one", {"json": ok_body(min_p=1.5)}, 400, "invalid_request_error", None, "min_p"),
    (
        "repetition_penalty_zero",
        {"json": ok_body(repetition_penalty=0)},
        400,
        "invalid_request_error",
        None,
        "repetition_penalty",
    ),
    (
        "presence_penalty_out_of_range",
        {"json": ok_body(presence_penalty=3)},
        400,
        "invalid_request_error",
        None,
        "presence_penalty",
    ),
    (
        "frequency_penalty_out_of_range",
        {"json": ok_body(frequency_penalty=-2.5)},
        400,
        "invalid_request_error",
        None,
        "frequency_penalty",
    ),
    (
        "min_tokens_over_max_tokens",
        {"json": ok_body(min_tokens=5, max_tokens=2)},
        400,
        "invalid_request_error",
        None,
        "min_tokens",
    ),
    (
        "ignore_eos_not_bool",
        {"json": ok_body(ignore_eos="yes")},
        400,
        "invalid_request_error",
        None,
        "ignore_eos",
    ),
    # A lone UTF-16 surrogate ("\ud800" in the JSON text) is not Unicode text: 400 naming the field.
    (
        "lone_surrogate_in_text",
        {"content": _with_surrogate(ok_body(), "messages", 0, "content", 1, "text")},
        400,
        "invalid_request_error",
        "invalid_value",
        "messages[0].content[1].text",
    ),
    (
        "lone_surrogate_in_system_message",
        {
            "content": _with_surrogate(
                ok_body(messages=[{"role": "system", "content": "Be brief."}, user_message("hi")]),
                "messages",
                0,
                "content",
            )
        },
        400,
        "invalid_request_error",
        "invalid_value",
        "messages[0].content",
    ),
    (
        "lone_surrogate_in_instruction",
        {
            "content": _with_surrogate(
                ok_body(smolora={"instruction": "Answer."}), "smolora", "instruction"
            )
        },
        400,
        "invalid_request_error",
        "invalid_value",
        "smolora.instruction",
    ),
    (
        "lone_surrogate_in_stop",
        {"content": _with_surrogate(ok_body(stop=["END"]), "stop", 0)},
        400,
        "invalid_request_error",
        "invalid_value",
        "stop[0]",
    ),
    (
        "stream_options_without_stream",
        {"json": ok_body(stream_options={"include_usage": True})},
        400,
        "invalid_request_error",
        None,
        None,
    ),
    (
        "missing_api_key",
        {"json": ok_body(), "headers": {}},
        401,
        "authentication_error",
        "invalid_api_key",
        None,
    ),
    (
        "wrong_api_key",
        {"json": ok_body(), "headers": {"Authorization": "Bearer nope"}},
        401,
        "authentication_error",
        "invalid_api_key",
        None,
    ),
    (
        "body_over_limit",
        {"content": b'{"model": "' + b"x" * 2_100_000 + b'"}'},
        413,
        "invalid_request_error",
        "request_too_large",
        None,
    ),
]


def post_case(
    client: httpx.Client, request: dict[str, Any], path: str = "/v1/chat/completions"
) -> httpx.Response:
    """Post one case's request (default headers: JSON + the API key)."""
    headers = {"Content-Type": "application/json", **AUTH}
    if "headers" in request:
        headers = {"Content-Type": "application/json", **request["headers"]}
    if "json" in request:
        return client.post(path, json=request["json"], headers=headers)
    return client.post(path, content=request["content"], headers=headers)


def probe_bad_requests(base_url: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Post every case to a running server; then one normal request.

    Returns:
        `{"cases", "five_xx": ["id:status", ...], "status_differs_from_test_app": [...],
        "normal_request_ok_after": bool}`.
    """
    five_xx: list[str] = []
    mismatched: list[str] = []
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        for name, req, status, *_ in CASES:
            r = post_case(client, req)
            if r.status_code >= 500:
                five_xx.append(f"{name}:{r.status_code}")
            elif r.status_code != status:
                mismatched.append(f"{name}:{r.status_code}!={status}")
        ok = client.post("/v1/chat/completions", json=ok_body(), headers=AUTH)
        still_ok = ok.status_code == 200 and bool(ok.json()["choices"][0]["message"]["content"])
    return {
        "cases": len(CASES),
        "five_xx": five_xx,
        "status_differs_from_test_app": mismatched,
        "normal_request_ok_after": still_ok,
    }
