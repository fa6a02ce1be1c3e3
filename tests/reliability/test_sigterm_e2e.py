"""SIGTERM on the real server (`python -m smolora.server serve`, the slow tiny model with a
2048-token context, 10 s grace): `/ready` turns 503 at once, new chat requests get 503
`shutting_down` with `Retry-After`, a request in flight finishes normally within the grace
period, a stream still generating when the grace period ends gets a final error event and
`[DONE]`, a request still being prepared then gets a 503, and the process exits with status 0."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import SLOW_CONTEXT, SLOW_TOKENS, start_tight_server
from tests.reliability.live import (
    CHAT,
    RawRequest,
    StallingImageHost,
    held_request,
    long_stream_body,
    metric,
    sse_events,
    wait_for,
)

#: Long enough for the short request on a busy 2-core machine, far shorter than the long one.
GRACE_S = 10.0


def _status(raw: bytes) -> bytes:
    return raw.split(b"\r\n", 1)[0]


def test_sigterm_drains_then_exits(
    tmp_path_factory: pytest.TempPathFactory,
    slow_model: tuple[Path, Path],
    image_host: StallingImageHost,
) -> None:
    model, registry = slow_model
    work = tmp_path_factory.mktemp("sigterm-server")
    with start_tight_server(
        work, model, registry, GRACE_S, max_model_len=SLOW_CONTEXT, max_running=3
    ) as srv:
        url = srv.url
        # warm the image path too (fetch, decode, vision tower): the short request below must
        # finish within the grace period once its image arrives
        image_host.release("sigterm-warm")
        warm_body = long_stream_body(4, image_host.url("sigterm-warm"))
        warm = httpx.post(url + CHAT, json={**warm_body, "stream": False}, timeout=120)
        assert warm.status_code == 200, warm.text
        long = RawRequest(url, long_stream_body(SLOW_TOKENS))
        long.read_until(b'"delta":{"content":"')
        short = held_request(url, image_host.url("sigterm-short"))
        stuck = held_request(url, image_host.url("sigterm-stuck"), stream=True)
        wait_for(lambda: metric(url, "smolora_num_requests_running") == 3, 30, "three in flight")

        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # the short request's image arrives at once: the whole grace period is its margin
        image_host.release("sigterm-short")
        wait_for(lambda: httpx.get(url + "/ready").status_code == 503, 5, "/ready to turn 503")
        ready = httpx.get(url + "/ready")
        assert ready.headers["retry-after"] == "1" and "shutting down" in ready.json()["reason"]
        refused = httpx.post(url + CHAT, json={**long_stream_body(2), "stream": False})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "shutting_down"

        answer = short.read_response()  # in flight: it finishes within the grace period
        took = time.monotonic() - signalled
        assert b" 200 OK" in _status(answer) and b'"finish_reason":"length"' in answer, (
            f"{took:.1f}s after SIGTERM: {answer[-300:]!r}\n{srv.log_tail(4000)}"
        )

        # the grace period ends: the stream still generating gets an error event, then [DONE]
        events = sse_events(long.read_until(b"data: [DONE]", timeout_s=60))
        assert events[-1]["error"]["code"] == "shutting_down"
        generated = [c for e in events[:-1] for c in e.get("choices", [])]
        assert generated and not any(c.get("finish_reason") for c in generated)
        # ... and the request still waiting for its image gets a 503 (its response had not begun)
        ended = stuck.read_response(timeout_s=30)
        assert b" 503 " in _status(ended) and b'"code":"shutting_down"' in ended
        image_host.release("sigterm-stuck")
        for r in (long, short, stuck):
            r.close()
        assert srv.proc.wait(timeout=90) == 0, srv.log_tail()
        log = srv.log_tail(50_000)
        assert "draining" in log and "ending 1 request(s) still running" in log
