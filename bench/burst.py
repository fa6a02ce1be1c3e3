"""A burst of large-image requests past the admission queue, against the real server: what
it costs while the server refuses it. Writes the `burst` key of
bench/results/reliability.json.

    python bench/burst.py [--requests 128]

Starts `python -m smolora.server serve` on the tiny model (`bench/reliability.py`'s model and
registry) with 4 running and 8 waiting requests allowed, then sends `--requests` chat
requests at once, each with a 2048x2048 PNG (35 KB on the wire, 12 MiB once decoded to RGB),
while a separate thread probes `/health` every 20 ms and another samples the API process's
resident set size every 50 ms. Reported: the answers by status, how many images were
decoded (`smolora_images_decoded_total`: only admitted requests should decode), `/health`
latency p50/p99/max during the burst beside the idle server's, and the API process's RSS
before and at its peak. The issue's target: `/health` p99 < 100 ms during the burst. Run it
alone on an otherwise idle machine.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test-suite helpers live in tests/
sys.path.insert(0, str(ROOT / "bench"))  # bench/ holds scripts, not a package

import reliability  # noqa: E402
from reliability_result import write_sections  # noqa: E402

from tests.e2e.conftest import RemoteServer  # noqa: E402
from tests.reliability.live import big_image_url, metric  # noqa: E402

RUNNING, WAITING = 4, 8
DECODED = "smolora_images_decoded_total"


def probe_health(url: str, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            client.get(url + "/health").raise_for_status()
            out.append((time.perf_counter() - t0) * 1000)
            stop.wait(0.02)


def sample_rss(pid: int, stop: threading.Event, out: list[float]) -> None:
    proc = psutil.Process(pid)
    while not stop.is_set():
        out.append(proc.memory_info().rss / 2**20)
        stop.wait(0.05)


async def burst(url: str, n: int) -> list[int]:
    body = {
        "model": "tiny-llava",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": big_image_url()}},
                    {"type": "text", "text": "What colour is it?"},
                ],
            }
        ],
        "max_tokens": 2,
    }
    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(n))
        )
    return [r.status_code for r in answers]


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "bench-reliability")
    args = p.parse_args(argv)
    raw = sys.argv[1:] if argv is None else argv
    command = " ".join(["python bench/burst.py", shlex.join(raw)]).strip()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, registry = reliability.prepare(args.workdir)
    work = args.workdir / "burst-server"
    work.mkdir(exist_ok=True)
    (work / "port").unlink(missing_ok=True)
    extra = [
        "--engine-option",
        "max_model_len=256",
        "--engine-option",
        f"kv_cache_bytes={64 * 1024 * 1024}",
        "--max-concurrent-requests",
        str(RUNNING),
        "--max-waiting-requests",
        str(WAITING),
        "--no-state",
    ]
    with RemoteServer(work, model, registry, extra) as srv:
        assert srv.proc is not None
        idle: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=probe_health, args=(srv.url, stop, idle))
        t.start()
        time.sleep(2.0)
        stop.set()
        t.join()
        before = metric(srv.url, DECODED)
        rss_start = psutil.Process(srv.proc.pid).memory_info().rss / 2**20
        health: list[float] = []
        rss: list[float] = []
        stop = threading.Event()
        threads = [
            threading.Thread(target=probe_health, args=(srv.url, stop, health)),
            threading.Thread(target=sample_rss, args=(srv.proc.pid, stop, rss)),
        ]
        for th in threads:
            th.start()
        t0 = time.perf_counter()
        try:
            statuses = asyncio.run(burst(srv.url, args.requests))
        finally:
            seconds = time.perf_counter() - t0
            stop.set()
            for th in threads:
                th.join()
        images = metric(srv.url, DECODED) - before
    counts = {str(s): statuses.count(s) for s in sorted(set(statuses))}
    point: dict[str, Any] = {
        "command": command,
        "requests": args.requests,
        "limits": {"running": RUNNING, "waiting": WAITING},
        "status_counts": counts,
        "images_decoded": int(images),
        "admitted": statuses.count(200),
        "seconds": round(seconds, 2),
        "health_probes": len(health),
        "health_p50_ms": percentile(health, 50),
        "health_p99_ms": percentile(health, 99),
        "health_max_ms": round(max(health), 2),
        "idle_health_p99_ms": percentile(idle, 99),
        "api_rss_start_mb": round(rss_start, 1),
        "api_rss_peak_mb": round(max(rss), 1),
    }
    write_sections({"burst": point})
    print(json.dumps(point, indent=1))
    return 0 if images == statuses.count(200) else 1


if __name__ == "__main__":
    raise SystemExit(main())
