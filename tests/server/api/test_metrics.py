"""Metrics exposition: names, types, bounded labels, values after real requests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from smolora.server.engine.protocol import LayerRoute
from smolora.server.metrics import Metrics
from tests.server.api.helpers import data_url, image_bytes, user_message

AUTH = {"Authorization": "Bearer sk-test"}


def _families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_each_metrics_instance_owns_its_registry() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request(200)
    fams_b = _families(b.render().decode())
    assert all(
        s.value == 0 for s in fams_b["smolora_requests"].samples if s.name.endswith("_total")
    )


def test_exposition_names_and_types() -> None:
    m = Metrics()
    m.observe_routes([LayerRoute("layers.0.mlp.up_proj", 1, 5, 0.4, 0.6)])
    m.observe_checkpoint_load(0.25, ok=True)
    m.set_versions(3, 2)
    fams = _families(m.render().decode())
    expected = {
        "smolora_time_to_first_token_seconds": "histogram",
        "smolora_inter_token_latency_seconds": "histogram",
        "smolora_e2e_request_latency_seconds": "histogram",
        "smolora_request_queue_time_seconds": "histogram",
        "smolora_requests": "counter",
        "smolora_prompt_tokens": "counter",
        "smolora_generation_tokens": "counter",
        "smolora_num_requests_running": "gauge",
        "smolora_num_requests_waiting": "gauge",
        "smolora_checkpoint_load_duration_seconds": "histogram",
        "smolora_checkpoint_active_version": "gauge",
        "smolora_expert_selections": "counter",
    }
    for name, kind in expected.items():
        assert fams[name].type == kind, name
    sel = {
        (s.labels["layer"], s.labels["kind"], s.labels["expert"]): s.value
        for s in fams["smolora_expert_selections"].samples
        if s.name.endswith("_total")
    }
    assert sel == {
        ("layers.0.mlp.up_proj", "vu", "1"): 1.0,
        ("layers.0.mlp.up_proj", "if", "5"): 1.0,
    }
    assert fams["smolora_checkpoint_active_version"].samples[0].value == 3


def test_metrics_after_requests(served) -> None:
    client, engine, _ = served
    before = _families(client.get("/metrics").text)
    gen_before = next(
        s.value for s in before["smolora_generation_tokens"].samples if s.name.endswith("_total")
    )
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
    client.post(
        "/v1/chat/completions", headers=AUTH, json={"model": "nope", "messages": [user_message()]}
    )
    resp = client.get("/metrics")
    assert resp.headers["content-type"].startswith("text/plain")
    fams = _families(resp.text)
    status = {
        s.labels["status"]: s.value
        for s in fams["smolora_requests"].samples
        if s.name.endswith("_total")
    }
    assert status.get("200", 0) >= 1 and status.get("404", 0) >= 1
    gen = next(
        s.value for s in fams["smolora_generation_tokens"].samples if s.name.endswith("_total")
    )
    assert gen - gen_before == 3
    ttft = next(
        s for s in fams["smolora_time_to_first_token_seconds"].samples if s.name.endswith("_count")
    )
    assert ttft.value >= 1
    kinds = {s.labels["kind"] for s in fams["smolora_expert_selections"].samples}
    assert kinds == {"vu", "if"}  # counted although the request did not ask for a trace
    assert fams["smolora_checkpoint_active_version"].samples[0].value == 2
    assert {s.labels.get("status") for s in fams["smolora_requests"].samples} <= {
        "200",
        "400",
        "401",
        "404",
        "413",
        "422",
        "429",
        "503",
        None,
    }
