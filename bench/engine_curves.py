"""How the routed engine's cost grows with the work, for `bench/engine.py --curves`.

Each curve runs the routed engine beside the base engine (adapters off) on the same model,
alternating them for a few rounds per point, and reports tokens/s of both and the median of
the paired routed/base ratios:
- `concurrency`: 1, 4, 16, 64 concurrent requests;
- `prompt_len`: prompts of about 64, 256 and 1024 text tokens (plus the image);
- `experts`: 8 -> 64 experts at a fixed rank per expert (a routed engine per point);
- `versions`: requests spread over 1 -> 8 resident versions of one engine, and memory per
  resident version: the checkpoint's bytes (what its slot holds; an engine allocates all its
  slots at start) and the worker's resident-set growth when a version is loaded;
- `hotload_curve`: checkpoints up to the size of a full 32-layer 7B checkpoint of the paper's
  configuration (~0.75 GB float32; reached with more experts on the `wide` preset): with
  streams running, publish -> first token of a request on the new version, the load alone,
  and the p99 inter-token latency of the running streams from the publish's start to that
  first token (which includes the new request's prefill) and over the load alone (the gaps
  that overlap it), against the same streams without a load.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import make_adapter, publish, requests, tokens_per_s, workload
from transformers import AutoTokenizer

from smolora.adapters.smolora import SMoLoRAConfig
from smolora.adapters.tiny_llava import build_tiny_llava, get_preset
from smolora.server.engine.config import EngineConfig
from smolora.server.engine.engine import SMoLoRAEngine
from smolora.server.engine.kernel_config import KernelConfig
from smolora.server.engine.protocol import GenerateRequest

logger = logging.getLogger("bench.engine_curves")

#: Rank per expert of the paper's configuration (8 experts, total rank 128).
RANK_PER_EXPERT = 16


def _cfg(num_experts: int) -> SMoLoRAConfig:
    rank = RANK_PER_EXPERT * num_experts
    return SMoLoRAConfig(num_experts=num_experts, rank=rank, alpha=2.0 * rank, dropout=0.0)


async def _paired(
    routed: SMoLoRAEngine,
    base: SMoLoRAEngine,
    make: Callable[[int, bool], list[GenerateRequest]],
    rounds: int,
) -> dict[str, Any]:
    """Rounds of routed and base (order alternating); `make(round, routed)` builds a round's
    requests."""
    tps: dict[str, list[float]] = {"routed": [], "base": []}
    for i in range(rounds):
        for name in ("routed", "base") if i % 2 == 0 else ("base", "routed"):
            engine = routed if name == "routed" else base
            tps[name].append(await tokens_per_s(engine, make(i, name == "routed")))
    paired = [r / b for r, b in zip(tps["routed"], tps["base"])]
    return {
        "routed_tok_s": statistics.median(tps["routed"]),
        "base_tok_s": statistics.median(tps["base"]),
        "routed_vs_base": statistics.median(paired),
    }


def _round_requests(
    n: int, size: int, seed: int, routed: bool, max_tokens: int, filler: str = ""
) -> list[GenerateRequest]:
    prompts, images, instr = workload(n, size, seed=seed)
    if filler:
        prompts = [p.replace("USER: <image>\n", f"USER: <image>\n{filler} ") for p in prompts]
    return requests(prompts, images, instr if routed else None, max_tokens)


def _filler(tokenizer: Any, text_tokens: int) -> tuple[str, int]:
    """Filler text that brings the workload's prompts to about `text_tokens` text tokens;
    (filler, the first prompt's token count without the image's placeholders)."""
    prompt = workload(1, 8, seed=0)[0][0]
    words: list[str] = []
    while True:
        filler = " ".join(words)
        n = len(tokenizer(prompt.replace("<image>\n", f"{filler} "))["input_ids"])
        if n >= text_tokens:
            return filler, n
        words.extend("the picture shows a shape".split())


def _engine_config(model_dir: Path, **kw: Any) -> dict[str, Any]:
    return dict(model_dir=model_dir, kv_cache_bytes=kw.pop("kv_mib", 512) << 20, **kw)


async def concurrency_and_prompt_curves(
    model_dir: Path, v1: Path, size: int, kernel: KernelConfig, rounds: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The concurrency and prompt-length curves (one routed + one base engine)."""
    common = _engine_config(
        model_dir, max_num_seqs=65, max_model_len=1536, max_num_batched_tokens=4096
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    routed = await SMoLoRAEngine.start(EngineConfig(checkpoint=v1, kernel=kernel, **common))
    base = await SMoLoRAEngine.start(EngineConfig(adapters=False, **common))
    try:
        concurrency = []
        for c in (1, 4, 16, 64):
            point = await _paired(
                routed,
                base,
                lambda i, r, c=c: _round_requests(c, size, 100 * c + i, r, 64),
                rounds,
            )
            concurrency.append({"concurrency": c, **point})
            logger.info("concurrency %d: %s", c, point)
        prompt_len = []
        for target in (64, 256, 1024):
            filler, text_tokens = _filler(tokenizer, target)
            point = await _paired(
                routed,
                base,
                lambda i, r, f=filler, t=target: _round_requests(16, size, 7000 + t + i, r, 32, f),
                rounds,
            )
            prompt_len.append({"prompt_text_tokens": text_tokens, **point})
            logger.info("prompt of %d text tokens: %s", text_tokens, point)
        return concurrency, prompt_len
    finally:
        await routed.shutdown()
        await base.shutdown()


async def experts_curve(
    model_dir: Path, tmp: Path, size: int, kernel: KernelConfig, rounds: int
) -> list[dict[str, Any]]:
    """Routed/base at 8, 16, 32 and 64 experts, rank 16 per expert (a routed engine each)."""
    common = _engine_config(model_dir, max_num_seqs=17, max_model_len=256, kv_mib=256)
    base = await SMoLoRAEngine.start(EngineConfig(adapters=False, **common))
    out = []
    try:
        for experts in (8, 16, 32, 64):
            smodel, _ = make_adapter(model_dir, 1, _cfg(experts))
            entry = publish(tmp / f"registry-experts-{experts}", model_dir, smodel, "task1")
            del smodel
            routed = await SMoLoRAEngine.start(
                EngineConfig(checkpoint=entry.path, kernel=kernel, **common)
            )
            try:
                point = await _paired(
                    routed,
                    base,
                    lambda i, r, e=experts: _round_requests(16, size, 9000 + e + i, r, 64),
                    rounds,
                )
            finally:
                await routed.shutdown()
            out.append({"experts": experts, "rank_per_expert": RANK_PER_EXPERT, **point})
            logger.info("experts %d: %s", experts, point)
    finally:
        await base.shutdown()
    return out


def _rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def _checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


async def versions_curve(
    model_dir: Path,
    tmp: Path,
    size: int,
    kernel: KernelConfig,
    rounds: int,
    engine_pids: Callable[[SMoLoRAEngine], list[int]],
) -> list[dict[str, Any]]:
    """Routed/base with requests spread over 1, 2, 4 and 8 resident versions of one engine,
    and the worker memory each loaded version added."""
    common = _engine_config(model_dir, max_num_seqs=17, max_model_len=256, kv_mib=256)
    registry = tmp / "registry-versions"
    entries = []
    for seed in range(8):
        smodel, _ = make_adapter(model_dir, 10 + seed, _cfg(8))
        entries.append(publish(registry, model_dir, smodel, f"task{seed}"))
        del smodel
    routed = await SMoLoRAEngine.start(
        EngineConfig(checkpoint=entries[0].path, num_slots=8, kernel=kernel, **common)
    )
    base = await SMoLoRAEngine.start(EngineConfig(adapters=False, **common))
    out = []
    try:
        pids = engine_pids(routed)
        resident = 1
        for k in (1, 2, 4, 8):
            added = []
            while resident < k:
                before = _rss_bytes(pids)
                await routed.load_version(entries[resident].path, activate=False)
                added.append(_rss_bytes(pids) - before)
                resident += 1
            versions = [e.version for e in entries[:k]]

            def make(i: int, is_routed: bool, versions: list[int] = versions) -> list[Any]:
                reqs = _round_requests(16, size, 11000 + 10 * len(versions) + i, is_routed, 64)
                if is_routed:
                    for j, r in enumerate(reqs):
                        r.version = versions[j % len(versions)]
                return reqs

            point = await _paired(routed, base, make, rounds)
            out.append(
                {
                    "versions": k,
                    **point,
                    "rss_added_per_version_mb": (statistics.mean(added) / 2**20) if added else None,
                    "checkpoint_mb": _checkpoint_bytes(entries[0].path) / 2**20,
                }
            )
            logger.info("versions %d: %s", k, out[-1])
    finally:
        await routed.shutdown()
        await base.shutdown()
    return out


async def _stream_times(engine: SMoLoRAEngine, req: GenerateRequest, times: list[float]) -> None:
    async for chunk in engine.generate(req):
        if chunk.token_ids:
            times.append(time.perf_counter())


def _itl_p99_ms(
    all_times: list[list[float]], t0: float, t1: float, overlapping: bool = False
) -> float | None:
    """p99 of the gaps between the streams' tokens that end in [t0, t1] (`overlapping`:
    that overlap it at all, so a gap that began during a load and ended after it counts)."""
    gaps = [
        (b - a) * 1000
        for times in all_times
        for a, b in zip(times, times[1:])
        if (b > t0 and a < t1 if overlapping else t0 <= b <= t1)
    ]
    if len(gaps) < 2:
        return None
    return statistics.quantiles(gaps, n=100)[98]


async def hotload_curve(
    tmp: Path, kernel: KernelConfig, experts_points: tuple[int, ...] = (8, 64, 256)
) -> list[dict[str, Any]]:
    """Hot-load time and the running streams' p99 inter-token latency, by checkpoint size
    (the `wide` preset: 1024 wide, 4 layers; ~2.9 MB per expert at rank 16)."""
    preset = get_preset("wide")
    model_dir = build_tiny_llava(preset, tmp / "wide-hotload", seed=0)
    out = []
    for experts in experts_points:
        registry = tmp / f"registry-hotload-{experts}"
        smodel, _ = make_adapter(model_dir, 1, _cfg(experts))
        v1 = publish(registry, model_dir, smodel, "task1")
        del smodel
        engine = await SMoLoRAEngine.start(
            EngineConfig(
                model_dir=model_dir,
                checkpoint=v1.path,
                num_slots=2,
                kernel=kernel,
                max_num_seqs=17,
                max_model_len=512,
                kv_cache_bytes=256 << 20,
            )
        )
        try:
            nxt, _ = make_adapter(model_dir, 2, _cfg(experts))
            reqs = _round_requests(16, preset.image_size, 500 + experts, True, 400)
            times: list[list[float]] = [[] for _ in reqs]
            tasks = [asyncio.create_task(_stream_times(engine, r, t)) for r, t in zip(reqs, times)]
            while min(len(t) for t in times) < 20:  # every stream is decoding
                await asyncio.sleep(0.05)
            quiet0 = time.perf_counter()
            await asyncio.sleep(2.0)
            quiet1 = time.perf_counter()
            entry = await asyncio.to_thread(publish, registry, model_dir, nxt, "next")
            t_pub = time.perf_counter()
            info = await engine.load_latest(registry)
            t_load = time.perf_counter()
            probe = _round_requests(1, preset.image_size, 1, True, 2)[0]
            first = None
            async for chunk in engine.generate(probe):
                if chunk.token_ids:
                    first = time.perf_counter()
                    assert chunk.version == entry.version == info.version
                    break
            assert first is not None
            during = _itl_p99_ms(times, quiet1, first)
            loading = _itl_p99_ms(times, t_pub, t_load, overlapping=True)
            idle = _itl_p99_ms(times, quiet0, quiet1)
            still_running = sum(not t.done() for t in tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            point = {
                "experts": experts,
                "mb": _checkpoint_bytes(entry.path) / 2**20,
                "s": first - quiet1,
                "publish_s": t_pub - quiet1,
                "load_s": t_load - t_pub,
                "itl_p99_ms": during,
                "itl_p99_ms_load_only": loading,
                "itl_p99_ms_without_load": idle,
                "streams_running": still_running,
            }
            out.append(point)
            logger.info("hot-load %d experts: %s", experts, point)
        finally:
            await engine.shutdown()
    return out


def run_curves(
    args: argparse.Namespace,
    preset_name: str,
    tmp: Path,
    kernel: KernelConfig,
    engine_pids: Callable[[SMoLoRAEngine], list[int]],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """All curves: (`curves`, `hotload_curve`), on `preset_name` with a 2,048-token context
    (the longest prompt point needs more than the presets' own)."""
    preset = dataclasses.replace(get_preset(preset_name), max_positions=2048)
    model_dir = build_tiny_llava(preset, tmp / f"curves-{preset_name}", seed=0)
    smodel, _ = make_adapter(model_dir, 1, _cfg(8))
    v1 = publish(tmp / "registry-curves", model_dir, smodel, "task1").path
    del smodel
    size, rounds = preset.image_size, args.curve_rounds
    concurrency, prompt_len = asyncio.run(
        concurrency_and_prompt_curves(model_dir, v1, size, kernel, rounds)
    )
    experts = asyncio.run(experts_curve(model_dir, tmp, size, kernel, rounds))
    versions = asyncio.run(versions_curve(model_dir, tmp, size, kernel, rounds, engine_pids))
    hotload = asyncio.run(hotload_curve(tmp, kernel))
    curves = {
        "preset": preset_name,
        "concurrency": concurrency,
        "prompt_len": prompt_len,
        "experts": experts,
        "versions": versions,
    }
    return curves, hotload
