"""The promotion policy on the real server (`serve` with `--promote-*` and `--canary-*`,
the real vLLM engine, the tiny model) keeping one resident version: a published version
whose manifest scores forget a task is refused and never serves; the next one, in the
engine's staging slot, serves a canary share of the requests that name no version beside
the active one, is promoted once the canary has held up, and the old version is unloaded.
Restarted, the server serves the promoted version again and refuses the forgetful version
published while it was down (without its serving state it would start on that latest one)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY, RemoteServer, publish_smolora
from tests.server.api.helpers import user_message, wait_until

pytestmark = pytest.mark.e2e

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _decision(url: str, version: int) -> str | None:
    decisions = httpx.get(url + "/admin/checkpoints", headers=ADMIN).json()["promotion"]
    return next(
        (d["decision"] for d in reversed(decisions["decisions"]) if d["version"] == version), None
    )


def test_floors_refuse_a_forgetful_version_and_a_canary_promotes_the_next(
    tmp_path: Path, tiny_model_dir: Path, instruction_encoder: Any
) -> None:
    registry = tmp_path / "registry"
    publish_smolora(registry, tiny_model_dir, instruction_encoder, "vqa", 1, {"vqa": 60.0})
    extra = [
        "--promote-max-task-drop",
        "5",
        "--promote-require-eval",
        "--canary-share",
        "0.5",
        "--canary-requests",
        "6",
        "--canary-max-latency-ratio",
        "10",  # a loaded 2-core machine's noise must not roll the canary back
        "--max-resident-versions",
        "1",
        "--engine-option",
        f"kv_cache_bytes={64 * 1024 * 1024}",
    ]
    with RemoteServer(tmp_path, tiny_model_dir, registry, extra) as srv:
        publish_smolora(registry, tiny_model_dir, instruction_encoder, "gqa", 2, {"vqa": 40.0})
        wait_until(lambda: _decision(srv.url, 2) == "rejected", 120, "v2 to be refused")
        ids = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
        assert ids == ["tiny-llava", "tiny-llava@1"]  # refused and unloaded: it never serves

        publish_smolora(
            registry, tiny_model_dir, instruction_encoder, "gqa", 3, {"vqa": 59.0, "gqa": 50.0}
        )
        wait_until(lambda: _decision(srv.url, 3) == "canary", 120, "v3's canary")
        served: Counter[str] = Counter()
        body = {"model": "tiny-llava", "messages": [user_message("What is it?")], "max_tokens": 3}
        while _decision(srv.url, 3) == "canary":
            r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            served[r.json()["model"]] += 1
            assert sum(served.values()) < 300, served
        assert _decision(srv.url, 3) == "promoted", srv.log_tail()
        assert served["tiny-llava@3"] >= 6, served  # the canary's share, beside v1's
        ready = httpx.get(srv.url + "/ready").json()
        assert ready["active_version"] == 3
        wait_until(  # the swap's old version leaves the staging arrangement
            lambda: len(httpx.get(srv.url + "/v1/models").json()["data"]) == 2,
            60,
            "version 1 to be unloaded",
        )
        cards = {c["id"]: c for c in httpx.get(srv.url + "/v1/models").json()["data"]}
        assert set(cards) == {"tiny-llava", "tiny-llava@3"}
        assert cards["tiny-llava@3"]["smolora"]["promotion"]["decision"] == "promoted"
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'smolora_promotion_decisions_total{decision="rejected"} 1.0' in metrics
        assert 'smolora_canary_requests_total{arm="canary",result="ok"} 6.0' in metrics

    publish_smolora(registry, tiny_model_dir, instruction_encoder, "ocr", 4, {"vqa": 30.0})
    (tmp_path / "restarted").mkdir()
    with RemoteServer(tmp_path / "restarted", tiny_model_dir, registry, extra) as srv:
        assert httpx.get(srv.url + "/ready").json()["active_version"] == 3  # not the latest, 4
        wait_until(lambda: _decision(srv.url, 4) == "rejected", 120, "v4 to be refused")
        assert httpx.get(srv.url + "/ready").json()["active_version"] == 3
