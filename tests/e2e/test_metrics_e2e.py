"""`/metrics` of the real server (subprocess, real vLLM engine) after real requests: vLLM's
own `vllm:*` engine families beside our `smolora_*` ones, with values that agree with each
other and with what was sent; the scrape passes `promtool check metrics`; the Grafana
dashboard and the alert rules use only names the live scrape has. Both the SMoLoRA server
and the `--no-adapters` one (the e2e fixtures' servers; no extra engines)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import RemoteServer
from tests.promtool import promtool_path
from tests.server.api.helpers import data_url, image_bytes, user_message

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
IMG = data_url(image_bytes("PNG", (32, 32), (40, 200, 40)))
#: promtool's lints of vLLM's own family names, which we expose unchanged because vLLM's
#: dashboards query them: every `vllm:*` name (promtool reserves ':' for recording rules), and
#: the histogram `vllm:iteration_tokens_total`. Any other lint fails the test.
COLON_LINT = "metric names should not contain ':'"
VLLM_NAME_LINTS = {
    'vllm:iteration_tokens_total non-counter metrics should not have "_total" suffix'
}


def _scrape(remote: RemoteServer) -> str:
    resp = httpx.get(remote.url + "/metrics", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return resp.text


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _sum(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


def _check_with_promtool(text: str) -> None:
    """`promtool check metrics` on a scrape: it parses, our families draw no lint at all, and
    vLLM's only the known lints of vLLM's own names (`VLLM_NAME_LINTS`, the ':')."""
    proc = subprocess.run(
        [promtool_path(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode in (0, 3), (
        proc.returncode,
        problems,
    )  # 1 = the exposition did not parse
    other = [
        p
        for p in problems
        if not (p.startswith("vllm:") and p.endswith(COLON_LINT)) and p not in VLLM_NAME_LINTS
    ]
    assert not other, other


def _send(remote: RemoteServer, n: int) -> list[Any]:
    client = openai.OpenAI(
        base_url=remote.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )
    return [
        client.chat.completions.create(
            model="tiny-llava",
            temperature=0.0,
            max_tokens=4 + i,
            messages=[user_message(f"Describe the image, part {i}.", [IMG])],
        )
        for i in range(n)
    ]


def _check_live_scrape(remote: RemoteServer) -> str:
    before = _samples(_scrape(remote))
    responses = _send(remote, 3)
    text = _scrape(remote)
    after = _samples(text)

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(families) == len(set(families)), "a family is exposed twice"
    assert any(f.startswith("smolora_") for f in families) and any(
        f.startswith("vllm:") for f in families
    )
    completion = sum(r.usage.completion_tokens for r in responses)
    prompt = sum(r.usage.prompt_tokens for r in responses)
    # vLLM's counts and ours of the same three requests agree with each other and with the
    # responses.
    assert delta("vllm:request_success_total") == 3
    assert delta("smolora_requests_total", status="200") == 3
    assert (
        delta("vllm:generation_tokens_total")
        == delta("smolora_generation_tokens_total")
        == completion
    )
    assert delta("vllm:prompt_tokens_total") == delta("smolora_prompt_tokens_total") == prompt
    assert (
        delta("vllm:time_to_first_token_seconds_count")
        == delta("smolora_time_to_first_token_seconds_count")
        == 3
    )
    assert delta("vllm:e2e_request_latency_seconds_count") == 3
    assert delta("vllm:iteration_tokens_total_sum") >= prompt
    assert 0.0 <= _sum(after, "vllm:kv_cache_usage_perc") <= 1.0
    assert (
        _sum(after, "vllm:num_requests_running") == 0
        and _sum(after, "vllm:num_requests_waiting") == 0
    )
    vllm_models = {
        dict(ls).get("model_name")
        for (n, ls) in after
        if n.startswith("vllm:") and "model_name" in dict(ls)
    }
    assert vllm_models == {
        "tiny-llava"
    }  # the served name, as `vllm serve --served-model-name` labels it
    _check_with_promtool(text)
    return text


def test_live_scrape_has_vllm_and_smolora_families(remote: RemoteServer) -> None:
    text = _check_live_scrape(remote)
    assert _sum(_samples(text), "smolora_checkpoint_active_version") >= 1


def test_live_scrape_without_adapters(remote_base: RemoteServer) -> None:
    text = _check_live_scrape(remote_base)
    assert "smolora_checkpoint_active_version 0.0" in text


def test_dashboard_and_alerts_use_only_live_names(remote: RemoteServer) -> None:
    """Every `vllm:*` name the dashboard and alert rules query is in the live scrape (vLLM
    creates its label sets per engine up front; the `smolora_*` names are checked offline by
    tests/server/api/test_deploy_files.py, including labelled families not used yet here)."""
    _send(remote, 1)
    exposed = {name for name, _ in _samples(_scrape(remote))}
    dash = json.loads((ROOT / "deploy/grafana/smolora-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += re.findall(r"expr: (.+)", (ROOT / "deploy/alerts.yml").read_text())
    used = {n for e in exprs for n in re.findall(r"vllm:[a-z0-9_:]+", e)}
    assert {
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
    } <= used
    assert used <= exposed, sorted(used - exposed)
