"""The HTTP layer under overload, shutdown and faults, on a real uvicorn server with the scripted
engine double (the engine itself is not under test here; tests/reliability runs the same paths on
the real engine): admission before any image is decoded, the text cap, request ids, access
records, rate limits, the drain sequence, and 500s that carry no exception text."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from smolora.server.api.access_log import ACCESS_LOGGER
from smolora.server.api.drain import drain
from smolora.server.api.rate_limit import RateLimiter
from smolora.server.app import create_app
from smolora.server.settings import ServerSettings
from tests.server.api.helpers import (
    HashingEmbedder,
    ServerThread,
    data_url,
    image_bytes,
    user_message,
    wait_until,
)
from tests.server.api.scripted_engine import ScriptedEngine, scripted_factory

CHAT = "/v1/chat/completions"


@contextmanager
def live_server(
    model_dir: Path, registry: Path, engine: ScriptedEngine, **overrides: Any
) -> Iterator[ServerThread]:
    settings = ServerSettings(
        model_dir=model_dir,
        registry_dir=registry,
        served_model_name="tiny-llava",
        watch_registry=False,
        **overrides,
    )
    app = create_app(settings, scripted_factory(engine), embedder_factory=HashingEmbedder)
    with ServerThread(app) as srv:
        srv.wait_ready()
        srv.app = app  # type: ignore[attr-defined]
        yield srv


def _state(srv: ServerThread) -> Any:
    return srv.app.state.smolora  # type: ignore[attr-defined]


def _body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "tiny-llava", "messages": [user_message()], "max_tokens": 3}
    body.update(over)
    return body


def test_refused_requests_never_decode_their_images(tiny_model_dir: Path, registry: Path) -> None:
    engine = ScriptedEngine()
    big = data_url(image_bytes("PNG", (1024, 1024)))
    with live_server(
        tiny_model_dir, registry, engine, max_concurrent_requests=1, max_waiting_requests=1
    ) as srv:
        state = _state(srv)
        engine.hold()
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            with c.stream("POST", CHAT, json=_body(stream=True)) as held:
                assert held.status_code == 200
                wait_until(lambda: engine.in_flight == 1, what="the first request to run")
                decoded = state.images.decoded

                body = _body(messages=[user_message("what is it?", [big])])
                with ThreadPoolExecutor(8) as pool:
                    futures = [
                        pool.submit(httpx.post, srv.base_url + CHAT, json=body, timeout=30)
                        for _ in range(8)
                    ]
                    # one waits in the queue (no image decoded yet), seven are refused at once
                    wait_until(
                        lambda: (
                            sum(f.done() for f in futures) == 7 and state.admission.waiting == 1
                        ),
                        what="seven refusals and one waiter",
                    )
                    assert state.images.decoded == decoded
                    engine.release()
                    answers = [f.result() for f in futures]
        statuses = sorted(r.status_code for r in answers)
        refused = [r for r in answers if r.status_code == 429]
        assert statuses == [200] + [429] * 7, statuses
        assert all(r.headers["retry-after"] == "1" for r in refused)
        assert all(r.json()["error"]["code"] == "queue_full" for r in refused)
        # only the admitted requests decoded an image
        assert state.images.decoded - decoded == statuses.count(200)


def test_text_over_the_cap_is_refused_before_tokenizing(
    tiny_model_dir: Path, registry: Path
) -> None:
    engine = ScriptedEngine()
    with live_server(tiny_model_dir, registry, engine, max_prompt_chars=100) as srv:
        renderer = _state(srv).renderer
        calls: list[int] = []
        original = renderer.count_tokens
        renderer.count_tokens = lambda prompt, n: calls.append(1) or original(prompt, n)
        ok = httpx.post(
            srv.base_url + CHAT, json=_body(messages=[user_message("what is it? " * 8)])
        )
        assert ok.status_code == 200 and calls == [1]
        long = "word " * 400_000  # 2 MB of text
        r = httpx.post(srv.base_url + CHAT, json=_body(messages=[user_message(long)]), timeout=30)
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "text_too_long"
        assert "at most 100 " in err["message"] and err["param"] == "messages"
        assert calls == [1]  # never tokenized
        two = [
            {"role": "system", "content": "y" * 60},
            user_message("z" * 60),
        ]  # the cap counts every message
        assert httpx.post(srv.base_url + CHAT, json=_body(messages=two)).status_code == 400


def test_request_ids_on_every_response(tiny_model_dir: Path, registry: Path) -> None:
    engine = ScriptedEngine()
    with live_server(tiny_model_dir, registry, engine, max_request_bytes=10_000) as srv:
        url = srv.base_url
        mine = httpx.post(url + CHAT, json=_body(), headers={"x-request-id": "client-id_1.2:3"})
        assert mine.status_code == 200 and mine.headers["x-request-id"] == "client-id_1.2:3"
        for bad in ("has space", "x" * 129, "semi;colon"):
            r = httpx.post(url + CHAT, json=_body(), headers={"x-request-id": bad})
            assert r.headers["x-request-id"] != bad and len(r.headers["x-request-id"]) == 32
        seen = {
            httpx.get(url + "/health").headers["x-request-id"],
            httpx.get(url + "/nope").headers["x-request-id"],  # 404
            httpx.post(url + CHAT, json={"model": 1}).headers["x-request-id"],  # 400
            httpx.post(url + CHAT, content=b"x" * 20_000).headers["x-request-id"],  # 413
        }
        assert len(seen) == 4 and all(seen)
        with httpx.stream("POST", url + CHAT, json=_body(stream=True)) as s:
            assert s.headers["x-request-id"]


def test_a_500_carries_no_exception_text_and_cites_the_request_id(
    tiny_model_dir: Path, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ScriptedEngine()
    secret = "secret-internal-detail /srv/private/path"
    with live_server(tiny_model_dir, registry, engine) as srv:
        caplog.set_level(logging.ERROR, logger="smolora.server.api")
        for stream in (False, True):
            engine.fail_next = RuntimeError(secret)
            r = httpx.post(
                srv.base_url + CHAT,
                json=_body(stream=stream),
                headers={"x-request-id": f"r{stream}"},
            )
            text = r.text
            assert secret not in text
            if stream:  # the stream had started: an in-band error event, then [DONE]
                events = [json.loads(x[6:]) for x in text.split("\n\n") if x[6:7] == "{"]
                err = events[-1]["error"]
                assert text.rstrip().endswith("data: [DONE]")
            else:
                assert r.status_code == 500
                err = r.json()["error"]
            assert err["code"] == "internal_error" and f"r{stream}" in err["message"]
        # ... and the exception went to the log under the request id
        logged = [rec for rec in caplog.records if rec.exc_info and "rFalse" in rec.getMessage()]
        assert logged and secret in str(logged[0].exc_info[1])


def test_access_log_records_version_status_tokens_and_latencies(
    tiny_model_dir: Path, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ScriptedEngine()
    with live_server(tiny_model_dir, registry, engine) as srv:
        caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
        r = httpx.post(srv.base_url + CHAT, json=_body(), headers={"x-request-id": "acc-1"})
        bad = httpx.post(srv.base_url + CHAT, json=_body(n=0), headers={"x-request-id": "acc-2"})
        with httpx.stream(
            "POST", srv.base_url + CHAT, json=_body(stream=True), headers={"x-request-id": "acc-3"}
        ) as s:
            list(s.iter_lines())
        httpx.get(srv.base_url + "/health")  # probes that answer 200 are not logged
        wait_until(
            lambda: sum('"acc-' in rec.getMessage() for rec in caplog.records) == 3,
            what="three access records",
        )
    records = {
        (row := json.loads(rec.getMessage()))["request_id"]: row
        for rec in caplog.records
        if rec.name == ACCESS_LOGGER
    }
    assert not any(row["path"] == "/health" for row in records.values())
    ok, refused, streamed = records["acc-1"], records["acc-2"], records["acc-3"]
    usage = r.json()["usage"]
    assert ok["status"] == 200 and ok["model"] == "tiny-llava@2" and ok["version"] == 2
    assert ok["prompt_tokens"] == usage["prompt_tokens"]
    assert ok["completion_tokens"] == usage["completion_tokens"] == 3
    assert ok["completion_id"] == r.json()["id"] and ok["stream"] is False
    assert 0 < ok["ttft_s"] <= ok["e2e_s"]
    assert refused["status"] == bad.status_code == 400 and refused["completion_tokens"] is None
    assert streamed["status"] == 200 and streamed["stream"] is True
    assert streamed["completion_tokens"] == 3 and streamed["ttft_s"] > 0


def test_rate_limits_per_key_answer_429_with_retry_after(
    tiny_model_dir: Path, registry: Path
) -> None:
    engine = ScriptedEngine()
    with live_server(
        tiny_model_dir,
        registry,
        engine,
        api_keys=("key-a", "key-b"),
        rate_limit_requests_per_min=2,
    ) as srv:
        a = {"Authorization": "Bearer key-a"}
        b = {"Authorization": "Bearer key-b"}
        assert httpx.post(srv.base_url + CHAT, json=_body(), headers=a).status_code == 200
        assert httpx.post(srv.base_url + CHAT, json=_body(), headers=a).status_code == 200
        r = httpx.post(srv.base_url + CHAT, json=_body(), headers=a)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["retry-after"]) <= 30  # one request back after 30 s
        assert httpx.post(srv.base_url + CHAT, json=_body(), headers=b).status_code == 200
    with live_server(
        tiny_model_dir, registry, engine, api_keys=("key-a",), rate_limit_tokens_per_min=10
    ) as srv:
        a = {"Authorization": "Bearer key-a"}
        first = httpx.post(srv.base_url + CHAT, json=_body(max_tokens=5), headers=a)
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] > 10
        r = httpx.post(srv.base_url + CHAT, json=_body(), headers=a)
        assert r.status_code == 429 and r.json()["error"]["param"] == "tokens_per_minute"
        debt = first.json()["usage"]["total_tokens"] - 10
        assert int(r.headers["retry-after"]) >= debt * 6  # 10 tokens/min: 6 s per token owed


def test_token_bucket_refills_with_time() -> None:
    now = [0.0]
    limiter = RateLimiter(requests_per_min=60, tokens_per_min=600, clock=lambda: now[0])
    key = RateLimiter.client_key("sk-secret-key", None)
    assert "secret" not in key  # stored hashed
    for _ in range(60):
        limiter.check(key)
    with pytest.raises(Exception) as e:
        limiter.check(key)
    assert e.value.headers["Retry-After"] == "1"  # type: ignore[attr-defined]
    now[0] += 1.0  # one request per second comes back
    limiter.check(key)
    limiter.charge_tokens(key, 1200)  # 600 in debt
    now[0] += 30.0  # +300: still 300 in debt
    with pytest.raises(Exception) as e:
        limiter.check(key)
    assert e.value.headers["Retry-After"] == "31"  # type: ignore[attr-defined]
    now[0] += 31.0
    limiter.check(key)


def test_drain_refuses_new_work_finishes_short_requests_and_ends_long_streams(
    tiny_model_dir: Path, registry: Path
) -> None:
    engine = ScriptedEngine()
    with live_server(tiny_model_dir, registry, engine, max_concurrent_requests=4) as srv:
        state = _state(srv)
        engine.hold()
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            with c.stream("POST", CHAT, json=_body(stream=True, max_tokens=5)) as long:
                wait_until(lambda: engine.in_flight == 1, what="the stream to run")
                assert srv.loop is not None
                done = asyncio.run_coroutine_threadsafe(drain(state, grace_s=0.5), srv.loop)
                wait_until(lambda: state.drain.draining, what="draining")
                ready = c.get("/ready")
                assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
                refused = c.post(CHAT, json=_body())
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "shutting_down"
                text = "".join(f"{line}\n" for line in long.iter_lines())
                done.result(timeout=10)
        events = [json.loads(x[6:]) for x in text.split("\n") if x.startswith("data: {")]
        assert events[-1]["error"]["code"] == "shutting_down"
        assert text.rstrip().endswith("data: [DONE]")
        assert engine.in_flight == 0 and engine.aborted  # the engine request was aborted
        assert state.admission.running == 0
        engine.release()
