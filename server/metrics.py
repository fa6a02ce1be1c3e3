"""Prometheus metrics of the server, on a registry each `Metrics` instance owns.

Names follow Prometheus conventions (`smolora_` prefix, `_seconds` for durations, `_total`
for counters) and every label is bounded: `status` is an HTTP status code the server
produces, `reason` a finish reason, `result` is ok/error, `layer` an adapted layer of the
served model, `kind` is vu/if and `expert` an expert index < E. No request ids, versions
or user text ever become label values; the active version is a gauge's value.

`render` also exposes the engine's own registry when given one: vLLM's `vllm:*` families
(KV-cache usage, scheduler running/waiting, preemptions, prefix-cache queries/hits,
iteration tokens, TTFT/ITL as vLLM counts them), recorded by the engine's stat logger
(`server/engine/vllm_metrics.py`), so one scrape carries both. Our families and vLLM's
never share a name (`smolora_` vs `vllm:`); a family the app's registry already has is
not repeated.

It does not serve `/metrics` (the health router does) and it does not time anything
itself: the serving code calls `observe_*` with the numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from smolora.server.engine.protocol import LayerRoute

# Latency buckets spanning a tiny CPU model (ms) to a 7B model on a busy GPU (tens of s).
_FAST = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
)
_SLOW = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """All server metrics, registered on `self.registry` (one per app instance).

    Args:
        registry: the registry to register on; a fresh one by default.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "smolora_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            buckets=_SLOW,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "smolora_inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
            buckets=_FAST,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "smolora_e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
            buckets=_SLOW,
            registry=r,
        )
        self.queue_time = Histogram(
            "smolora_request_queue_time_seconds",
            "Time a request waited before running: the server's admission queue plus the "
            "engine's scheduler queue.",
            buckets=_SLOW,
            registry=r,
        )
        self.requests = Counter(
            "smolora_requests_total",
            "Chat completion requests by final HTTP status code.",
            ["status"],
            registry=r,
        )
        self.finished = Counter(
            "smolora_request_finish_total",
            "Finished choices by finish reason.",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "smolora_prompt_tokens_total",
            "Prompt tokens processed (image tokens included).",
            registry=r,
        )
        self.generation_tokens = Counter(
            "smolora_generation_tokens_total", "Tokens generated.", registry=r
        )
        self.running = Gauge(
            "smolora_num_requests_running",
            "Engine requests in flight (each choice counts).",
            registry=r,
        )
        self.waiting = Gauge(
            "smolora_num_requests_waiting",
            "Requests waiting in the server's admission queue.",
            registry=r,
        )
        self.checkpoint_load = Histogram(
            "smolora_checkpoint_load_duration_seconds",
            "Time to load a checkpoint version into the engine.",
            buckets=_SLOW,
            registry=r,
        )
        self.checkpoint_loads = Counter(
            "smolora_checkpoint_loads_total",
            "Checkpoint load attempts by result.",
            ["result"],
            registry=r,
        )
        self.active_version = Gauge(
            "smolora_checkpoint_active_version",
            "The active checkpoint version number (0 = none).",
            registry=r,
        )
        self.resident_versions = Gauge(
            "smolora_checkpoint_resident_versions",
            "Checkpoint versions loaded in the engine.",
            registry=r,
        )
        self.expert_selections = Counter(
            "smolora_expert_selections_total",
            "Routed expert choices, one per request per adapted layer and kind.",
            ["layer", "kind", "expert"],
            registry=r,
        )
        self.instruction_sources = Counter(
            "smolora_instruction_source_total",
            "Requests by how their instruction was chosen.",
            ["source"],
            registry=r,
        )
        self.images_decoded = Counter(
            "smolora_images_decoded_total",
            "Request images whose decoding started (only admitted requests decode images).",
            registry=r,
        )
        self.promotion_decisions = Counter(
            "smolora_promotion_decisions_total",
            "Promotion decisions about published versions (promoted, rejected, canary, "
            "rolled_back, superseded, cancelled, failed).",
            ["decision"],
            registry=r,
        )
        self.canary_version = Gauge(
            "smolora_canary_version",
            "The version serving a canary share of the traffic (0 = none).",
            registry=r,
        )
        self.canary_requests = Counter(
            "smolora_canary_requests_total",
            "Requests naming no version counted by a running canary, by arm (canary or "
            "active) and result (ok or error).",
            ["arm", "result"],
            registry=r,
        )

    def observe_request(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def observe_tokens(self, prompt_tokens: int, generated_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)

    def observe_finish(self, reason: str) -> None:
        self.finished.labels(
            reason=reason if reason in ("stop", "length", "abort", "error") else "other"
        ).inc()

    def observe_routes(self, routes: Iterable[LayerRoute]) -> None:
        """Count one request's routed experts (one VU and one IF expert per layer)."""
        for r in routes:
            self.expert_selections.labels(layer=r.layer, kind="vu", expert=str(r.vu_expert)).inc()
            self.expert_selections.labels(layer=r.layer, kind="if", expert=str(r.if_expert)).inc()

    def observe_checkpoint_load(self, seconds: float, ok: bool) -> None:
        if ok:
            self.checkpoint_load.observe(seconds)
        self.checkpoint_loads.labels(result="ok" if ok else "error").inc()

    def set_versions(self, active: int | None, resident: int) -> None:
        self.active_version.set(active or 0)
        self.resident_versions.set(resident)

    def render(self, engine_registry: CollectorRegistry | None = None) -> bytes:
        """The text exposition format of every metric, the engine's (`vllm:*`) after ours.

        Args:
            engine_registry: the engine's own registry (vLLM's stat logger), if it has one.
        """
        if engine_registry is None:
            return generate_latest(self.registry)
        return generate_latest(_Joined(self.registry, engine_registry))  # type: ignore[arg-type]


class _Joined:
    """Two registries collected as one; a family name already seen is not repeated."""

    def __init__(self, first: CollectorRegistry, second: CollectorRegistry):
        self._registries = (first, second)

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set()
        for registry in self._registries:
            for family in registry.collect():
                if family.name not in seen:
                    seen.add(family.name)
                    yield family
