"""JSON summaries of the server's own metrics and checkpoint versions for the operator console.

`metrics_summary` reads the app's Prometheus registry (`server/metrics.py`'s `Metrics`, the one
owner of every number here) through `collect()` and condenses it into what the console plots:
latency percentiles estimated from the histogram buckets (as PromQL's `histogram_quantile`
does: linear inside the bucket holding the rank), token and request counters, the running and
waiting gauges, checkpoint load counts and expert selections per layer and kind. The figures
are cumulative since the server started; rates (tokens per second) are the console's
differences between two polls. `versions_summary` adds each published version's manifest
`eval` and expert count to the version manager's own listing.

It does not time, count or store anything itself, and it does not expose registry paths.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry

from smolora.adapters.checkpoint import CheckpointError, read_manifest

#: Console name -> histogram family in `server/metrics.py`.
LATENCY_FAMILIES = {
    "ttft": "smolora_time_to_first_token_seconds",
    "itl": "smolora_inter_token_latency_seconds",
    "e2e": "smolora_e2e_request_latency_seconds",
    "queue": "smolora_request_queue_time_seconds",
    "checkpoint_load": "smolora_checkpoint_load_duration_seconds",
}
QUANTILES = (0.5, 0.9, 0.99)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The q-quantile of a cumulative histogram, interpolated linearly inside its bucket.

    Args:
        q: the quantile in [0, 1].
        buckets: (upper bound, cumulative count) pairs sorted by bound, the last one +Inf.

    Returns:
        The estimate (the highest finite bound when the rank falls in the +Inf bucket), or
        None for an empty histogram.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            if cumulative == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (cumulative - below)
        lower, below = bound, cumulative
    return lower


def metrics_summary(registry: CollectorRegistry) -> dict[str, Any]:
    """The console's view of the app's metrics registry (cumulative since start).

    Returns:
        `{"latency": {name: {"count", "sum", "p50", "p90", "p99"}}, "requests": {"total",
        "by_status"}, "finished": {reason: n}, "tokens": {"prompt", "generation"},
        "running", "waiting", "active_version", "resident_versions",
        "checkpoint_loads": {"ok", "error"}, "instruction_sources": {source: n},
        "expert_usage": [{"layer", "vu": {expert: n}, "if": {expert: n}}]}`.
    """
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in registry.collect():
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))

    def total(name: str) -> float:
        return sum(v for _, v in samples.get(name, []))

    def by_label(name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, v in samples.get(name, []):
            out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + v
        return out

    latency = {}
    for key, family in LATENCY_FAMILIES.items():
        buckets = sorted(
            (float(labels["le"]), v) for labels, v in samples.get(family + "_bucket", [])
        )
        entry: dict[str, Any] = {"count": total(family + "_count"), "sum": total(family + "_sum")}
        for q in QUANTILES:
            entry[f"p{round(q * 100)}"] = histogram_quantile(q, buckets)
        latency[key] = entry

    usage: dict[str, dict[str, dict[str, float]]] = {}
    for labels, v in samples.get("smolora_expert_selections_total", []):
        layer = usage.setdefault(labels["layer"], {"vu": {}, "if": {}})
        layer.setdefault(labels["kind"], {})[labels["expert"]] = v
    by_status = by_label("smolora_requests_total", "status")
    loads = by_label("smolora_checkpoint_loads_total", "result")
    return {
        "latency": latency,
        "requests": {"total": sum(by_status.values()), "by_status": by_status},
        "finished": by_label("smolora_request_finish_total", "reason"),
        "tokens": {
            "prompt": total("smolora_prompt_tokens_total"),
            "generation": total("smolora_generation_tokens_total"),
        },
        "running": total("smolora_num_requests_running"),
        "waiting": total("smolora_num_requests_waiting"),
        "active_version": int(total("smolora_checkpoint_active_version")) or None,
        "resident_versions": int(total("smolora_checkpoint_resident_versions")),
        "checkpoint_loads": {"ok": loads.get("ok", 0.0), "error": loads.get("error", 0.0)},
        "instruction_sources": by_label("smolora_instruction_source_total", "source"),
        "expert_usage": [{"layer": name, **kinds} for name, kinds in usage.items()],
    }


def manifest_details(path: str) -> dict[str, Any]:
    """What the console shows of one checkpoint's manifest: tasks, eval, experts, creation time.

    A manifest that cannot be read gives `{"manifest_error": "..."}` instead (the version
    manager's listing still shows the version).
    """
    try:
        m = read_manifest(path)
    except (CheckpointError, OSError) as e:  # the message names the path: keep only the kind
        return {"manifest_error": f"the manifest could not be read ({type(e).__name__})"}
    experts = m.adapter_config.get("num_experts")
    return {
        "tasks": list(m.tasks),
        "eval": m.eval,
        "adapter_kind": m.adapter_kind,
        "num_experts": experts if isinstance(experts, int) else None,
        "created_at": m.created_at,
    }


def versions_summary(described: dict[str, Any]) -> dict[str, Any]:
    """The version manager's listing (`VersionManager.describe()`) with each version's manifest
    details and without file-system paths.

    Args:
        described: `VersionManager.describe()`'s result.
    """
    versions = []
    for v in described["versions"]:
        entry = {k: val for k, val in v.items() if k != "path"}
        entry.update(manifest_details(v["path"]))
        versions.append(entry)
    return {
        "adapters": True,
        "active": described["active"],
        "latest": described["latest"],
        "history": described["history"],
        "versions": versions,
    }
