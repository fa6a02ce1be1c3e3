"""Structured access logs: one JSON line per HTTP request on the `smolora.server.access` logger.

`AccessRecord` is what one request leaves behind: its request id, method, path, client
address and status, plus what the chat handler fills in (the model version that served
it and how it was chosen -- named by the request, the active version, or a promotion
canary -- prompt and completion tokens, time to first token, the completion id, the engine
error code if any). `RequestContextMiddleware` (`request_id.py`) creates the record, puts
it on the request scope (`request.state.access`), times the response and calls
`emit`, which writes the record as one JSON object per line. `configure_access_log`
directs the logger to a file or to stderr (`--access-log PATH|-`); without it the
records go wherever the application's logging sends `smolora.server.access` (by default
nowhere below WARNING, so nothing).

Probe endpoints (`/health`, `/ready`, `/metrics`) are logged only when they fail. No user
text, image or API key is ever logged.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

ACCESS_LOGGER = "smolora.server.access"
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


@dataclass
class AccessRecord:
    """One request's access-log fields (None: not known or not applicable)."""

    request_id: str
    method: str
    path: str
    client: str | None = None
    status: int | None = None
    model: str | None = None
    version: int | None = None
    version_source: str | None = None
    completion_id: str | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    error: str | None = None

    def to_json(self) -> str:
        body = {"ts": _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")}
        for key, value in asdict(self).items():
            body[key] = round(value, 6) if isinstance(value, float) else value
        return json.dumps(body, separators=(",", ":"))


def emit(record: AccessRecord, logger: logging.Logger | None = None) -> None:
    """Write `record` as one JSON line (probe paths only when they did not answer 2xx)."""
    logger = logger or logging.getLogger(ACCESS_LOGGER)
    if record.path in PROBE_PATHS and record.status is not None and record.status < 400:
        return
    if logger.isEnabledFor(logging.INFO):
        logger.info(record.to_json())


def configure_access_log(destination: str) -> logging.Handler:
    """Send access records to `destination` (a file path, appended to, or `-` for stderr),
    one bare JSON object per line, and nowhere else.

    Returns:
        The handler installed (close it to release the file).
    """
    logger = logging.getLogger(ACCESS_LOGGER)
    if destination == "-":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        path = Path(destination)
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler
