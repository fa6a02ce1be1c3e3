"""Routed adapters under vLLM tensor parallelism: TP=1 against TP=N on one checkpoint.

Builds the `tiny` preset model and a published SMoLoRA checkpoint (4 experts, rank 16,
random non-zero B so routes matter), then starts the real engine at TP=1 and at TP=N one
after the other (never both at once) and sends each the same batch: `--requests` mixed
requests (images and text-only, one instruction embedding each, half pinned and half
per-step VU routing), all submitted at once, greedy, `--max-tokens` each. Writes
bench/results/tensor_parallel.json: per request whether tokens, routes (prefill and
per-step) and fusion weights agree, the largest fusion-weight difference, and each engine's
output tokens/s (best of `--rounds` rounds, after a warm-up round), with the ISA torch ran.

Usage:

    python bench/tensor_parallel.py                      # TP=1 vs TP=2, 32 requests
    python bench/tensor_parallel.py --tp 2 --requests 64 --max-tokens 48 --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _requests(n: int, max_tokens: int) -> list[Any]:
    from tests.server.engine.engine_testlib import make_workload, requests_for

    w = make_workload(n, seed=5, text_only=max(2, n // 8))
    w.max_tokens = [max_tokens] * n
    reqs = requests_for(w, None, version=1)
    modes = ["pinned" if i % 2 else "per_step" for i in range(n)]
    return [dataclasses.replace(r, vu_routing=m) for r, m in zip(reqs, modes)]


def _run(loop: Any, model: Path, ckpt: Path, tp: int, reqs: list[Any], rounds: int) -> dict:
    from smolora.server.engine.engine import collect_all
    from tests.server.engine.engine_testlib import running_engine

    gen = running_engine(
        loop,
        model_dir=model,
        checkpoint=ckpt,
        tensor_parallel_size=tp,
        num_slots=2,
        trace_step_routes=64,
        cpu_overlap="off",
        max_num_seqs=len(reqs),
        max_model_len=128,
        max_num_batched_tokens=4096,
        kv_cache_bytes=64 * 1024 * 1024,
    )
    engine = next(gen)
    try:
        loop.run(collect_all(engine, reqs[:4]))  # warm-up
        best, results = 0.0, None
        for _ in range(rounds):
            t0 = time.perf_counter()
            results = loop.run(collect_all(engine, reqs))
            dt = time.perf_counter() - t0
            best = max(best, sum(len(r.token_ids) for r in results) / dt)
    finally:
        for _ in gen:
            pass
    return {"tokens_per_s": best, "results": results}


def _compare(a: list[Any], b: list[Any]) -> dict[str, Any]:
    tokens = routes = steps = 0
    max_dw = 0.0
    for x, y in zip(a, b):
        tokens += x.token_ids == y.token_ids
        routes += x.trace.routes() == y.trace.routes()
        steps += all(p.vu_steps == q.vu_steps for p, q in zip(x.trace.layers, y.trace.layers))
        for p, q in zip(x.trace.layers, y.trace.layers):
            max_dw = max(max_dw, abs(p.w_vu - q.w_vu), abs(p.w_if - q.w_if))
    return {
        "requests": len(a),
        "tokens_equal": tokens,
        "routes_equal": routes,
        "per_step_routes_equal": steps,
        "max_fusion_weight_diff": max_dw,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("results") / "tensor_parallel.json"
    )
    args = p.parse_args()

    import torch

    from smolora.adapters.tiny_llava import build_tiny_llava, get_preset
    from tests.server.engine.engine_testlib import LoopThread, make_adapter, publish

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_llava(get_preset("tiny"), Path(tmp) / "model", seed=0)
        smodel, _ = make_adapter(model, seed=1)
        entry = publish(Path(tmp) / "registry", model, smodel, "task1")
        reqs = _requests(args.requests, args.max_tokens)
        loop = LoopThread()
        try:
            one = _run(loop, model, entry.path, 1, reqs, args.rounds)
            many = _run(loop, model, entry.path, args.tp, reqs, args.rounds)
        finally:
            loop.close()
    out = {
        "command": " ".join(["python bench/tensor_parallel.py", *sys.argv[1:]]),
        "model": "tiny preset (random weights), E=4 rank 16, gate/up/down + projector",
        "tp": args.tp,
        "cpus": len(os.sched_getaffinity(0)),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "max_tokens": args.max_tokens,
        "equivalence": _compare(many["results"], one["results"]),
        "tokens_per_s": {"tp1": one["tokens_per_s"], f"tp{args.tp}": many["tokens_per_s"]},
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
