"""Typed API errors and the exception handlers that turn them into OpenAI-style JSON.

Every error a caller can see has the shape the OpenAI SDK parses:
`{"error": {"message": str, "type": str, "param": str | null, "code": str | null}}`.
Handlers cover our own `APIError`s, FastAPI's request validation (422 in FastAPI, 400
here, with the offending field as `param`), unknown routes and methods, and anything
unexpected (500 with a generic message and the request id; the exception goes to the log
under that id; a caller mistake must never end up there).
`engine_error_to_api` maps the engine's typed errors (`server/engine/protocol.py`) onto
these. It does not decide what is a mistake: the serving modules raise these errors.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from smolora.server.engine import protocol as engine_protocol

log = logging.getLogger("smolora.server.api")


class APIError(Exception):
    """An error returned to the caller as OpenAI-style JSON.

    Args:
        message: what went wrong and what to change (shown to the caller).
        param: the request field at fault, dotted (`messages[0].content[1].image_url`).
        code: a short machine-readable code (`model_not_found`, `image_too_large`).
        headers: extra response headers (e.g. `Retry-After`).
    """

    status_code: int = 400
    error_type: str = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        """The `{"error": {...}}` body."""
        return error_body(self.message, self.error_type, self.param, self.code)

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status_code, headers=self.headers)


class InvalidRequestError(APIError):
    """400: the request is malformed or asks for something impossible."""


class AuthenticationError(APIError):
    """401: the API key is missing or wrong."""

    status_code = 401
    error_type = "authentication_error"

    def __init__(self, message: str, **kw: Any):
        kw.setdefault("code", "invalid_api_key")
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class PermissionDeniedError(APIError):
    """403: the endpoint is disabled or the key may not use it."""

    status_code = 403
    error_type = "permission_error"


class NotFoundError(APIError):
    """404: unknown model, version or route."""

    status_code = 404
    error_type = "not_found_error"


class ConflictError(APIError):
    """409: the request conflicts with the server's state (e.g. unloading the active version)."""

    status_code = 409
    error_type = "conflict_error"


class PayloadTooLargeError(APIError):
    """413: the request body is larger than the server accepts."""

    status_code = 413
    error_type = "invalid_request_error"


class RateLimitError(APIError):
    """429: too many requests are waiting; retry after `Retry-After` seconds."""

    status_code = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int, **kw: Any):
        kw.setdefault("code", "queue_full")
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, **kw)


class ServiceUnavailableError(APIError):
    """503: the server cannot serve now (starting, no active version, queue timeout)."""

    status_code = 503
    error_type = "service_unavailable_error"

    def __init__(self, message: str, *, retry_after_s: int, **kw: Any):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, **kw)


class InternalServerError(APIError):
    """500: a fault of the server; the message carries an id to find the log line."""

    status_code = 500
    error_type = "server_error"


def engine_error_to_api(
    e: BaseException, retry_after_s: int, request_id: str | None = None
) -> APIError:
    """The error a caller sees for a failure while serving a request.

    `APIError`s pass through; the engine's errors map as: invalid request -> 400
    `invalid_input`, version not resident -> 404 `version_not_found`, no free slot -> 503
    `engine_busy`, engine not running -> 503 `engine_unavailable`, any other engine error
    -> 500 `engine_error`; anything else -> 500 `internal_error`. A 500 never carries the
    exception's text: the caller gets a generic message citing `request_id` (or a fresh
    reference), and the exception goes to the log under the same id.
    """
    if isinstance(e, APIError):
        return e
    if isinstance(e, engine_protocol.VersionNotResidentError):
        return NotFoundError(f"{e}", param="smolora.version", code="version_not_found")
    if isinstance(e, engine_protocol.InvalidRequestError):
        return InvalidRequestError(f"{e}", code="invalid_input")
    if isinstance(e, engine_protocol.NoFreeSlotError):
        return engine_busy(f"{e}", retry_after_s)
    ref = request_id or uuid.uuid4().hex[:12]
    if isinstance(e, engine_protocol.EngineUnavailableError):
        log.error("engine unavailable (request %s): %s", ref, e)
        return ServiceUnavailableError(
            f"the engine is not running (request id {ref}); retry after {retry_after_s}s",
            retry_after_s=retry_after_s,
            code="engine_unavailable",
        )
    if isinstance(e, engine_protocol.EngineError):
        log.error("engine error (request %s): %s", ref, e, exc_info=e)
        return internal_error(ref, code="engine_error")
    log.error("unexpected error while generating (request %s)", ref, exc_info=e)
    return internal_error(ref)


