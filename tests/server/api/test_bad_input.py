"""Table-driven bad input: each case gets a clear OpenAI-style 4xx, and the server keeps serving.

Every case posts one malformed request to a shared app (engine held by `ScriptedEngine`,
so this exercises the HTTP layer only), checks the status, the error type and, where it
matters, the code and the field named, then checks that a normal request still succeeds.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.api.helpers import data_url, image_bytes, user_message

AUTH = {"Authorization": "Bearer sk-test"}
IMG = data_url(image_bytes())
_png = image_bytes("PNG", (64, 64))
TRUNCATED = data_url(_png[: len(_png) // 2])
NOISE_PNG = data_url(bytes(range(256)) * 1000)  # ~256 KB, over the 200 KB limit of the `served` app
LONG_TEXT = "describe the red circle and the blue square " * 60


def ok_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny-llava", "messages": [user_message("What colour is it?", [IMG])],
                            "max_tokens": 2}
    body.update(over)
    return body


def msgs(*messages: dict[str, Any]) -> list[dict[str, Any]]:
    return list(messages)


# (id, request: dict with "json" or "content" and optional "headers", status, error type, code, param)
CASES: list[tuple[str, dict[str, Any], int, str, str | None, str | None]] = [
    ("invalid_json", {"content": b'{"model": "tiny-llava", '}, 400, "invalid_request_error", "invalid_json", None),
    ("body_not_object", {"content": b"[1, 2]"}, 400, "invalid_request_error", "invalid_json", None),
    ("empty_body", {"content": b""}, 400, "invalid_request_error", "invalid_json", None),
    ("missing_messages", {"json": {"model": "tiny-llava"}}, 400, "invalid_request_error", None, "messages"),
    ("empty_messages", {"json": ok_body(messages=[])}, 400, "invalid_request_error", None, "messages"),
    ("unknown_model", {"json": ok_body(model="gpt-4o")}, 404, "not_found_error", "model_not_found", "model"),
    ("unknown_version", {"json": ok_body(model="tiny-llava@99")}, 404, "not_found_error", "model_not_found", "model"),
    ("malformed_version", {"json": ok_body(model="tiny-llava@latest")}, 404, "not_found_error", "model_not_found",
     "model"),
    ("unknown_ext_version", {"json": ok_body(smolora={"version": 99})}, 404, "not_found_error", "model_not_found",
     "smolora.version"),
    ("conflicting_versions", {"json": ok_body(model="tiny-llava@2", smolora={"version": 1})}, 400,
     "invalid_request_error", None, "smolora.version"),
    ("bad_base64", {"json": ok_body(messages=[user_message("hi", ["data:image/png;base64,@@@not-base64@@@"])])},
     400, "invalid_request_error", "invalid_base64", "messages[0].content[0].image_url.url"),
    ("non_image_media_type", {"json": ok_body(messages=[user_message("hi", ["data:text/plain;base64,aGk="])])},
     400, "invalid_request_error", "unsupported_media_type", "messages[0].content[0].image_url.url"),
    ("non_image_bytes", {"json": ok_body(messages=[user_message("hi", [data_url(b"plain text, no pixels")])])},
     400, "invalid_request_error", "invalid_image", None),
    ("truncated_image", {"json": ok_body(messages=[user_message("hi", [TRUNCATED])])}, 400, "invalid_request_error",
     None, "messages[0].content[0].image_url.url"),
    ("gif_not_accepted", {"json": ok_body(messages=[user_message("hi", [data_url(image_bytes("GIF"), "image/gif")])])},
     400, "invalid_request_error", "unsupported_image_format", None),
    ("too_many_images", {"json": ok_body(messages=[user_message("hi", [IMG, IMG, IMG])])}, 400,
     "invalid_request_error", "too_many_images", "messages"),
    ("too_many_pixels", {"json": ok_body(messages=[user_message("hi", [data_url(image_bytes("PNG", (300, 300)))])])},
     400, "invalid_request_error", "image_too_large", None),
    ("too_many_bytes", {"json": ok_body(messages=[user_message("hi", [NOISE_PNG])])}, 400, "invalid_request_error",
     "image_too_large", None),
    ("remote_url_disabled", {"json": ok_body(messages=[user_message("hi", ["https://example.com/cat.png"])])},
     400, "invalid_request_error", "remote_images_disabled", None),
    ("file_url", {"json": ok_body(messages=[user_message("hi", ["file:///etc/passwd"])])}, 400,
     "invalid_request_error", "invalid_image_url", None),
    ("prompt_over_context", {"json": ok_body(messages=[user_message(LONG_TEXT, [IMG])])}, 400,
     "invalid_request_error", "context_length_exceeded", "messages"),
    ("max_tokens_over_context", {"json": ok_body(max_tokens=1000)}, 400, "invalid_request_error",
     "context_length_exceeded", "max_tokens"),
    ("temperature_too_high", {"json": ok_body(temperature=3.5)}, 400, "invalid_request_error", None, "temperature"),
    ("temperature_not_a_number", {"json": ok_body(temperature="hot")}, 400, "invalid_request_error", None,
     "temperature"),
    ("top_p_zero", {"json": ok_body(top_p=0)}, 400, "invalid_request_error", None, "top_p"),
    ("n_zero", {"json": ok_body(n=0)}, 400, "invalid_request_error", None, "n"),
    ("n_over_limit", {"json": ok_body(n=5)}, 400, "invalid_request_error", None, "n"),
    ("max_tokens_zero", {"json": ok_body(max_tokens=0)}, 400, "invalid_request_error", None, "max_tokens"),
    ("seed_out_of_range", {"json": ok_body(seed=2**70)}, 400, "invalid_request_error", None, "seed"),
    ("too_many_stops", {"json": ok_body(stop=[str(i) for i in range(20)])}, 400, "invalid_request_error", None, "stop"),
    ("empty_stop", {"json": ok_body(stop=[""])}, 400, "invalid_request_error", None, "stop"),
    ("tool_role", {"json": ok_body(messages=[{"role": "tool", "content": "x"}])}, 400, "invalid_request_error", None,
     "messages[0].role"),
    ("unknown_part_type", {"json": ok_body(messages=[{"role": "user", "content": [{"type": "input_audio"}]}])}, 400,
     "invalid_request_error", None, "messages[0].content[0]"),
    ("last_message_not_user", {"json": ok_body(messages=msgs(user_message("hi"),
                                                              {"role": "assistant", "content": "hello"}))},
     400, "invalid_request_error", None, "messages[1].role"),
    ("image_in_system_message", {"json": ok_body(messages=msgs(
        {"role": "system", "content": [{"type": "image_url", "image_url": {"url": IMG}}]}, user_message("hi")))},
     400, "invalid_request_error", None, "messages[0].content[0]"),
    ("empty_user_message", {"json": ok_body(messages=[{"role": "user", "content": ""}])}, 400,
     "invalid_request_error", None, "messages[0].content"),
    ("image_placeholder_in_text", {"json": ok_body(messages=[user_message("look <image> here")])}, 400,
     "invalid_request_error", None, "messages[0].content[0].text"),
    ("unknown_instruction_type", {"json": ok_body(smolora={"instruction_type": "poetry"})}, 400,
     "invalid_request_error", "unknown_instruction_type", "smolora.instruction_type"),
    ("two_instructions", {"json": ok_body(smolora={"instruction": "a", "instruction_type": "caption"})}, 400,
     "invalid_request_error", None, "smolora"),
    ("unknown_extension_field", {"json": ok_body(smolora={"experts": 3})}, 400, "invalid_request_error", None,
     "smolora.experts"),
    ("logprobs_unsupported", {"json": ok_body(logprobs=True)}, 400, "invalid_request_error", None, None),
    ("stream_options_without_stream", {"json": ok_body(stream_options={"include_usage": True})}, 400,
     "invalid_request_error", None, None),
    ("missing_api_key", {"json": ok_body(), "headers": {}}, 401, "authentication_error", "invalid_api_key", None),
    ("wrong_api_key", {"json": ok_body(), "headers": {"Authorization": "Bearer nope"}}, 401, "authentication_error",
     "invalid_api_key", None),
    ("body_over_limit", {"content": b'{"model": "' + b"x" * 2_100_000 + b'"}'}, 413, "invalid_request_error",
     "request_too_large", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_4xx_and_serving_goes_on(served, case) -> None:
    name, req, status, etype, code, param = case
    client, _, _ = served
    headers = {"Content-Type": "application/json", **AUTH}
    if "headers" in req:
        headers = {"Content-Type": "application/json", **req["headers"]}
    if "json" in req:
        r = client.post("/v1/chat/completions", json=req["json"], headers=headers)
    else:
        r = client.post("/v1/chat/completions", content=req["content"], headers=headers)
    assert r.status_code == status, (name, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == etype, (name, err)
    assert len(err["message"]) > 10, (name, err)
    if code is not None:
        assert err["code"] == code, (name, err)
    if param is not None:
        assert err["param"] == param, (name, err)
    ok = client.post("/v1/chat/completions", json=ok_body(), headers=AUTH)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"], name


def test_the_suite_is_large_enough() -> None:
    assert len(CASES) >= 25


def test_a_full_queue_gets_429_with_retry_after(tiny_model_dir, registry) -> None:
    from tests.server.api.conftest import running_app
    from tests.server.api.helpers import wait_until

    with running_app(tiny_model_dir, registry, max_concurrent_requests=1, max_waiting_requests=0) as (client, engine, _):
        engine.hold()
        import threading

        results: list[int] = []
        t = threading.Thread(target=lambda: results.append(client.post("/v1/chat/completions", json=ok_body()).status_code))
        t.start()
        wait_until(lambda: engine.in_flight == 1, what="the first request to be in flight")
        r = client.post("/v1/chat/completions", json=ok_body())
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        engine.release()
        t.join(timeout=30)
        assert results == [200]
        assert client.post("/v1/chat/completions", json=ok_body()).status_code == 200
