"""vLLM's own `vllm:*` metrics on each engine's registry: counted per engine when several
engines live in one process (the session's shared engines), with values that match what
was sent (requests, tokens, preemptions) and none of them on prometheus_client's global
registry."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from smolora.server.engine.engine import collect_all
from smolora.server.engine.protocol import GenerateRequest
from tests.server.engine.engine_testlib import LoopThread, make_workload

pytestmark = pytest.mark.engine


def _total(registry: CollectorRegistry, sample: str, **labels: str) -> float:
    """Sum of `sample` over every label set that includes `labels`."""
    return sum(
        s.value
        for fam in registry.collect()
        for s in fam.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _snapshot(registry: CollectorRegistry) -> dict[str, float]:
    names = (
        "vllm:request_success_total",
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
        "vllm:time_to_first_token_seconds_count",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:num_preemptions_total",
        "vllm:iteration_tokens_total_sum",
    )
    return {n: _total(registry, n) for n in names}


def _requests(n: int, seed: int, max_tokens: list[int], adapters: bool) -> list[GenerateRequest]:
    w = make_workload(n, seed=seed, text_only=1)
    return [
        GenerateRequest(
            prompt=p, image=im, instruction=u if adapters else None, max_tokens=m, ignore_eos=True
        )
        for p, im, u, m in zip(w.prompts, w.images, w.instructions, max_tokens)
    ]


def test_each_engine_counts_its_own_requests(
    loop: LoopThread, engine: Any, base_engine: Any
) -> None:
    regs = {"engine": engine.metrics_registry, "base": base_engine.metrics_registry}
    assert (
        all(isinstance(r, CollectorRegistry) for r in regs.values())
        and regs["engine"] is not regs["base"]
    )
    ours = {id(c) for r in regs.values() for c in r._collector_to_names}  # noqa: SLF001 - the registered collectors
    assert not ours & {id(c) for c in REGISTRY._collector_to_names}  # noqa: SLF001
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("vllm:")]  # noqa: SLF001 - nothing global
    before = {k: _snapshot(r) for k, r in regs.items()}

    smolora_reqs = _requests(3, seed=71, max_tokens=[4, 5, 6], adapters=True)
    base_reqs = _requests(2, seed=72, max_tokens=[3, 7], adapters=False)

    async def both() -> tuple[list[Any], list[Any]]:
        return await asyncio.gather(
            collect_all(engine, smolora_reqs), collect_all(base_engine, base_reqs)
        )

    done_smolora, done_base = loop.run(both())
    for key, reqs, done in (("engine", smolora_reqs, done_smolora), ("base", base_reqs, done_base)):
        after = _snapshot(regs[key])
        delta = {n: after[n] - before[key][n] for n in after}
        assert delta["vllm:request_success_total"] == len(reqs), key
        assert delta["vllm:generation_tokens_total"] == sum(r.max_tokens for r in reqs), (
            key
        )  # ignore_eos: exact
        assert delta["vllm:prompt_tokens_total"] == sum(c.prompt_tokens for c in done), key
        assert delta["vllm:time_to_first_token_seconds_count"] == len(reqs), key
        assert delta["vllm:e2e_request_latency_seconds_count"] == len(reqs), key
        # Every scheduled token of the batch steps is in the iteration histogram: prompts + all but
        # each request's first generated token (sampled in the prefill step).
        assert delta["vllm:iteration_tokens_total_sum"] >= delta["vllm:prompt_tokens_total"], key
        assert _total(regs[key], "vllm:request_success_total", finished_reason="length") >= len(
            reqs
        ), key
        names = {s.name for fam in regs[key].collect() for s in fam.samples}
        assert {
            "vllm:kv_cache_usage_perc",
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total",
        } <= names, key
        assert 0.0 <= _total(regs[key], "vllm:kv_cache_usage_perc") <= 1.0, key
        assert (
            _total(regs[key], "vllm:num_requests_running") == 0
            and _total(regs[key], "vllm:num_requests_waiting") == 0
        )


def test_preemptions_are_counted(loop: LoopThread, preempting_engine: Any) -> None:
    """The engine whose KV cache is too small for its batch: vLLM's preemption counter moves,
    and a preempted request's recomputed tokens are not counted twice."""
    reg = preempting_engine.metrics_registry
    before = _snapshot(reg)
    reqs = _requests(10, seed=73, max_tokens=[30] * 10, adapters=True)
    done = loop.run(collect_all(preempting_engine, reqs))
    after = _snapshot(reg)
    assert after["vllm:num_preemptions_total"] > before["vllm:num_preemptions_total"]
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 10
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 300
    assert all(len(c.token_ids) == 30 for c in done)
