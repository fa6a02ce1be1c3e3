"""Benchmark the vLLM-backed SMoLoRA engine; writes bench/results/engine.json.

Measures, in one run on one machine:
- throughput (output tokens/s) of N concurrent image requests through the engine with
  SMoLoRA routing (pinned), vs the same engine and workload with adapters disabled
  (`routed_vs_base`, target >= 0.85);
- the same workload through the HF reference (`adapters/reference_generate.py`), one request
  at a time, as the paper's code serves (`routed_vs_hf_reference`, target >= 10);
- hot-load latency: with N requests streaming, publish a new checkpoint version, load it,
  and time until a request served by the new version streams its first token
  (`hotload_s`, target < 2 s).

Engine rounds alternate routed/base (both engines stay up) and the best round of each
counts (other processes on a shared CPU only ever slow a round down); the median of the
paired per-round ratios is written too (`routed_vs_base_paired_median`, with its quartiles
in `routed_vs_base_paired_quartiles`: the spread a single run has on this machine), and
which engine runs first alternates by round. Every round sends images neither engine has
seen (see `run_engines`).

`--curve-presets wide` adds the routed/base ratio of wider models (`width_curve`), and
`--curve-dtypes bfloat16` that of the same model served in bfloat16 (`dtype_curve`).
The headline rounds also run a routed engine with `cpu_overlap="off"` (`without_overlap`;
`--no-without-overlap` skips it), and every engine's engine-core + worker processes' CPU
seconds per 1,000 output tokens are written (`cpu_s_per_1k_tokens`), with the overlap
helper's job counts and waits (`overlap`).

Overlap (`cpu_overlap`, "auto" by default; on here): vLLM's CPU worker computes on one
thread bound to CPU 0 and leaves CPU 1 to its engine core and the API process, which
spend the forward waiting for the worker, the engine core by spinning on sched_yield. A
helper thread of the kernel library on CPU 1 computes each MLP layer's delta while the
worker runs the layer's base matmul, and sleeps between jobs (`server/engine/README.md`).
Per-thread CPU of one engine under this load (`/proc`, 4 rounds): base: worker 97%, engine
core 83%, API process 13%; routed: worker 97%, helper 8% (the kernel's work), engine core
74%, API process 16%. Per token the routed engine's
processes use more CPU than the base engine's (`cpu_s_per_1k_tokens`). The base engine
cannot put CPU 1 to work itself: with `VLLM_CPU_NUM_OF_RESERVED_CPU=0` (two OpenMP
threads, no CPU reserved) it ran at 0.41-0.43 of its one-thread speed (15 paired rounds),
its OpenMP barriers competing with the engine core.
Measured while building the helper (three-engine harness, 11-31 rounds; best rounds /
paired median of base): its first version entered an OpenMP region on its first job, and
libgomp bound it to the worker's CPU (vLLM sets OMP_PLACES), so it competed with the
worker, which ran 90-96% of the jobs itself: 0.83 (helper polling with sched_yield) and
0.54 (polling without yielding) of no overlap. With serial kernel calls kept out of
OpenMP, a helper polling through each forward: 0.959 / 0.919 against 0.885 / 0.860 without
overlap. Polling against sleeping between jobs: 0.911 / 0.926 against 0.900 / 0.892, and
0.885 / 0.870 against 0.877 / 0.866 in 31 rounds; polling with sched_yield: 0.903 / 0.917
(against 0.935 / 0.931). All within the noise, so the helper sleeps: polling kept CPU 1
busy and raised the engine core's mean scheduling delay there (`perf sched latency`, 1.5 s
of load) to 0.55 ms, against 0.10 ms with a sleeping helper and 0.14 ms in the base engine
(API process: 0.83, 0.25 and 0.31 ms). With the helper's jobs made no-ops: 0.975 / 0.931 of
base; with the kernel's decode calls made no-ops and no helper: 0.897 / 0.901 (21 rounds
each): on this machine in this session, routing's bookkeeping (routes, traces, the Python
around the adapters, a longer step gap) costs more than the kernel work the helper leaves
on the worker (adding the delta, waiting: `overlap.wait_s`).

Where the routed engine's time went without overlap (small preset, E=8, rank 128, 16
requests x 128 tokens, 2-core CPU; per-call timers inside vLLM's worker, 10 rounds): the forward takes
~75 ms more per round of 2048 tokens than the base engine's (~420 ms per round). The
routed layers' CPU kernel is ~45 ms of that: ~30 ms in ~1016 decode calls (gate/up ~35-43
us, down ~23-26 us per call inside the forward, against ~15 and ~9 us when the weights are
in cache) and ~8 ms in prefill; the Python around it ~6 ms; prompt means ~2.5 ms;
fusion/trace bookkeeping ~4 ms; the base layers run a few percent slower next to the
adapters (caches shared). Decode is bound by memory, not arithmetic: with 16 requests
every expert of every sublayer is touched each step, and E=8 rank-16 experts on
gate/up/down are ~45% of the base model's weight bytes at hidden 256 (but only ~12% of
its multiply-adds per token, 17% of the MLP's). At `wide` (hidden 1024) the ratio is ~0.92-0.94.
With the experts evicted to DRAM, a gate/up + down decode pair takes ~88 us, about 2x the
~43 us plain loads need to stream the same bytes (B alone: 26-31 us against ~18-21 us);
sampled with py-spy, both engines' workers wait ~25% of the time for vLLM's engine core,
the routed kernel is ~6% of the routed worker's samples and the Python around the adapters ~2.5%. With the kernel's calls made
no-ops (everything else of the routed engine kept: routes, bookkeeping, traces), the engine
runs at 0.97-0.98 of the base engine (21 paired rounds), so the kernel and its memory
traffic are ~85% of what routing costs.

Measured and kept: A applied to blocks of up to four rows in 16-wide vectors (bit-identical
results; prefill calls 1.3-1.8x faster, decode ~20% in isolation); no software prefetch
(10-15% faster than prefetching the next expert); prompt sums in C; the kernel on torch's
OpenMP threads (+2-4%); the kernel bound once to a reused decode step's routes, called
with only x and y (+0.8% paired median, +1.7% best rounds; 21 rounds). Measured and dropped: expert weights stored as
bfloat16 (exact widening in the kernel, half the bytes, identical tokens on a checkpoint of
bfloat16 values: +1.1% in 31 paired rounds, +2-4% in earlier shorter runs; not worth
rounding every published checkpoint), page-stride or bulk prefetch (slower or within
noise), prefetching the experts' B during the A pass (cold experts: 3% faster to 5% slower
per call), prefetching the experts before the base matmul (the kernel ~12 us faster, the
matmul plus the prefetch ~15-20 us slower: same bytes over the same bus), B tiled per 16
outputs so it streams sequentially (cold: 35 us against 26 us for gate/up's B; the 16
row streams of the plain layout keep more loads in flight), B rank-major across experts so
each row stream is E times longer (cold: 25 us against 31 us in isolation, but 1-3% slower
in the engine, 25 paired rounds), transparent huge pages for the
experts (no change), a token-major kernel (re-reads each expert per token: 2.5x slower in
the forward), grouped matmuls (one tiny matmul per expert group: 0.72 overall), two OpenMP
threads for the worker (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`: both engines slower and erratic); a helper thread on
the second core reading each layer's experts just before use (cold decode pair 67 -> 60 us,
but base matmuls plus kernels 411 -> 462 us: the helper's reads compete with the worker's);
prefetching the next expert group's B (and A) while computing the current one, every
block or one block in four (cold pair 4-17% faster by variant and run, from L3 9-17% slower: the prefetch
instructions cost more than they hide once the experts are cached, and in the engine they
mostly are); letting the compiler fuse multiply-adds (`-ffp-contract=fast`; the build is ISO
C11, so it does not by default): hot no change, cold -11% in isolation, but 0.945 (best
rounds) / 0.995 (paired median) of the unfused kernel in the engine, 21 rounds; for
bfloat16, splitting each 64-byte load of B into its even and odd outputs (one operation per
16 outputs instead of two): hot no change, cold 25% slower; non-temporal prefetches of the
experts just ahead of use, so they would not push the base weights out of the caches:
0.999 (best rounds) / 0.991 (paired median) of the plain kernel in the engine, 21 rounds.
Traces on vs off: 0.995 (paired median).

bfloat16 models: before the kernel served them, routed/base was 0.40 (grouped matmuls, 5
rounds). The kernel keeps the experts in bf16 and widens them as it reads; isolated decode
pair (gate/up + down, 16 tokens): 35.9 us hot against 33-34 us for float32 (42.6 us when
generic vectors split each widening in halves; AVX-512 zero-extending loads fixed that),
about the same as float32 cold (half the bytes, but latency-bound). Tried and dropped for
bf16: a narrowing store through AVX-512 (no measurable change). Not built yet: AVX512-BF16
dot products (`vdpbf16ps`, two bf16 products per lane per instruction) on experts stored
pair-interleaved along the reduction; a standalone microbenchmark of a gate/up decode
call's core loops (16 groups of 4 rows, hot): 11.3 us with widening + float32 FMAs
against 6.35 us. It needs kernel-only expert layouts and rounds z to bf16 before B.

Usage:

    python bench/engine.py            # small preset, 16 requests x 128 tokens, 31 rounds, + wide
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from smolora.adapters.checkpoint import (
    CheckpointManifest,
    base_model_fingerprint,
    publish_checkpoint,
)
from smolora.adapters.reference_generate import ReferenceRequest, generate_batch
from smolora.adapters.smolora import SMoLoRAConfig, SMoLoRAModel
from smolora.adapters.tiny_llava import build_tiny_llava, get_preset, load_llava
from smolora.server.engine.config import EngineConfig
from smolora.server.engine.engine import SMoLoRAEngine, collect_all
from smolora.server.engine.protocol import GenerateRequest

logger = logging.getLogger("bench.engine")


def make_adapter(model_dir: Path, seed: int, cfg: SMoLoRAConfig) -> tuple[SMoLoRAModel, Any]:
    model, processor = load_llava(model_dir)
    smodel = SMoLoRAModel(model, cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in smodel.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
    return smodel, processor


def publish(registry: Path, model_dir: Path, smodel: SMoLoRAModel, task: str) -> Any:
    manifest = CheckpointManifest(
        adapter_kind="smolora",
        adapter_config=smodel.config.to_dict(),
        base_model={"fingerprint": base_model_fingerprint(model_dir), "name": model_dir.name},
        layers=list(smodel.layers),
        tasks=[task],
    )
    return publish_checkpoint(registry, smodel.adapter_state_dict(), manifest)


def workload(
    n: int, image_size: int, seed: int
) -> tuple[list[str], list[Image.Image], list[torch.Tensor]]:
    rng = np.random.default_rng(seed)
    images = [
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))
        for _ in range(n)
    ]
    questions = [
        "What is in the picture?",
        "Describe the image.",
        "How many shapes are there?",
        "What color is it?",
    ]
    prompts = [f"USER: <image>\n{questions[i % len(questions)]} ASSISTANT:" for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    return prompts, images, [torch.randn(384, generator=gen) for _ in range(n)]


def requests(
    prompts: list[str], images: list[Image.Image], instr: list[torch.Tensor] | None, max_tokens: int
) -> list[GenerateRequest]:
    return [
        GenerateRequest(
            prompt=p,
            image=im,
            instruction=None if instr is None else instr[i],
            max_tokens=max_tokens,
            ignore_eos=True,
            trace=instr is not None,
        )
        for i, (p, im) in enumerate(zip(prompts, images))
    ]


async def tokens_per_s(engine: SMoLoRAEngine, reqs: list[GenerateRequest]) -> float:
    t0 = time.perf_counter()
    results = await collect_all(engine, reqs)
    dt = time.perf_counter() - t0
    return sum(len(r.token_ids) for r in results) / dt


async def hotload_seconds(
    engine: SMoLoRAEngine,
    registry: Path,
    model_dir: Path,
    smodel_next: SMoLoRAModel,
    load_reqs: list[GenerateRequest],
    probe: GenerateRequest,
) -> float:
    """With `load_reqs` streaming, publish + load a new version; seconds until a request on
    the new version streams its first token."""
    started = [asyncio.Event() for _ in load_reqs]

    async def stream(i: int, r: GenerateRequest) -> None:
        async for _ in engine.generate(r):
            started[i].set()

    tasks = [asyncio.create_task(stream(i, r)) for i, r in enumerate(load_reqs)]
    await asyncio.gather(*(e.wait() for e in started))
    t0 = time.perf_counter()
    entry = await asyncio.to_thread(publish, registry, model_dir, smodel_next, "next")
    t_pub = time.perf_counter()
    info = await engine.load_latest(registry)
    t_load = time.perf_counter()
    first = None
    async for chunk in engine.generate(probe):
        if chunk.token_ids:
            first = time.perf_counter()
            assert chunk.version == entry.version == info.version, (
                "probe was not served by the new version"
            )
            break
    assert first is not None
    in_flight = sum(not t.done() for t in tasks)
    await asyncio.gather(*tasks)
    logger.info(
        "hot-load with %d requests still streaming: %.3f s (publish %.3f, load %.3f, first token %.3f)",
        in_flight,
        first - t0,
        t_pub - t0,
        t_load - t_pub,
        first - t_load,
    )
    return first - t0


def hf_reference_tokens_per_s(
    smodel: SMoLoRAModel,
    processor: Any,
    prompts: list[str],
    images: list[Image.Image],
    instr: list[torch.Tensor],
    max_tokens: int,
) -> float:
    t0 = time.perf_counter()
    total = 0
    for p, im, u in zip(prompts, images, instr):
        out = generate_batch(
            smodel, processor, [ReferenceRequest(p, im, u)], max_tokens, eos_token_id=-1
        )
        total += len(out[0].token_ids)
    return total / (time.perf_counter() - t0)


def _engine_pids(engine: SMoLoRAEngine) -> list[int]:
    """The engine-core process of a running engine and its children (the worker)."""
    core = engine.vllm.engine_core.resources.engine_manager.processes[0].pid
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == core
            ):
                children.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return [core, *children]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes (all their threads) have used so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def run_engines(
    args: argparse.Namespace,
    model_dir: Path,
    registry: Path,
    v1_path: Path,
    smodel_next: SMoLoRAModel | None,
    prompts: list[str],
    images: list[Image.Image],
    instr: list[torch.Tensor],
    dtype: str = "float32",
    without_overlap: bool = False,
) -> dict[str, Any]:
    """Tokens/s of the routed and base engines (and, with `without_overlap`, of a routed
    engine with `cpu_overlap="off"`) over rounds in rotating order; the CPU seconds their
    engine-core and worker processes use per 1,000 tokens; hot-load if `smodel_next`."""
    # One spare row, so the hot-load probe is admitted while `args.requests` requests stream
    # (otherwise its latency would be the wait for a streaming request to finish).
    common = dict(
        model_dir=model_dir,
        max_num_seqs=args.requests + 1,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_bytes=args.kv_cache_mib << 20,
        dtype=dtype,
    )
    configs = {
        "routed": EngineConfig(checkpoint=v1_path, num_slots=2, **common),
        "base": EngineConfig(adapters=False, **common),
    }
    if without_overlap:
        configs["routed_no_overlap"] = EngineConfig(
            checkpoint=v1_path, num_slots=2, cpu_overlap="off", **common
        )
    engines: dict[str, SMoLoRAEngine] = {}
    out: dict[str, Any] = {}
    try:
        for name, config in configs.items():
            engines[name] = await SMoLoRAEngine.start(config)
        pids = {name: _engine_pids(e) for name, e in engines.items()}
        names = list(engines)
        routed_instr = {name: None if name == "base" else instr for name in names}
        for name in names:  # warm-up
            await tokens_per_s(
                engines[name], requests(prompts, images, routed_instr[name], args.max_tokens)
            )
        tps: dict[str, list[float]] = {name: [] for name in names}
        cpu = {name: 0.0 for name in names}
        size = images[0].size[0]
        for i in range(args.rounds):
            # Fresh images every round, as real traffic has: vLLM's multimodal processor cache
            # keys an image by its content and processor kwargs, which carry a routed
            # request's own key, so repeated images would let only the base engine skip
            # preprocessing.
            _, round_images, _ = workload(args.requests, size, seed=1000 + i)
            # The order rotates (and reverses every other round), so no engine always runs
            # right after the same other one.
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order if i % 2 == 0 else order[::-1]:
                c0 = _cpu_seconds(pids[name])
                tps[name].append(
                    await tokens_per_s(
                        engines[name],
                        requests(prompts, round_images, routed_instr[name], args.max_tokens),
                    )
                )
                cpu[name] += _cpu_seconds(pids[name]) - c0
            logger.info(
                "%s round: %s",
                model_dir.name,
                ", ".join(f"{n} {tps[n][-1]:.1f} tok/s" for n in names),
            )
        tokens = args.rounds * args.requests * args.max_tokens
        for name in names:
            paired = [r / b for r, b in zip(tps[name], tps["base"])]
            out[name] = {
                # Best round of each: on a shared machine other processes only ever slow a round down.
                "tokens_per_s": max(tps[name]),
                "paired_median": statistics.median(paired),
                "paired_quartiles": statistics.quantiles(paired, n=4)
                if len(paired) > 1
                else [paired[0]] * 3,
                "cpu_s_per_1k_tokens": 1000 * cpu[name] / tokens,
            }
            if name != "base":
                logger.info(
                    "%s %s: paired %s/base ratios per round %s (median %.3f)",
                    model_dir.name,
                    name,
                    name,
                    [round(x, 3) for x in paired],
                    out[name]["paired_median"],
                )
        out["overlap"] = (await engines["routed"].health()).detail.get("overlap")
        for name in names:
            if name != "routed":
                await engines.pop(name).shutdown()
        if smodel_next is not None:
            # Streams as long as the context allows, so they are still running during the load.
            long_reqs = requests(prompts, images, instr, args.max_model_len - 96)
            probe = requests(prompts[:1], images[:1], instr[:1], 4)[0]
            out["hotload_s"] = await hotload_seconds(
                engines["routed"], registry, model_dir, smodel_next, long_reqs, probe
            )
    finally:
        for engine in engines.values():
            await engine.shutdown()
    return out


def curve_point(
    args: argparse.Namespace,
    preset_name: str,
    cfg: SMoLoRAConfig,
    tmp: Path,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Routed and base tokens/s for another preset (the width curve) or model dtype (the
    dtype curve): the same model (seed 0) and checkpoint as the headline, in a fresh pair
    of engines, without the hot-load."""
    preset = get_preset(preset_name)
    name = f"{preset_name}-{dtype}"
    model_dir = build_tiny_llava(preset, tmp / name, seed=0)
    registry = tmp / f"registry-{name}"
    smodel, _ = make_adapter(model_dir, 1, cfg)
    v1 = publish(registry, model_dir, smodel, "task1")
    del smodel
    prompts, images, instr = workload(args.requests, preset.image_size, seed=0)
    eng = asyncio.run(
        run_engines(args, model_dir, registry, v1.path, None, prompts, images, instr, dtype=dtype)
    )
    logger.info(
        "%s: routed %.1f tok/s, base %.1f tok/s",
        name,
        eng["routed"]["tokens_per_s"],
        eng["base"]["tokens_per_s"],
    )
    return eng


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-mib", type=int, default=256)
    parser.add_argument(
        "--curve-presets",
        default="wide",
        help="comma-separated presets whose routed/base ratio is added as width_curve ('' for none)",
    )
    parser.add_argument(
        "--curve-dtypes",
        default="bfloat16",
        help="comma-separated model dtypes whose routed/base ratio (main preset) is added as dtype_curve ('' for none)",
    )
    parser.add_argument(
        "--without-overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run a routed engine with cpu_overlap='off' in the headline rounds (without_overlap)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "engine.json"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    preset = get_preset(args.preset)
    cfg = SMoLoRAConfig(
        num_experts=args.num_experts, rank=args.rank, alpha=2.0 * args.rank, dropout=0.0
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llava(preset, Path(tmp) / args.preset, seed=0)
        registry = Path(tmp) / "registry"
        smodel, processor = make_adapter(model_dir, 1, cfg)
        v1 = publish(registry, model_dir, smodel, "task1")
        smodel_next, _ = make_adapter(model_dir, 2, cfg)
        prompts, images, instr = workload(args.requests, preset.image_size, seed=0)
        eng = asyncio.run(
            run_engines(
                args,
                model_dir,
                registry,
                v1.path,
                smodel_next,
                prompts,
                images,
                instr,
                without_overlap=args.without_overlap,
            )
        )
        hf = hf_reference_tokens_per_s(smodel, processor, prompts, images, instr, args.max_tokens)
        del smodel, smodel_next
        widths = {
            p: curve_point(args, p, cfg, Path(tmp)) for p in args.curve_presets.split(",") if p
        }
        dtypes = {
            d: curve_point(args, args.preset, cfg, Path(tmp), dtype=d)
            for d in args.curve_dtypes.split(",")
            if d
        }
    routed, base = eng["routed"], eng["base"]
    result: dict[str, Any] = {
        "command": " ".join(
            [
                "python",
                "bench/engine.py",
                *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            ]
        ),
        "preset": args.preset,
        "routed_vs_base": routed["tokens_per_s"] / base["tokens_per_s"],
        "routed_vs_base_paired_median": routed["paired_median"],
        "routed_vs_base_paired_quartiles": routed["paired_quartiles"],
        "routed_vs_hf_reference": routed["tokens_per_s"] / hf,
        "hotload_s": eng["hotload_s"],
        "tokens_per_s": {
            "routed": routed["tokens_per_s"],
            "base": base["tokens_per_s"],
            "hf_reference": hf,
        },
        "cpu_s_per_1k_tokens": {
            "routed": routed["cpu_s_per_1k_tokens"],
            "base": base["cpu_s_per_1k_tokens"],
        },
        "overlap": eng["overlap"],
    }
    if "routed_no_overlap" in eng:
        off = eng["routed_no_overlap"]
        result["without_overlap"] = {
            "routed_vs_base": off["tokens_per_s"] / base["tokens_per_s"],
            "routed_vs_base_paired_median": off["paired_median"],
            "tokens_per_s": off["tokens_per_s"],
            "cpu_s_per_1k_tokens": off["cpu_s_per_1k_tokens"],
        }
    if widths:
        result["width_curve"] = {
            args.preset: result["routed_vs_base"],
            **{
                p: e["routed"]["tokens_per_s"] / e["base"]["tokens_per_s"]
                for p, e in widths.items()
            },
        }
    if dtypes:
        result["dtype_curve"] = {
            "float32": result["routed_vs_base"],
            **{
                d: {
                    "routed_vs_base": e["routed"]["tokens_per_s"] / e["base"]["tokens_per_s"],
                    "routed_vs_base_paired_median": e["routed"]["paired_median"],
                    "tokens_per_s": {
                        "routed": e["routed"]["tokens_per_s"],
                        "base": e["base"]["tokens_per_s"],
                    },
                }
                for d, e in dtypes.items()
            },
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
