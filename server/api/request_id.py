"""Request ids on every response, and the per-request access record.

`RequestContextMiddleware` gives each HTTP request an id: the client's `x-request-id`
when it is sane (1-128 characters of letters, digits and `._:-`), otherwise a fresh one.
The id is sent back as `x-request-id` on every response (errors, 413s and streams
included), is what a 500's message cites (an exception no handler caught becomes a
generic 500 here, the exception logged under the id), and is the first field of the request's
access record (`access_log.py`), which the middleware creates, hands to the handlers as
`request.state.access`, completes with the status and end-to-end time and emits once the
response has ended, then hands it to `on_done` when given one (the promotion canary
counts the outcomes of the requests it routed).

It does not authenticate, limit or parse bodies.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smolora.server.api.access_log import ACCESS_LOGGER, AccessRecord, emit
from smolora.server.api.errors import internal_error

log = logging.getLogger("smolora.server.api")

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_from(value: bytes | None) -> str:
    """The client's id when it is sane, else a new random one."""
    if value is not None:
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            text = ""
        if _SANE_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


def request_record(scope: Scope) -> AccessRecord | None:
    """The access record of a request scope (None outside the middleware)."""
    state = scope.get("state")
    return state.get("access") if isinstance(state, dict) else None


class RequestContextMiddleware:
    """Assigns request ids, adds `x-request-id` to responses and emits access records.

    Args:
        app: the wrapped ASGI app.
        logger: where records go (the `smolora.server.access` logger by default).
        on_done: called with each finished request's record (its errors are logged, never
            raised).
    """

    def __init__(
        self,
        app: ASGIApp,
        logger: logging.Logger | None = None,
        on_done: Callable[[AccessRecord], None] | None = None,
    ):
        self.app = app
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = request_id_from(headers.get(REQUEST_ID_HEADER.encode()))
        client = scope.get("client")
        record = AccessRecord(
            request_id=rid,
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            client=client[0] if client else None,
        )
        scope.setdefault("state", {})["access"] = record
        start = time.perf_counter()
        header = (REQUEST_ID_HEADER.encode(), rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = dict(message)
                message["headers"] = [
                    *(h for h in message.get("headers", []) if h[0].lower() != header[0]),
                    header,
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if record.status is not None:
                raise  # the response has started: nothing more can be said to the client
            log.error(
                "unhandled error on %s %s (request %s)",
                record.method,
                record.path,
                rid,
                exc_info=exc,
            )
            body = json.dumps(internal_error(rid).to_dict()).encode()
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            record.e2e_s = time.perf_counter() - start
            emit(record, self.logger)
            if self.on_done is not None:
                try:
                    self.on_done(record)
                except Exception:  # noqa: BLE001 - a request's end must not fail on an observer
                    log.exception("request %s: the on_done observer failed", rid)
