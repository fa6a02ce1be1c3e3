"""Overload and client disconnects on the real server (tiny model, vLLM engine, 2 slots + 1 waiter).

- A burst of large-image requests past the queue: the refused ones get 429 + Retry-After at once
  and never decode their image (`smolora_images_decoded_total`), the waiting one decodes only
  once admitted, and `/health` keeps answering throughout (its latency is reported).
- A client leaving mid-stream, while queued or while its request is prepared: its admission
  slot is released and its engine request aborted (the engine stops producing its tokens),
  so nothing leaks.

The slots are held by requests whose image URL points at a local host that answers only when
the test releases it (`live.StallingImageHost`), so the timing does not depend on the engine.
- Request ids and the JSON-lines access log (`--access-log`) on the real engine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import RemoteServer
from tests.reliability.conftest import (
    MAX_RUNNING,
    MAX_WAITING,
    SLOW_CONTEXT,
    SLOW_TOKENS,
    start_tight_server,
)
from tests.reliability.live import (
    CHAT,
    RawRequest,
    StallingImageHost,
    big_image_url,
    held_request,
    long_stream_body,
    metric,
    wait_for,
)

DECODED = "smolora_images_decoded_total"
RUNNING = "smolora_num_requests_running"
WAITING = "smolora_num_requests_waiting"
GENERATED = "vllm:generation_tokens_total"


def _hold_slots(url: str, host: StallingImageHost, key: str, n: int) -> list[RawRequest]:
    """`n` requests admitted and stalled in their image fetch until `host.release(key)`."""
    holders = [held_request(url, host.url(key)) for _ in range(n)]
    wait_for(lambda: metric(url, RUNNING) == n, 10, "the slots to be held")
    return holders


def _idle(url: str) -> None:
    wait_for(
        lambda: metric(url, RUNNING) == 0 and metric(url, WAITING) == 0, 30, "the server to idle"
    )


def test_burst_past_the_queue_is_refused_before_decoding_and_health_answers(
    tight: RemoteServer, image_host: StallingImageHost
) -> None:
    url = tight.url
    _idle(url)
    holders = _hold_slots(url, image_host, "burst", MAX_RUNNING)
    try:
        decoded = metric(url, DECODED)
        body = {
            "model": "tiny-llava",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": big_image_url()}},
                        {"type": "text", "text": "What colour is it?"},
                    ],
                }
            ],
            "max_tokens": 2,
        }
        burst = 12
        health_ms: list[float] = []
        with ThreadPoolExecutor(burst) as pool:
            futures = [
                pool.submit(httpx.post, url + CHAT, json=body, timeout=120) for _ in range(burst)
            ]
            refused = burst - MAX_WAITING

            def refusals_in() -> bool:
                t0 = time.perf_counter()
                health = httpx.get(url + "/health", timeout=30)
                health_ms.append((time.perf_counter() - t0) * 1000)
                assert health.status_code == 200
                return sum(f.done() for f in futures) >= refused

            wait_for(refusals_in, 60, "the refusals", poll_s=0.0)
            assert metric(url, WAITING) == MAX_WAITING
            # neither the refused requests nor the one still waiting decoded their image
            assert metric(url, DECODED) == decoded
            image_host.release("burst")  # the holders finish; the waiting request is admitted
            answers = [f.result() for f in futures]
            held = [h.read_until(b"\r\n\r\n") for h in holders]
        assert all(b" 200 OK" in h.split(b"\r\n")[0] for h in held)
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200] * MAX_WAITING + [429] * refused, statuses
        for r in answers:
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "queue_full"
        # only the admitted requests decoded an image: the holders and the one that waited
        assert metric(url, DECODED) == decoded + MAX_RUNNING + MAX_WAITING
        print(
            f"/health during the burst: {len(health_ms)} probes, "
            f"max {max(health_ms):.1f} ms, median {sorted(health_ms)[len(health_ms) // 2]:.1f} ms"
        )
    finally:
        for h in holders:
            h.close()
    _idle(url)


@pytest.fixture(scope="module")
def slow_server(
    tmp_path_factory: pytest.TempPathFactory, slow_model: tuple[Path, Path]
) -> Iterator[RemoteServer]:
    """The tight limits on the slow model: a long request is still generating seconds later."""
    model, registry = slow_model
    work = tmp_path_factory.mktemp("slow-server")
    with start_tight_server(work, model, registry, max_model_len=SLOW_CONTEXT) as srv:
        yield srv


def test_a_client_leaving_mid_stream_aborts_its_engine_request(slow_server: RemoteServer) -> None:
    url = slow_server.url
    _idle(url)
    generated = metric(url, GENERATED)
    leaver = RawRequest(url, long_stream_body(SLOW_TOKENS))
    leaver.read_until(b'"delta":{"content":"')
    assert metric(url, RUNNING) == 1
    leaver.close()
    wait_for(lambda: metric(url, RUNNING) == 0, 10, "the slot to be released")
    # the engine stopped producing its tokens: the count settles well short of the request
    settled = metric(url, GENERATED)
    time.sleep(0.5)  # a request still generating would add ~40 tokens in half a second here
    assert metric(url, GENERATED) == settled
    assert settled - generated < SLOW_TOKENS
    assert metric(url, "smolora_request_finish_total", 'reason="abort"') >= 1
    ok = httpx.post(
        url + CHAT,
        json={**long_stream_body(3), "stream": False, "ignore_eos": True},
        timeout=60,
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_client_leaving_while_queued_is_withdrawn_without_decoding(
    tight: RemoteServer, image_host: StallingImageHost
) -> None:
    url = tight.url
    _idle(url)
    holders = _hold_slots(url, image_host, "queued", MAX_RUNNING)
    try:
        decoded = metric(url, DECODED)
        queued = RawRequest(url, {**long_stream_body(5, big_image_url(256)), "stream": False})
        wait_for(lambda: metric(url, WAITING) == 1, 10, "the request to queue")
        queued.close()
        wait_for(lambda: metric(url, WAITING) == 0, 10, "the waiter to be withdrawn")
        assert (
            metric(url, RUNNING) == MAX_RUNNING
        )  # the holders still run; nothing else took a slot
        assert metric(url, DECODED) == decoded
    finally:
        for h in holders:
            h.close()
    _idle(url)


def test_request_ids_and_access_log_on_the_real_engine(tight: RemoteServer) -> None:
    url = tight.url
    _idle(url)
    body = {**long_stream_body(4), "stream": False}
    r = httpx.post(url + CHAT, json=body, headers={"x-request-id": "rel-e2e-1"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "rel-e2e-1"
    bad = httpx.post(url + CHAT, json={**body, "max_tokens": 0}, timeout=60)
    assert bad.status_code == 400 and bad.headers["x-request-id"]
    log = tight.workdir / "access.jsonl"  # type: ignore[attr-defined]

    def record(rid: str) -> dict | None:
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if row["request_id"] == rid:
                return row
        return None

    wait_for(lambda: record(bad.headers["x-request-id"]) is not None, 10, "the access records")
    row = record("rel-e2e-1")
    assert row is not None
    usage = r.json()["usage"]
    assert row["status"] == 200 and row["model"] == "tiny-llava@1" and row["version"] == 1
    assert row["prompt_tokens"] == usage["prompt_tokens"]
    assert row["completion_tokens"] == usage["completion_tokens"] == 4
    assert 0 < row["ttft_s"] <= row["e2e_s"]
    assert record(bad.headers["x-request-id"])["status"] == 400
