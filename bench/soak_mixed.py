"""The reliability soak: the real server under mixed traffic while a trainer publishes, then
every sampled answer replayed alone; writes the `soak` key of bench/results/reliability.json
(and the details to bench/results/soak_mixed.json).

    python bench/soak_mixed.py                    # 5 minutes, 32 clients, a publish a minute
    python bench/soak_mixed.py --minutes 2 --replay 100
    python bench/soak_mixed.py --minutes 20 --out /tmp/long.json \
        --detail bench/results/soak_mixed_20min.json     # does the memory level off?

1. Start `python -m smolora.server serve` on the `small` tiny-LLaVA preset with one published
   SMoLoRA version (`bench/server.py`'s model cache and server command), up to 8 resident
   versions, the registry watched.
2. For `--minutes`, `--concurrency` clients send requests that mix everything a user does:
   a new random image of 32, 64, 128 or 224 px, one of four instructions (short answer,
   caption, multiple choice, free question), streamed or not, the active version or a named
   resident one; greedy, 16 tokens, with the top-2 log-probabilities of every token. Every
   `--publish-every-s` seconds a new version is published into the registry (the server's
   watcher loads and activates it while the load runs). Resident set sizes of the API
   process, the engine core and the worker are sampled every 10 s.
3. Each answer is checked as it arrives: HTTP 200, a well-formed body or SSE stream ending
   in `[DONE]`, text, a finish reason, the model name `name@N`. Anything else is `failed`.
4. `--replay` answers, drawn at random, are sent again one at a time, naming the version
   that served them. An answer equal to its replay counts as equal; one that differs from a
   token where the replay's top-2 log-probabilities (= logits up to a constant) were within
   1e-4 of each other counts as a near tie; any other difference is `mismatched`.

Reported: requests, failed (by kind), mismatched, near ties, publishes, p50/p99 end-to-end
seconds, and RSS slopes (MB per minute, least squares, per process and summed) over the
second half of the run and over its last 40% (`rss_slope_final_40pct_*`: vLLM's image cache
of 0.25 GiB fills for the first ~2.5 minutes of this load, so the second half still holds
the end of that warm-up). Run it alone on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))  # bench/ holds scripts, not a package
import server as bench_server  # noqa: E402, I001 - after the path insert above
import soak  # noqa: E402
from reliability_result import RESULT, write_sections  # noqa: E402

RESULTS = Path(__file__).parent / "results"
QUESTIONS = (
    "What is shown in the image?\nAnswer the question using a single word or phrase.",
    "Provide a one-sentence caption for the provided image.",
    "Which colour dominates?\nA. red\nB. green\nC. blue\nAnswer with the option's letter "
    "from the given choices directly.",
    "Describe the texture of this picture in detail.",
)
SIZES = (32, 64, 128, 224)
MAX_TOKENS = 16
NEAR_TIE = 1e-4


@dataclass
class Spec:
    """What one request asks (enough to send it again)."""

    seed: int
    size: int
    question: int
    stream: bool
    version: int | None  # None: the active version

    def body(self, version: int | None = None, stream: bool | None = None) -> dict[str, Any]:
        named = self.version if version is None else version
        model = bench_server.SERVED_NAME + (f"@{named}" if named is not None else "")
        return {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": soak.image_url(np.random.default_rng(self.seed), self.size)
                            },
                        },
                        {"type": "text", "text": QUESTIONS[self.question]},
                    ],
                }
            ],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": 2,
            "stream": self.stream if stream is None else stream,
        }


@dataclass
class Answer:
    spec: Spec
    served: int  # the version that served it (from the model name)
    text: str
    logprobs: list[dict[str, Any]]
    e2e_s: float


@dataclass
class Tally:
    answers: list[Answer] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)

    def fail(self, kind: str) -> None:
        self.failed[kind] = self.failed.get(kind, 0) + 1


class Garbled(Exception):
    """An answer that is not a well-formed chat completion."""


def served_version(model: Any) -> int:
    if not isinstance(model, str) or "@" not in model:
        raise Garbled(f"model {model!r}")
    return int(model.rsplit("@", 1)[1])


def parse_json(r: httpx.Response) -> tuple[int, str, list[dict[str, Any]]]:
    data = r.json()
    choice = data["choices"][0]
    text = choice["message"]["content"]
    if not isinstance(text, str) or choice.get("finish_reason") not in ("length", "stop"):
        raise Garbled(f"choice {choice!r}")
    return served_version(data.get("model")), text, (choice.get("logprobs") or {}).get("content")


def parse_sse(raw: str) -> tuple[int, str, list[dict[str, Any]]]:
    events = [line[6:] for line in raw.split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        raise Garbled("stream without [DONE]")
    text, logprobs, finish, model = "", [], None, None
    for e in events[:-1]:
        chunk = json.loads(e)
        if "error" in chunk:
            raise Garbled(f"error event {chunk['error']}")
        model = chunk.get("model", model)
        for c in chunk.get("choices", []):
            text += c.get("delta", {}).get("content") or ""
            logprobs += (c.get("logprobs") or {}).get("content") or []
            finish = c.get("finish_reason") or finish
    if finish not in ("length", "stop"):
        raise Garbled(f"finish_reason {finish!r}")
    return served_version(model), text, logprobs


async def send(client: httpx.AsyncClient, spec: Spec) -> Answer:
    t0 = time.perf_counter()
    body = spec.body()
    if spec.stream:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            raw = (await r.aread()).decode()
            if r.status_code != 200:
                raise httpx.HTTPStatusError(str(r.status_code), request=r.request, response=r)
        served, text, logprobs = parse_sse(raw)
    else:
        r = await client.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise httpx.HTTPStatusError(str(r.status_code), request=r.request, response=r)
        served, text, logprobs = parse_json(r)
    if not logprobs or len(logprobs) > MAX_TOKENS:
        raise Garbled(f"{len(logprobs or [])} logprobs")
    return Answer(spec, served, text, logprobs, time.perf_counter() - t0)


def compare(original: Answer, replay: Answer) -> str:
    """equal, near_tie (first differing token was a top-2 tie within NEAR_TIE) or mismatched."""
    if original.text == replay.text:
        return "equal"
    for a, b in zip(original.logprobs, replay.logprobs):
        if a["token"] != b["token"]:
            top = sorted((t["logprob"] for t in b.get("top_logprobs", [])), reverse=True)
            if len(top) >= 2 and top[0] - top[1] <= NEAR_TIE:
                return "near_tie"
            return "mismatched"
    return "mismatched"  # same tokens, other text: never expected


def final_slopes(samples: list[dict[str, Any]], roles: tuple[str, ...]) -> dict[str, float]:
    """Least-squares RSS growth (MB/min) of each role over the last 40% of the run."""
    start = 0.6 * samples[-1]["t_s"]
    tail = [s for s in samples if s["t_s"] >= start]
    t = np.array([s["t_s"] for s in tail]) / 60.0
    return {r: float(np.polyfit(t, [s["rss_mb"][r] for s in tail], 1)[0]) for r in roles}


def publisher(
    registry: Path, model_dir: Path, every_s: float, stop: threading.Event, log: list[float]
) -> None:
    """Publish a new version every `every_s` seconds (the trainer's side)."""
    from engine import make_adapter, publish

    from smolora.adapters.smolora import SMoLoRAConfig

    cfg = bench_server.BenchConfig()
    smolora = SMoLoRAConfig(
        num_experts=cfg.num_experts, rank=cfg.rank, alpha=2.0 * cfg.rank, dropout=0.0
    )
    seed = 100
    while not stop.wait(every_s):
        seed += 1
        publish(registry, model_dir, make_adapter(model_dir, seed, smolora)[0], f"task{seed}")
        log.append(time.monotonic())


async def run_soak(
    url: str, pid: int, args: argparse.Namespace, resident: list[int]
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {bench_server.API_KEY}"}
    tally = Tally()
    samples: list[dict[str, Any]] = []
    pick = random.Random(0)
    seeds = iter(range(10_000_000))
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        start = time.monotonic()
        deadline = start + args.minutes * 60

        async def one_client() -> None:
            while time.monotonic() < deadline:
                spec = Spec(
                    seed=next(seeds),
                    size=pick.choice(SIZES),
                    question=pick.randrange(len(QUESTIONS)),
                    stream=pick.random() < 0.5,
                    version=pick.choice(resident) if pick.random() < 0.5 else None,
                )
                try:
                    tally.answers.append(await send(client, spec))
                except httpx.HTTPStatusError as e:
                    tally.fail(f"http_{e.response.status_code}")
                except (Garbled, KeyError, ValueError, TypeError, IndexError) as e:
                    tally.fail(f"garbled:{type(e).__name__}")
                except httpx.HTTPError as e:
                    tally.fail(type(e).__name__)

        async def watch_versions() -> None:
            while time.monotonic() < deadline:
                r = await client.get("/v1/models")
                listed = [int(m["id"].split("@")[1]) for m in r.json()["data"] if "@" in m["id"]]
                resident[:] = listed or resident
                await asyncio.sleep(1.0)

        async def sampler() -> None:
            while time.monotonic() < deadline:
                samples.append(
                    {"t_s": round(time.monotonic() - start, 1), "rss_mb": soak.rss_mb(pid)}
                )
                await asyncio.sleep(10.0)

        await asyncio.gather(
            sampler(), watch_versions(), *(one_client() for _ in range(args.concurrency))
        )
        samples.append({"t_s": round(time.monotonic() - start, 1), "rss_mb": soak.rss_mb(pid)})
        seconds = time.monotonic() - start

        outcomes: dict[str, int] = {"equal": 0, "near_tie": 0, "mismatched": 0}
        examples: list[dict[str, Any]] = []
        for original in random.Random(1).sample(
            tally.answers, min(args.replay, len(tally.answers))
        ):
            spec = replace(original.spec, version=original.served, stream=False)
            try:
                replay = await send(client, spec)
            except (httpx.HTTPError, Garbled) as e:
                tally.fail(f"replay:{type(e).__name__}")
                continue
            verdict = compare(original, replay)
            outcomes[verdict] += 1
            if verdict != "equal" and len(examples) < 10:
                examples.append(
                    {"verdict": verdict, "original": original.text, "replay": replay.text}
                )
    roles = ("api", "engine_core", "worker")
    slopes = {r: soak.slope_mb_per_min(samples, r) for r in roles}
    final = final_slopes(samples, roles)
    e2e = np.array([a.e2e_s for a in tally.answers])
    return {
        "seconds": round(seconds, 1),
        "requests": len(tally.answers) + sum(tally.failed.values()),
        "failed": sum(tally.failed.values()),
        "failed_by_kind": tally.failed,
        "replayed": sum(outcomes.values()),
        "mismatched": outcomes["mismatched"],
        "near_ties": outcomes["near_tie"],
        "replay_examples": examples,
        "streamed": sum(a.spec.stream for a in tally.answers),
        "named_version": sum(a.spec.version is not None for a in tally.answers),
        "versions_served": sorted({a.served for a in tally.answers}),
        "rss_slope_mb_per_min": round(sum(slopes.values()), 2),
        "rss_slope_by_process_mb_per_min": {k: round(v, 2) for k, v in slopes.items()},
        "rss_slope_final_40pct_mb_per_min": round(sum(final.values()), 2),
        "rss_slope_final_40pct_by_process_mb_per_min": {k: round(v, 2) for k, v in final.items()},
        "rss_start_mb": samples[0]["rss_mb"],
        "rss_end_mb": samples[-1]["rss_mb"],
        "p50_e2e_s": round(float(np.percentile(e2e, 50)), 3),
        "p99_e2e_s": round(float(np.percentile(e2e, 99)), 3),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--publish-every-s", type=float, default=60.0)
    p.add_argument("--replay", type=int, default=300, help="answers replayed alone")
    p.add_argument("--out", type=Path, default=RESULT)
    p.add_argument(
        "--detail", type=Path, default=RESULTS / "soak_mixed.json", help="samples and examples"
    )
    raw = list(argv if argv is not None else sys.argv[1:])
    args = p.parse_args(raw)
    command = " ".join(["python", "bench/soak_mixed.py", *(shlex.quote(a) for a in raw)])
    cfg = replace(bench_server.BenchConfig(), concurrency=args.concurrency, max_num_seqs=16)
    model_dir = bench_server.prepare_model(cfg)
    with tempfile.TemporaryDirectory(prefix="bench-soak-mixed-") as tmp:
        work = Path(tmp)
        registry, _ = bench_server.prepare_adapters(cfg, model_dir, work)
        srv = bench_server.our_server(cfg, model_dir, work, registry)
        srv.cmd += ["--max-resident-versions", "8", "--watch-interval", "1"]
        srv.start(cfg.start_timeout_s)
        stop, publishes = threading.Event(), []
        thread = threading.Thread(
            target=publisher,
            args=(registry, model_dir, args.publish_every_s, stop, publishes),
            daemon=True,
        )
        try:
            assert srv.proc is not None
            thread.start()
            point = asyncio.run(run_soak(srv.url, srv.proc.pid, args, [1]))
        finally:
            stop.set()
            thread.join(timeout=120)
            srv.stop()
    point["publishes"] = len(publishes)
    detail = {
        "command": command,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "config": {
            "preset": cfg.preset,
            "minutes": args.minutes,
            "concurrency": args.concurrency,
            "publish_every_s": args.publish_every_s,
            "image_px": SIZES,
            "max_tokens": MAX_TOKENS,
        },
        **point,
    }
    args.detail.write_text(json.dumps(detail, indent=2) + "\n")
    keys = (
        "seconds",
        "requests",
        "failed",
        "mismatched",
        "near_ties",
        "replayed",
        "rss_slope_mb_per_min",
        "rss_slope_final_40pct_mb_per_min",
        "p50_e2e_s",
        "p99_e2e_s",
        "publishes",
    )
    result = write_sections({"soak": {"command": command, **{k: point[k] for k in keys}}}, args.out)
    print(json.dumps(result["soak"], indent=1))
    return 0 if point["failed"] == 0 and point["mismatched"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
