"""Soak the real server: steady load of images that are all new, memory per process over time,
and the same answer to the same request at the start and at the end; writes
bench/results/soak.json.

    python bench/soak.py                      # 4 minutes per setting, 32 clients
    python bench/soak.py --minutes 6 --mm-cache-gb 0.25

For each value of `--mm-cache-gb` (the engine option `mm_cache_gb`: vLLM's cache of
processed images, held by the front-end process and by the engine core; default here
"4,0.25": vLLM's own default beside ours), one after the other on the same machine:
1. start `python -m smolora.server serve` on the `small` tiny-LLaVA preset with one published
   SMoLoRA version (`bench/server.py`'s model cache and server command);
2. send the replay probe: one fixed image and question, greedy, 24 tokens;
3. run `--concurrency` clients for `--minutes`, each request with a new random 64-px image
   (so no cache can hit), 16 greedy tokens; every `--sample-s` seconds record the resident
   set size (RSS) of the API process, the engine core and the worker;
4. send the replay probe again and compare its text with the first answer.

Reported per setting: requests answered and errors by kind, RSS at start and end per
process, the growth slope of each process over the second half of the run (MB per minute,
least squares; the first half includes warm-up allocations), and `replay_equal`.
Run it alone on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # bench/ holds scripts, not a package
import server as bench_server  # noqa: E402

OUT = Path(__file__).parent / "results" / "soak.json"
QUESTION = "What is shown in the image?\nAnswer the question using a single word or phrase."


def image_url(rng: np.random.Generator, size: int = 64) -> str:
    """A PNG data URL of random pixels (never the same twice)."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def body(image: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": bench_server.SERVED_NAME,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }


def rss_mb(pid: int) -> dict[str, float]:
    """RSS of the server process tree by role: api, engine_core, worker."""
    root = psutil.Process(pid)
    out = {"api": root.memory_info().rss / 2**20, "engine_core": 0.0, "worker": 0.0}
    for child in root.children(recursive=True):
        try:
            name, rss = child.name(), child.memory_info().rss / 2**20
        except psutil.Error:
            continue
        if "EngineCore" in name:
            out["engine_core"] += rss
        elif "Worker" in name:
            out["worker"] += rss
    return out


def slope_mb_per_min(samples: list[dict[str, Any]], role: str) -> float:
    """Least-squares growth of `role`'s RSS over the second half of the samples."""
    half = samples[len(samples) // 2 :]
    t = np.array([s["t_s"] for s in half]) / 60.0
    y = np.array([s["rss_mb"][role] for s in half])
    return float(np.polyfit(t, y, 1)[0]) if len(half) >= 2 else float("nan")


async def soak(url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {bench_server.API_KEY}"}
    rng = np.random.default_rng(0)
    probe = body(image_url(np.random.default_rng(12345)), 24)
    errors: dict[str, int] = {}
    ok = 0
    samples: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:

        async def replay() -> str:
            r = await client.post("/v1/chat/completions", json=probe)
            r.raise_for_status()
            return str(r.json()["choices"][0]["message"]["content"])

        first = await replay()
        start = time.monotonic()
        deadline = start + args.minutes * 60

        async def one_client() -> None:
            nonlocal ok
            while time.monotonic() < deadline:
                try:
                    r = await client.post("/v1/chat/completions", json=body(image_url(rng), 16))
                    kind = None if r.status_code == 200 else str(r.status_code)
                except httpx.HTTPError as e:
                    kind = type(e).__name__
                if kind is None:
                    ok += 1
                else:
                    errors[kind] = errors.get(kind, 0) + 1

        async def sampler() -> None:
            while time.monotonic() < deadline:
                samples.append(
                    {"t_s": round(time.monotonic() - start, 1), "rss_mb": rss_mb(pid), "ok": ok}
                )
                await asyncio.sleep(args.sample_s)

        await asyncio.gather(sampler(), *(one_client() for _ in range(args.concurrency)))
        samples.append({"t_s": round(time.monotonic() - start, 1), "rss_mb": rss_mb(pid), "ok": ok})
        last = await replay()
    roles = ("api", "engine_core", "worker")
    return {
        "requests_ok": ok,
        "errors": errors,
        "duration_s": samples[-1]["t_s"],
        "requests_per_s": ok / samples[-1]["t_s"],
        "rss_start_mb": samples[0]["rss_mb"],
        "rss_end_mb": samples[-1]["rss_mb"],
        "slope_second_half_mb_per_min": {r: slope_mb_per_min(samples, r) for r in roles},
        "replay_equal": first == last,
        "replay_text": [first, last],
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument(
        "--mm-cache-gb", default="4,0.25", help="comma-separated settings, one server each"
    )
    p.add_argument("--out", type=Path, default=OUT)
    raw = list(argv if argv is not None else sys.argv[1:])
    args = p.parse_args(raw)
    cfg = replace(bench_server.BenchConfig(), concurrency=args.concurrency, max_num_seqs=16)
    model_dir = bench_server.prepare_model(cfg)
    result: dict[str, Any] = {
        "command": " ".join(["python", "bench/soak.py", *(shlex.quote(a) for a in raw)]),
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "config": {
            "preset": cfg.preset,
            "minutes": args.minutes,
            "concurrency": args.concurrency,
            "image_px": 64,
            "max_tokens": 16,
        },
        "by_mm_cache_gb": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        work = Path(tmp)
        registry, _ = bench_server.prepare_adapters(cfg, model_dir, work)
        for gb in (float(v) for v in args.mm_cache_gb.split(",") if v):
            srv = bench_server.our_server(cfg, model_dir, work, registry)
            srv.cmd += ["--engine-option", f"mm_cache_gb={gb}"]
            srv.start(cfg.start_timeout_s)
            try:
                assert srv.proc is not None
                point = asyncio.run(soak(srv.url, srv.proc.pid, args))
            finally:
                srv.stop()
            result["by_mm_cache_gb"][str(gb)] = point
            slopes = {k: round(v, 1) for k, v in point["slope_second_half_mb_per_min"].items()}
            print(
                f"mm_cache_gb={gb}: {point['requests_ok']} ok, errors {point['errors']}, "
                f"RSS end { ({k: round(v) for k, v in point['rss_end_mb'].items()}) } MB, "
                f"slope {slopes} MB/min, replay equal {point['replay_equal']}",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
