"""The real vLLM engine (AsyncLLM + our registered architecture) against the reference
`adapters/` implementation, request by request: tokens, routes, fusion weights; hot-loading
under load; refusal of corrupt and mismatched checkpoints.

All tests share two engines (see conftest): `engine` (SMoLoRA, version 1 active) and
`base_engine` (adapters disabled, chunked prefill on).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from smolora.adapters.checkpoint import TENSORS
from smolora.server.engine import engine as engine_module
from smolora.server.engine.config import ARCHITECTURE
from smolora.server.engine.engine import collect, collect_all
from smolora.server.engine.protocol import (
    EngineClient,
    GenerateChunk,
    GenerateRequest,
    InvalidRequestError,
    VersionLoadError,
    VersionNotResidentError,
)
from tests.server.engine.engine_testlib import (
    LoopThread,
    Workload,
    assert_matches_reference,
    make_adapter,
    make_workload,
    publish,
    requests_for,
    staggered,
)

pytestmark = pytest.mark.engine


def _assert_routes_differ(results: list[GenerateChunk]) -> None:
    routes = [tuple(r.trace.routes()) for r in results if r.trace is not None]
    assert len(set(routes)) > 1, (
        "every request took the same route: the test would not exercise routing"
    )
    vu = {tuple(layer.vu_expert for layer in r.trace.layers) for r in results if r.trace}
    if_ = {tuple(layer.if_expert for layer in r.trace.layers) for r in results if r.trace}
    assert len(vu) > 1 and len(if_) > 1


def test_engine_is_vllm_with_our_architecture(engine: Any) -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    assert isinstance(engine, EngineClient)  # the seam the HTTP layer uses, served as is
    assert isinstance(engine.vllm, AsyncLLM)
    assert engine.max_model_len == 128 and engine.max_images_per_prompt == 1
    active = engine.active_version()
    assert (
        active is not None
        and active.active
        and active.name == active.path.name
        and active.loaded_at > 0
    )
    cfg = engine.vllm.vllm_config
    assert cfg.model_config.architectures == [ARCHITECTURE]
    assert cfg.cache_config.enable_prefix_caching is False
    assert cfg.scheduler_config.enable_chunked_prefill is False
    assert cfg.scheduler_config.async_scheduling is False
    assert cfg.use_v2_model_runner is False


def test_base_engine_matches_hf_with_chunked_prefill(
    loop: LoopThread, base_engine: Any, tiny_model_dir: Path
) -> None:
    """Adapters disabled: greedy tokens equal HF transformers, with every image prompt split
    across steps by vLLM's chunked prefill (32-token budget)."""
    from smolora.adapters.tiny_llava import load_llava

    w = make_workload(8, seed=3, text_only=2)
    reqs = [
        GenerateRequest(prompt=p, image=im, max_tokens=m)
        for p, im, m in zip(w.prompts, w.images, w.max_tokens)
    ]
    results = loop.run(staggered(base_engine, reqs))
    model, processor = load_llava(tiny_model_dir)
    for i, (p, im, m) in enumerate(zip(w.prompts, w.images, w.max_tokens)):
        inputs = (
            processor(text=p, images=im, return_tensors="pt")
            if im is not None
            else processor(text=p, return_tensors="pt")
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=m, do_sample=False)
        ref = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert results[i].token_ids == ref, f"request {i}"
        assert results[i].trace is None and results[i].version is None


@pytest.mark.parametrize("vu_routing", ["pinned", "per_step"])
def test_mixed_batch_matches_reference(
    loop: LoopThread, engine: Any, version1: Any, vu_routing: str
) -> None:
    """10 staggered concurrent requests (8 images, 2 text-only, different instructions and
    lengths) in one engine: tokens and routes equal the reference, request by request."""
    _, smodel, processor = version1
    w = make_workload(10, seed=11 if vu_routing == "pinned" else 12, text_only=2)
    results = loop.run(staggered(engine, requests_for(w, vu_routing, version=1)))
    refs = w.reference(smodel, processor, vu_routing)
    assert_matches_reference(results, refs, version=1, per_step=vu_routing == "per_step")
    _assert_routes_differ(results)
    health = loop.run(engine.health())
    assert health.ok and health.detail["partial_prefills"] == 0
    overlap = health.detail["overlap"]  # the fixture asks for the overlap helper
    assert overlap is not None and overlap["helper_jobs"] + overlap["caller_jobs"] > 0
    if (os.cpu_count() or 1) > 1:
        assert overlap["helper_jobs"] > 0, overlap


