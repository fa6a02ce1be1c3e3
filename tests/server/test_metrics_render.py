"""`Metrics.render` with an engine registry: the app's families, then the engine's, each family
once; the exposition parses and passes `promtool check metrics`."""

from __future__ import annotations

import subprocess

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from smolora.server.metrics import Metrics
from tests.promtool import promtool_path


def _engine_registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    Gauge("engine_kv_cache_usage_ratio", "KV-cache usage.", ["model_name"], registry=reg).labels(
        "m"
    ).set(0.25)
    Counter("engine_preemptions", "Preemptions.", ["model_name"], registry=reg).labels("m").inc(3)
    # A family the app's registry already has: rendered once, the app's.
    Counter("smolora_prompt_tokens", "An engine-side duplicate.", registry=reg).inc(99)
    return reg


def test_render_joins_the_engine_registry_without_duplicates() -> None:
    metrics = Metrics()
    metrics.observe_tokens(prompt_tokens=7, generated_tokens=2)
    text = metrics.render(_engine_registry()).decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["engine_kv_cache_usage_ratio"].samples[0].value == 0.25
    assert (
        next(s.value for s in fams["engine_preemptions"].samples if s.name.endswith("_total")) == 3
    )
    assert (
        next(s.value for s in fams["smolora_prompt_tokens"].samples if s.name.endswith("_total"))
        == 7
    )
    assert types.index("smolora_prompt_tokens_total") < types.index("engine_kv_cache_usage_ratio")
    assert (
        metrics.render().decode() in text
    )  # without an engine: the app's families alone, unchanged


def test_joined_exposition_passes_promtool() -> None:
    text = Metrics().render(_engine_registry()).decode()
    proc = subprocess.run(
        [promtool_path(), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
