"""vLLM's own engine metrics (`vllm:*`) on a registry the engine owns.

vLLM's V1 `AsyncLLM` records per-step scheduler and per-request iteration stats through
its stat loggers; `PrometheusStatLogger` turns them into the `vllm:*` families operators
know from `vllm serve` (KV-cache usage, running/waiting requests, preemptions, prefix-cache
queries and hits, iteration tokens, TTFT, inter-token latency, end-to-end latency, request
success by finish reason, ...). It registers them on prometheus_client's process-global
`REGISTRY` and, when constructed, unregisters every `vllm:*` collector already there, so a
second engine in the same process would silently take the first one's families away.

`prometheus_stat_logger(registry)` returns a subclass of vLLM's `PrometheusStatLogger`
(same families, names, labels, buckets and recording code) whose metrics are registered on
`registry` instead; `SMoLoRAEngine` passes it to `AsyncLLM` as its Prometheus stat logger
(vLLM then does not add its default one), one fresh registry per engine. The HTTP server
exposes that registry beside its own `smolora_*` families on `/metrics`.

What it does not do: define or rename metrics, serve HTTP, or touch the global registry
(beyond vLLM's own clean-up of `vllm:*` collectors found there).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def _bound(registry: CollectorRegistry) -> dict[str, Any]:
    # functools.partial is not a descriptor: as a class attribute it is called unbound,
    # exactly like the metric classes it stands for.
    return {
        "_gauge_cls": partial(Gauge, registry=registry),
        "_counter_cls": partial(Counter, registry=registry),
        "_histogram_cls": partial(Histogram, registry=registry),
    }


def prometheus_stat_logger(registry: CollectorRegistry) -> type:
    """vLLM's `PrometheusStatLogger`, registering every metric it creates on `registry`.

    Pass the returned class in `AsyncLLM.from_engine_args(..., stat_loggers=[cls])`: a
    `PrometheusStatLogger` subclass there replaces vLLM's default Prometheus logger.

    Args:
        registry: where the `vllm:*` families go (one per engine; never the global one).

    Returns:
        A `PrometheusStatLogger` subclass (its helpers for speculative decoding, KV/EC
        connectors and performance counters bound to the same registry).
    """
    from vllm.distributed.ec_transfer.ec_connector.metrics import ECConnectorProm
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.perf import PerfMetricsProm
    from vllm.v1.spec_decode.metrics import SpecDecodingProm

    metric_classes = _bound(registry)

    def sub(base: type) -> type:
        return type(f"Registry{base.__name__}", (base,), dict(metric_classes))

    attrs: dict[str, Any] = dict(metric_classes)
    attrs.update(
        _spec_decoding_cls=sub(SpecDecodingProm),
        _kv_connector_cls=sub(KVConnectorProm),
        _ec_connector_cls=sub(ECConnectorProm),
        _perf_metrics_cls=sub(PerfMetricsProm),
        registry=registry,
        __module__=__name__,
        __doc__="vLLM's PrometheusStatLogger with its metrics on `registry` (see vllm_metrics.py).",
    )
    return type("RegistryPrometheusStatLogger", (PrometheusStatLogger,), attrs)
