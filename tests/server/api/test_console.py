"""The console's router and JSON views on the scripted engine (the browser tests are in
tests/e2e/test_console.py): the page and its assets under a self-only CSP with nothing fetched
from elsewhere, the keys its JSON views need, percentiles as PromQL's `histogram_quantile`
computes them, counters and expert usage equal to what the Prometheus exposition says, and
each version's manifest `eval` without file-system paths."""

from __future__ import annotations

import math
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from smolora.adapters.checkpoint import CheckpointManifest, publish_checkpoint
from smolora.server.api.console.router import ASSETS
from smolora.server.api.console.summary import histogram_quantile, metrics_summary
from smolora.server.engine.protocol import LayerRoute
from smolora.server.metrics import Metrics
from tests.server.api.conftest import running_app
from tests.server.api.helpers import (
    HashingEmbedder,
    data_url,
    image_bytes,
    instruction_types,
    user_message,
)

AUTH = {"Authorization": "Bearer sk-test"}
INF = math.inf


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    # 10 observations in (0.1, 0.2], 10 in (0.2, 0.4]: rank 10 (p50) is the top of the first.
    buckets = [(0.1, 0.0), (0.2, 10.0), (0.4, 20.0), (INF, 20.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.2)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.9, [(0.1, 1.0), (INF, 10.0)]) == 0.1  # +Inf: the last bound
    assert histogram_quantile(0.5, [(0.1, 0.0), (INF, 0.0)]) is None
    assert histogram_quantile(0.5, [(0.5, 4.0), (INF, 4.0)]) == pytest.approx(0.25)


def test_metrics_summary_equals_the_registry() -> None:
    m = Metrics()
    for s in (0.03, 0.03, 0.07, 0.3):
        m.time_to_first_token.observe(s)
    m.observe_tokens(40, 7)
    m.observe_request(200)
    m.observe_request(400)
    m.observe_routes([LayerRoute("layers.0.mlp.up_proj", 1, 5, 0.4, 0.6)] * 3)
    m.observe_routes([LayerRoute("layers.0.mlp.up_proj", 0, 5, 0.4, 0.6)])
    m.observe_checkpoint_load(0.2, ok=True)
    m.set_versions(2, 1)
    out = metrics_summary(m.registry)
    ttft = out["latency"]["ttft"]
    assert ttft["count"] == 4 and ttft["sum"] == pytest.approx(0.43)
    # buckets (.025, .05]: 2, (.05, .1]: 1, (.25, .5]: 1 -> p50 = rank 2 = top of (.025, .05]
    assert ttft["p50"] == pytest.approx(0.05)
    assert ttft["p99"] == pytest.approx(0.25 + 0.25 * (3.96 - 3))
    assert out["latency"]["itl"]["p50"] is None and out["latency"]["itl"]["count"] == 0
    assert out["tokens"] == {"prompt": 40, "generation": 7}
    assert out["requests"] == {"total": 2, "by_status": {"200": 1, "400": 1}}
    assert out["expert_usage"] == [
        {"layer": "layers.0.mlp.up_proj", "vu": {"1": 3, "0": 1}, "if": {"5": 4}}
    ]
    assert out["checkpoint_loads"] == {"ok": 1, "error": 0}
    assert (out["active_version"], out["resident_versions"]) == (2, 1)


def test_page_and_assets_are_served_without_keys_and_fetch_nothing_elsewhere(served) -> None:
    client, _, _ = served
    page = client.get("/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    for name, media in ASSETS.items():
        r = client.get(f"/console/assets/{name}")
        assert r.status_code == 200 and r.headers["content-type"] == media
        # No absolute URL anywhere (the SVG namespace name is an identifier, not a fetch).
        text = r.text.replace("http://www.w3.org/2000/svg", "")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text), name
        assert "localStorage" not in text and "sessionStorage" not in text
    for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert ref.startswith("console/assets/") and ref.split("/")[-1] in ASSETS
    assert client.get("/console/assets/..%2Fcli.py").status_code == 404
    r = client.get("/console/assets/__init__.py")  # in the package folder, but not an asset
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/console/", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "../console"
    shipped = {p.name for p in resources.files("smolora.server.console").iterdir()}
    assert set(ASSETS) <= shipped


def test_json_views_need_the_api_key_and_match_the_exposition(served) -> None:
    client, _, _ = served
    for path in ("/console/api/metrics", "/console/api/versions"):
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.post(
        "/v1/chat/completions",
        headers=AUTH,
        json={
            "model": "tiny-llava",
            "messages": [user_message("Describe it.", [data_url(image_bytes())])],
            "max_tokens": 3,
        },
    )
    assert r.status_code == 200
    out = client.get("/console/api/metrics", headers=AUTH).json()
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    gen = next(s.value for s in families["smolora_generation_tokens"].samples)
    assert out["tokens"]["generation"] == gen >= 3
    selections = {
        (s.labels["layer"], s.labels["kind"], s.labels["expert"]): s.value
        for s in families["smolora_expert_selections"].samples
        if s.name.endswith("_total")
    }
    flat = {
        (u["layer"], kind, e): n
        for u in out["expert_usage"]
        for kind in ("vu", "if")
        for e, n in u[kind].items()
    }
    assert flat == selections and flat
    assert out["latency"]["ttft"]["count"] >= 1 and out["latency"]["ttft"]["p50"] > 0
    assert out["active_version"] == 2 and out["time"] > 0


def test_versions_view_carries_manifest_eval_and_no_paths(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    reg = tmp_path / "reg"
    emb = HashingEmbedder()
    row = {"vqa": {"metric": "accuracy", "score": 61.5, "format_rate": 98.0, "n": 40}}
    manifest = CheckpointManifest(
        adapter_kind="smolora",
        adapter_config={"num_experts": 8, "rank": 8, "alpha": 16},
        base_model={"fingerprint": "f" * 64, "name": "tiny"},
        layers=["layers.0.mlp.up_proj"],
        tasks=["vqa"],
        instruction_types=instruction_types(emb),
        eval={"row": row},
    )
    publish_checkpoint(reg, {"layers.0.mlp.up_proj.A": torch.zeros(8, 4)}, manifest)
    with running_app(tiny_model_dir, reg, api_keys=("sk-test",)) as (client, _, _):
        out = client.get("/console/api/versions", headers=AUTH).json()
    assert (out["adapters"], out["active"], out["latest"]) == (True, 1, 1)
    (v,) = out["versions"]
    assert v["eval"] == {"row": row} and v["num_experts"] == 8 and v["tasks"] == ["vqa"]
    assert v["active"] and v["resident"] and v["created_at"]
    assert str(tmp_path) not in str(out) and "path" not in v and "registry" not in out


def test_base_only_server_has_the_console_without_versions(tiny_model_dir: Path) -> None:
    with running_app(tiny_model_dir, None, adapters=False) as (client, _, _):
        assert client.get("/console").status_code == 200
        out = client.get("/console/api/versions").json()
        assert out == {
            "adapters": False,
            "active": None,
            "latest": None,
            "history": [],
            "versions": [],
        }
        assert client.get("/console/api/metrics").json()["active_version"] is None
