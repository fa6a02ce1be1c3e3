"""schemathesis against the real server's OpenAPI schema (chat, models, checkpoint admin with the
admin key, health, console), positive and negative cases, bounded: no 5xx, no hang, and the
server still serves a normal request afterwards."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import ADMIN_KEY, RemoteServer
from tests.reliability.api_fuzz import fuzz_openapi
from tests.reliability.live import CHAT, long_stream_body

MAX_EXAMPLES = 20  # per operation and mode: ~560 cases, about a minute on 2 cores


def test_schema_fuzz_finds_no_server_error(tight: RemoteServer) -> None:
    report = fuzz_openapi(
        tight.url, MAX_EXAMPLES, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout_s=60
    )
    print(f"schemathesis: {report.cases} cases, {report.server_errors} server errors")
    assert report.cases >= 10 * len(report.by_operation)
    assert "POST /v1/chat/completions" in report.by_operation
    assert "POST /admin/checkpoints/load" in report.by_operation
    assert report.server_errors == 0, report.failures[:10]
    assert httpx.get(tight.url + "/health").status_code == 200
    ok = httpx.post(tight.url + CHAT, json={**long_stream_body(3), "stream": False}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