def internal_error(request_id: str, code: str = "internal_error") -> InternalServerError:
    """A 500 that says nothing about the fault but the id its log line carries."""
    return InternalServerError(
        f"internal server error (request id {request_id}); this is a server fault, not your "
        "request's; the server log has the details under this id",
        code=code,
    )


def engine_busy(reason: str, retry_after_s: int) -> ServiceUnavailableError:
    """503 `engine_busy`: the engine cannot take (or aborted) the request; retry later."""
    return ServiceUnavailableError(
        f"the engine is busy ({reason}); retry after {retry_after_s}s",
        retry_after_s=retry_after_s,
        code="engine_busy",
    )


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def format_loc(loc: Iterable[Any]) -> str | None:
    """`('body', 'messages', 0, 'content')` -> `messages[0].content`."""
    out = ""
    previous: Any = None
    for part in loc:
        if part in ("body", "query", "path", "header"):
            continue
        if isinstance(part, str) and part == previous:
            continue  # a discriminated union's tag followed by the field of the same name (`text`)
        previous = part
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (
            part.startswith("function-")
            or "[" in part
            or part in {"str", "int", "float", "bool", "list", "dict", "none"}
        ):
            continue  # pydantic union-branch tags are noise to a caller
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errors = exc.errors()
    for err in errors:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            return (
                f"the request body is not valid JSON ({ctx.get('error', 'parse error')}); "
                "send a JSON object with Content-Type: application/json",
                None,
                "invalid_json",
            )
    if not errors:
        return "the request is invalid", None, "invalid_request"
    # Report the most specific problem first: pydantic lists one error per union branch.
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    param = format_loc(err.get("loc", ()))
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    given = err.get("input", None)
    shown = ""
    if given is not None and not isinstance(given, (dict, list)):
        text = repr(given)
        shown = f" (got {text[:80]}{'…' if len(text) > 80 else ''})"
    if param is None and err.get("type") in {
        "missing",
        "dict_type",
        "model_attributes_type",
        "model_type",
    }:
        if err.get("type") == "missing":
            return (
                "the request body is empty; send a JSON object (Content-Type: application/json)",
                None,
                "invalid_json",
            )
        return (
            f"the request body must be a JSON object (Content-Type: application/json){shown}",
            None,
            "invalid_json",
        )
    if err.get("type") == "missing":
        msg = "this field is required"
    elif err.get("type") == "extra_forbidden":
        msg = "unknown field"
    where = f"{param}: " if param else ""
    return f"{where}{msg}{shown}", param, "invalid_value"


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.to_response()


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param, code = _validation_message(exc)
    return InvalidRequestError(message, param=param, code=code).to_response()


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        err: APIError = NotFoundError(
            f"no route {request.method} {request.url.path}; see /docs for the API",
            code="route_not_found",
        )
    elif status == 405:
        err = InvalidRequestError(
            f"method {request.method} is not allowed on {request.url.path}",
            code="method_not_allowed",
        )
        err.status_code = 405
    else:
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
        err = APIError(str(exc.detail or phrase))
        err.status_code = status
        err.error_type = "invalid_request_error" if status < 500 else "server_error"
    if exc.headers:
        err.headers.update(exc.headers)
    return err.to_response()


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    access = getattr(request.state, "access", None)
    ref = access.request_id if access is not None else uuid.uuid4().hex[:12]
    log.error(
        "unhandled error on %s %s (request %s)",
        request.method,
        request.url.path,
        ref,
        exc_info=exc,
    )
    return internal_error(ref).to_response()


def install_exception_handlers(app: FastAPI) -> None:
    """Register the handlers on an app."""
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(Exception, _unhandled_handler)


def sse_error_event(err: APIError) -> str:
    """An error as one SSE `data:` event (for failures after a stream has started)."""
    return f"data: {json.dumps(err.to_dict())}\n\n"
