"""Table-driven bad input: each case gets a clear OpenAI-style 4xx, and the server keeps serving.

Every case of the table in `smolora.clients.bad_requests` posts one malformed request to
a shared app (engine held by `ScriptedEngine`, so this exercises the HTTP layer only),
checks the status, the error type and, where it matters, the code and the field named,
then checks that a normal request still succeeds.
"""

from __future__ import annotations

import pytest

from smolora.clients.bad_requests import AUTH, CASES, ok_body, post_case


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_4xx_and_serving_goes_on(served, case) -> None:
    name, req, status, etype, code, param = case
    client, _, _ = served
    r = post_case(client, req)
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

    with running_app(
        tiny_model_dir, registry, max_concurrent_requests=1, max_waiting_requests=0
    ) as (client, engine, _):
        engine.hold()
        import threading

        results: list[int] = []
        t = threading.Thread(
            target=lambda: results.append(
                client.post("/v1/chat/completions", json=ok_body()).status_code
            )
        )
        t.start()
        wait_until(lambda: engine.in_flight == 1, what="the first request to be in flight")
        r = client.post("/v1/chat/completions", json=ok_body())
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        engine.release()
        t.join(timeout=30)
        assert results == [200]
        assert client.post("/v1/chat/completions", json=ok_body()).status_code == 200