def test_pinned_and_per_step_share_a_batch(loop: LoopThread, engine: Any, version1: Any) -> None:
    """The routing mode is per request: both modes interleaved in one batch still match."""
    _, smodel, processor = version1
    w = make_workload(8, seed=21, text_only=1)
    modes = ["pinned" if i % 2 else "per_step" for i in range(8)]
    reqs = [
        GenerateRequest(prompt=p, image=im, instruction=u, max_tokens=m, vu_routing=mode)  # type: ignore[arg-type]
        for p, im, u, m, mode in zip(w.prompts, w.images, w.instructions, w.max_tokens, modes)
    ]
    results = loop.run(staggered(engine, reqs))
    for i, mode in enumerate(modes):
        one = Workload([w.prompts[i]], [w.images[i]], [w.instructions[i]], [w.max_tokens[i]])
        assert_matches_reference(
            [results[i]], one.reference(smodel, processor, mode), 1, mode == "per_step"
        )


def test_traces_are_fetched_in_batches(loop: LoopThread, engine: Any) -> None:
    """16 requests submitted together cost fewer trace RPCs than requests."""
    w = make_workload(16, seed=31, text_only=0)
    before = engine.trace_rpc_count
    results = loop.run(collect_all(engine, requests_for(w, None)))
    assert all(r.trace is not None and r.trace.layers for r in results)
    assert engine.trace_rpc_count - before < len(results)


def test_closing_a_stream_aborts_the_request_in_the_engine(loop: LoopThread, engine: Any) -> None:
    """What the HTTP layer does when a client leaves: close the stream after its first chunk.
    The engine stops generating long before the request's token limit, and the request
    leaves the engine (no row, nothing in flight). (An e2e version over HTTP is not
    deterministic: the tiny model can finish all its tokens before the server sees the
    client go; the HTTP side is tested with a held test double in tests/server/api.)"""
    limit = 110  # the engine's context is 128 tokens
    req = GenerateRequest(
        prompt="USER: hi ASSISTANT:", instruction=[0.05] * 384, max_tokens=limit, ignore_eos=True
    )

    async def first_chunk_then_close() -> tuple[Any, Any, int]:
        steps_before = (await engine.health()).detail["steps_run"]
        stream = engine.generate(req)
        first = await stream.__anext__()
        await stream.aclose()
        for _ in range(500):
            health = await engine.health()
            if health.in_flight == 0 and health.detail["live_requests"] == 0:
                break
            await asyncio.sleep(0.01)
        return first, health, health.detail["steps_run"] - steps_before

    first, health, steps = loop.run(first_chunk_then_close())
    assert first.token_ids and not first.finished
    assert health.in_flight == 0 and health.detail["live_requests"] == 0
    assert steps < limit // 2, (
        f"the engine ran {steps} steps for a request closed after its first token"
    )


def test_invalid_requests_are_refused(loop: LoopThread, engine: Any) -> None:
    bad_dim = GenerateRequest(prompt="USER: hi ASSISTANT:", instruction=[0.0] * 10, max_tokens=2)
    with pytest.raises(InvalidRequestError, match="384"):
        loop.run(collect(engine, bad_dim))
    unknown = GenerateRequest(
        prompt="USER: hi ASSISTANT:", instruction=[0.0] * 384, max_tokens=2, version=99
    )
    with pytest.raises(VersionNotResidentError):
        loop.run(collect(engine, unknown))
    with pytest.raises(InvalidRequestError):
        GenerateRequest(prompt="USER: hi ASSISTANT:", max_tokens=0)


