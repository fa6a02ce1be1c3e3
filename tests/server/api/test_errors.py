"""Typed errors -> OpenAI error JSON; field locations; unknown routes never become 500s."""

from __future__ import annotations

from smolora.server.api.errors import (
    AuthenticationError,
    RateLimitError,
    ServiceUnavailableError,
    error_body,
    format_loc,
)


def test_error_body_shape() -> None:
    assert error_body("m", "t", "p", "c") == {
        "error": {"message": "m", "type": "t", "param": "p", "code": "c"}
    }


def test_typed_errors_carry_status_type_and_headers() -> None:
    e = RateLimitError("full", retry_after_s=3)
    assert (e.status_code, e.error_type, e.code, e.headers["Retry-After"]) == (
        429,
        "rate_limit_error",
        "queue_full",
        "3",
    )
    a = AuthenticationError("no key")
    assert (
        a.status_code == 401
        and a.headers["WWW-Authenticate"] == "Bearer"
        and a.code == "invalid_api_key"
    )
    s = ServiceUnavailableError("later", retry_after_s=2)
    assert s.status_code == 503 and s.to_response().headers["retry-after"] == "2"


def test_format_loc_drops_union_branch_tags() -> None:
    assert (
        format_loc(
            (
                "body",
                "messages",
                0,
                "content",
                "list[tagged-union[TextPart,ImagePart]]",
                1,
                "image_url",
            )
        )
        == "messages[0].content[1].image_url"
    )
    assert format_loc(("body", "messages", 0, "content", "str")) == "messages[0].content"
    assert format_loc(("body",)) is None


def test_unknown_route_and_method_are_openai_errors(served) -> None:
    client, _, _ = served
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "route_not_found"
    r = client.put("/v1/models")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}
