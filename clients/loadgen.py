"""A small load generator for a local smolora-serve: throughput and TTFT/ITL/e2e percentiles.

It sends `num_requests` streaming chat completions (one synthetic image each, varied
questions) with at most `concurrency` in flight, and stops issuing new ones once
`max_duration_s` has passed; it then reports requests/s, output tokens/s, and the
p50/p90/p99/mean/max of time to first token, inter-token latency and end-to-end latency,
plus errors by HTTP status. Token counts come from the server's `usage`.

It is bounded on purpose: it only targets loopback addresses (127.0.0.0/8, ::1,
localhost), at most 10,000 requests, 256 in flight and one hour. It is a smoke and
regression tool, not a replacement for vLLM's serving benchmark
(`python -m vllm.benchmarks.serve --backend openai-chat`), which drives any URL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
from PIL import Image, ImageDraw

from smolora.clients.client import image_to_data_url

MAX_REQUESTS = 10_000
MAX_CONCURRENCY = 256
MAX_DURATION_S = 3600.0
QUESTIONS = (
    "What colour is the circle?\nAnswer the question using a single word or phrase.",
    "Describe the image briefly in one sentence.",
    "How many shapes are there?",
    "Which shape is on the left?\nA. circle\nB. square\n"
    "Answer with the option's letter from the given choices directly.",
)


@dataclass(frozen=True)
class LoadgenConfig:
    """What to send.

    Attributes:
        base_url: server root on a loopback address (e.g. http://127.0.0.1:8000).
        api_key: inference key, if the server needs one.
        model: model id; None takes the server's first listed model.
        num_requests: requests to send (1..10,000).
        concurrency: requests in flight at once (1..256).
        max_duration_s: no new request starts after this many seconds (<= 3600).
        max_tokens: completion length per request.
        image_size: side of the synthetic square images.
        seed: seeds images, question order and sampling.
        request_timeout_s: per-request timeout.
    """

    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    model: str | None = None
    num_requests: int = 32
    concurrency: int = 4
    max_duration_s: float = 60.0
    max_tokens: int = 16
    image_size: int = 64
    seed: int = 0
    request_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        check_loopback(self.base_url)
        if not 1 <= self.num_requests <= MAX_REQUESTS:
            raise ValueError(f"num_requests must be in 1..{MAX_REQUESTS}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be in 1..{MAX_CONCURRENCY}")
        if not 0 < self.max_duration_s <= MAX_DURATION_S:
            raise ValueError(f"max_duration_s must be in (0, {MAX_DURATION_S:g}]")
        if self.max_tokens < 1 or self.image_size < 8 or self.request_timeout_s <= 0:
            raise ValueError("max_tokens must be >= 1, image_size >= 8 and request_timeout_s > 0")


def check_loopback(base_url: str) -> None:
    """Refuse any target that is not this machine.

    Raises:
        ValueError: the URL's host is not a loopback address.
    """
    host = urlsplit(base_url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(
        "the load generator only targets loopback addresses (127.0.0.1, ::1, localhost), "
        f"not {host!r}"
    )


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 (nearest rank), mean and max; None when there are no values."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None, "count": 0}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]

    return {
        "p50": rank(50),
        "p90": rank(90),
        "p99": rank(99),
        "mean": sum(s) / len(s),
        "max": s[-1],
        "count": len(s),
    }


@dataclass
class LoadReport:
    """Results of a run (seconds for latencies)."""

    requests_sent: int
    requests_ok: int
    errors: dict[str, int]
    duration_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    prompt_tokens: int
    ttft_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synthetic_image(size: int, rng: random.Random) -> Image.Image:
    """A few coloured shapes on a light background."""
    img = Image.new("RGB", (size, size), (235, 235, 240))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 3)):
        x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
        box = (
            x0,
            y0,
            x0 + rng.randint(size // 6, size // 2),
            y0 + rng.randint(size // 6, size // 2),
        )
        color = tuple(rng.randint(0, 255) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=color)
    return img


@dataclass
class _One:
    ok: bool
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    e2e: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0


async def _one(
    client: openai.AsyncOpenAI,
    model: str,
    image_url: str,
    question: str,
    cfg: LoadgenConfig,
    seed: int,
) -> _One:
    t0 = time.perf_counter()
    last: float | None = None
    out = _One(ok=False)
    try:
        stream = await client.chat.completions.create(
            model=model,
            max_tokens=cfg.max_tokens,
            temperature=0.0,
            seed=seed,
            stream=True,
            stream_options={"include_usage": True},
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
        )
        async for chunk in stream:
            now = time.perf_counter()
            if any(c.delta.content for c in chunk.choices):
                if out.ttft is None:
                    out.ttft = now - t0
                elif last is not None:
                    out.itl.append(now - last)
                last = now
            if chunk.usage is not None:
                out.completion_tokens = chunk.usage.completion_tokens
                out.prompt_tokens = chunk.usage.prompt_tokens
        out.e2e = time.perf_counter() - t0
        out.ok = True
    except openai.APIStatusError as e:
        out.error = str(e.status_code)
    except (openai.APIError, httpx.HTTPError) as e:
        out.error = type(e).__name__
    return out


async def run_load(cfg: LoadgenConfig, http_client: httpx.AsyncClient | None = None) -> LoadReport:
    """Run the load and measure it.

    Args:
        cfg: what to send.
        http_client: an `httpx.AsyncClient` (tests pass one); a fresh one otherwise.
    """
    rng = random.Random(cfg.seed)
    client = openai.AsyncOpenAI(
        base_url=cfg.base_url.rstrip("/") + "/v1",
        api_key=cfg.api_key or "EMPTY",
        max_retries=0,
        timeout=cfg.request_timeout_s,
        http_client=http_client,
    )
    model = cfg.model or (await client.models.list()).data[0].id
    images = [
        image_to_data_url(synthetic_image(cfg.image_size, rng))
        for _ in range(min(cfg.num_requests, 16))
    ]
    work = [
        (images[i % len(images)], QUESTIONS[rng.randrange(len(QUESTIONS))], cfg.seed + i)
        for i in range(cfg.num_requests)
    ]
    queue: asyncio.Queue[tuple[str, str, int]] = asyncio.Queue()
    for w in work:
        queue.put_nowait(w)
    results: list[_One] = []
    start = time.perf_counter()
    deadline = start + cfg.max_duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            try:
                image_url, question, seed = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await _one(client, model, image_url, question, cfg, seed))

    try:
        async with asyncio.timeout(cfg.max_duration_s + cfg.request_timeout_s):
            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
    except TimeoutError:
        pass
    duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    out_tokens = sum(r.completion_tokens for r in ok)
    conf = asdict(cfg)
    conf.pop("api_key", None)
    return LoadReport(
        requests_sent=len(results),
        requests_ok=len(ok),
        errors=errors,
        duration_s=duration,
        requests_per_s=len(ok) / duration if duration > 0 else 0.0,
        output_tokens=out_tokens,
        output_tokens_per_s=out_tokens / duration if duration > 0 else 0.0,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        ttft_s=percentiles([r.ttft for r in ok if r.ttft is not None]),
        itl_s=percentiles([x for r in ok for x in r.itl]),
        e2e_s=percentiles([r.e2e for r in ok if r.e2e is not None]),
        config=conf,
    )