def test_hot_load_under_load(
    loop: LoopThread,
    engine: Any,
    version1: Any,
    registry: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Publish version 2 while 6 requests stream on version 1: all complete with version-1
    outputs (equal to the version-1 reference), later requests get version 2 (equal to the
    version-2 reference). The load is copied one sublayer per worker RPC (a 1-byte budget),
    so the slot is filled in several parts. Then a corrupt and a mismatched version are
    refused and version 2 keeps serving."""
    monkeypatch.setattr(engine_module, "COPY_BYTES_PER_CALL", 1)
    rpcs: list[str] = []
    real_rpc = engine._llm.collective_rpc

    async def recording_rpc(method: str, *args: Any, **kwargs: Any) -> Any:
        rpcs.append(method)
        return await real_rpc(method, *args, **kwargs)

    monkeypatch.setattr(engine._llm, "collective_rpc", recording_rpc)
    _, smodel1, processor = version1
    smodel2, _ = make_adapter(tiny_model_dir, seed=2)
    w_old = make_workload(6, seed=41, text_only=1)
    w_old.max_tokens = [24] * 6
    w_new = make_workload(6, seed=42, text_only=1)
    assert engine.active_version().version == 1

    async def scenario() -> tuple[list[GenerateChunk], list[GenerateChunk], Any, dict[int, int]]:
        first_tokens = [asyncio.Event() for _ in range(6)]
        old_results: list[GenerateChunk | None] = [None] * 6

        async def stream(i: int, req: GenerateRequest) -> None:
            ids: list[int] = []
            last = None
            async for chunk in engine.generate(req):
                ids.extend(chunk.token_ids)
                first_tokens[i].set()
                last = chunk
            assert last is not None
            last.token_ids = ids
            old_results[i] = last

        tasks = [
            asyncio.create_task(stream(i, r)) for i, r in enumerate(requests_for(w_old, "pinned"))
        ]
        await asyncio.gather(*(e.wait() for e in first_tokens))
        # Freeze the running requests in the engine (they keep their rows and KV cache) so
        # the publish + load below deterministically happens while all six are in flight.
        await engine.vllm.pause_generation(mode="keep", clear_cache=False)
        entry = await asyncio.to_thread(publish, registry, tiny_model_dir, smodel2, "task2")
        info = await engine.load_latest(registry)
        in_flight_on_v1 = {v.version: v.in_flight for v in engine.list_versions()}
        new_tasks = asyncio.gather(*(collect(engine, r) for r in requests_for(w_new, "pinned")))
        await engine.vllm.resume_generation()
        new_results = await new_tasks
        await asyncio.gather(*tasks)
        assert entry.version == info.version == 2
        return old_results, list(new_results), info, in_flight_on_v1  # type: ignore[return-value]

    old, new, info, in_flight = loop.run(scenario())
    assert info.active and in_flight[1] > 0, (
        "the load must happen while version-1 requests are in flight"
    )
    stats = loop.run(engine._llm.collective_rpc("smolora_stats"))[0]
    parts = stats["adapted_sublayers"]  # one part per RPC with a 1-byte budget
    assert parts > stats["routed_layers"] > 1 and rpcs.count("smolora_copy_staged") == parts
    assert_matches_reference(
        old, w_old.reference(smodel1, processor, "pinned"), version=1, per_step=False
    )
    assert_matches_reference(
        new, w_new.reference(smodel2, processor, "pinned"), version=2, per_step=False
    )
    assert {v.version for v in engine.list_versions()} == {1, 2}

    # A corrupt version (published, then its tensors damaged) is refused; v2 keeps serving.
    smodel3, _ = make_adapter(tiny_model_dir, seed=3)
    bad = publish(registry, tiny_model_dir, smodel3, "task3")
    data = bytearray((bad.path / TENSORS).read_bytes())
    data[-64:] = bytes(64)
    (bad.path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(VersionLoadError) as err:
        loop.run(engine.load_latest(registry))
    assert err.value.reason == "IntegrityError"
    # A checkpoint with another adapter layout (rank 8) is refused too.
    smodel4, _ = make_adapter(tiny_model_dir, seed=4, rank=8)
    other = publish(registry, tiny_model_dir, smodel4, "task4")
    with pytest.raises(VersionLoadError) as err2:
        loop.run(engine.load_version(other.path))
    assert err2.value.reason == "CheckpointMismatchError"
    assert engine.active_version().version == 2
    again = loop.run(collect(engine, requests_for(w_new, "pinned")[0]))
    assert again.version == 2 and again.token_ids == new[0].token_ids
    shutil.rmtree(bad.path)
    shutil.rmtree(other.path)


def test_preempted_requests_match_reference(
    loop: LoopThread, preempting_engine: Any, version1: Any
) -> None:
    """With a KV cache too small for the batch, vLLM preempts and recomputes requests; their
    tokens and traces (pinned and per-step routes, fusion means) still equal the reference."""
    _, smodel, processor = version1
    w = make_workload(10, seed=51, text_only=1)
    w.max_tokens = [30] * 10
    modes = ["pinned" if i % 2 else "per_step" for i in range(10)]
    reqs = [
        GenerateRequest(prompt=p, image=im, instruction=u, max_tokens=m, vu_routing=mode)  # type: ignore[arg-type]
        for p, im, u, m, mode in zip(w.prompts, w.images, w.instructions, w.max_tokens, modes)
    ]
    results = loop.run(collect_all(preempting_engine, reqs))
    stats = loop.run(preempting_engine.health()).detail
    assert stats["recomputed_requests"] > 0, "the KV cache was large enough: no preemption happened"
    assert (
        stats["overlap"] is None and stats["cpu_kernel_layers"] == stats["routed_layers"]
    )  # in-place kernel calls
    for i, mode in enumerate(modes):
        one = Workload([w.prompts[i]], [w.images[i]], [w.instructions[i]], [w.max_tokens[i]])
        assert_matches_reference(
            [results[i]], one.reference(smodel, processor, mode), 1, mode == "per_step"
        )


def _text_requests(n: int, max_tokens: int, **sampling: Any) -> list[GenerateRequest]:
    w = make_workload(max(n, 2), seed=11, text_only=max(n, 2))
    return [
        GenerateRequest(prompt=p, instruction=u, max_tokens=max_tokens, trace=False, **sampling)
        for p, u in zip(w.prompts[:n], w.instructions[:n])
    ]


def test_ignore_eos_generates_exactly_max_tokens(loop: LoopThread, engine: Any) -> None:
    """Hot sampling over the tiny model's 512 tokens ends some requests at EOS early; the same
    requests with `ignore_eos` generate exactly `max_tokens` tokens."""
    max_tokens = 80
    requests = [
        dataclasses.replace(r, temperature=2.0, seed=s)
        for s, r in enumerate(_text_requests(32, max_tokens))
    ]
    results = loop.run(collect_all(engine, requests))
    early = [
        i
        for i, r in enumerate(results)
        if r.finish_reason == "stop" and len(r.token_ids) < max_tokens
    ]
    assert early, "no request met EOS: the test would not show that ignore_eos ignores it"
    again = loop.run(
        collect_all(engine, [dataclasses.replace(requests[i], ignore_eos=True) for i in early])
    )
    assert [len(r.token_ids) for r in again] == [max_tokens] * len(early)
    assert {r.finish_reason for r in again} == {"length"}


def test_min_tokens_holds_off_stop_tokens(loop: LoopThread, engine: Any) -> None:
    """`min_tokens` keeps EOS and stop tokens from ending a request early (vLLM masks them)."""
    base = _text_requests(4, 8)
    plain = loop.run(collect_all(engine, base))
    cases = [(b, p.token_ids[1]) for b, p in zip(base, plain) if p.token_ids[1] != p.token_ids[0]]
    assert cases, "every greedy output repeats its first token"
    stopped = loop.run(
        collect_all(engine, [dataclasses.replace(b, stop_token_ids=[t]) for b, t in cases])
    )
    assert all(r.finish_reason == "stop" and len(r.token_ids) == 2 for r in stopped)
    held = loop.run(
        collect_all(
            engine, [dataclasses.replace(b, stop_token_ids=[t], min_tokens=6) for b, t in cases]
        )
    )
    for r, (_, t) in zip(held, cases):
        assert len(r.token_ids) >= 6 and t not in r.token_ids[:6]


def test_logprobs_shapes_and_greedy_choice_is_the_most_likely(
    loop: LoopThread, engine: Any
) -> None:
    results = loop.run(collect_all(engine, _text_requests(3, 6, logprobs=5)))
    for r in results:
        assert r.logprobs is not None and len(r.logprobs) == len(r.token_ids)
        for tid, lp in zip(r.token_ids, r.logprobs):
            assert lp.token_id == tid and len(lp.top) == 5
            tops = [a.logprob for a in lp.top]
            assert tops == sorted(tops, reverse=True) and sum(math.exp(v) for v in tops) <= 1 + 1e-5
            assert lp.top[0].token_id == tid and lp.logprob == pytest.approx(max(tops), abs=1e-6)
    chosen_only = loop.run(collect(engine, _text_requests(1, 4, logprobs=0)[0]))
    assert chosen_only.logprobs is not None and len(chosen_only.logprobs) == len(
        chosen_only.token_ids
    )
    assert all(lp.top == [] and lp.logprob <= 0 for lp in chosen_only.logprobs)
    assert loop.run(collect(engine, _text_requests(1, 4)[0])).logprobs is None


def test_top_k_one_is_greedy(loop: LoopThread, engine: Any) -> None:
    greedy = loop.run(collect_all(engine, _text_requests(4, 8)))
    top1 = loop.run(collect_all(engine, _text_requests(4, 8, temperature=1.0, top_k=1, seed=5)))
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


def test_bad_sampling_values_are_invalid_requests(loop: LoopThread, engine: Any) -> None:
    for bad in (
        {"top_k": -2},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"min_tokens": 9},
        {"logprobs": 21},
    ):
        with pytest.raises(InvalidRequestError):
            GenerateRequest(prompt="USER: hi ASSISTANT:", max_tokens=8, **bad)
    with pytest.raises(
        InvalidRequestError, match="temperature"
    ):  # vLLM's own check, as a typed error
        loop.run(collect(engine, _text_requests(1, 2, temperature=3.0)[0]))
