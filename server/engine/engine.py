"""`SMoLoRAEngine`: the `EngineClient` on vLLM's `AsyncLLM` with our registered architecture.

What it does:
- starts `AsyncLLM` for a LLaVA folder under our architecture (`hf_overrides`), with the
  row tracker as a logits processor and our worker extension, prefix caching and chunked
  prefill off, async scheduling off (so a finished request never runs an extra step that
  would count in its trace), eager mode;
- turns a `GenerateRequest` into a vLLM prompt + `SamplingParams` whose `extra_args` carry
  the request key, version slot, instruction embedding and VU-routing mode, and whose image
  carries the same key (`mm_processor_kwargs`) for the projector;
- passes the request's sampling values (temperature, top-p/top-k/min-p, penalties,
  min_tokens, ignore_eos, seed, logprobs) to vLLM's `SamplingParams` as they are, and
  returns per-token log-probabilities when asked;
- passes stop strings to vLLM (`SamplingParams.stop`, the stop string excluded from the
  output), so a request cut by a stop string finishes in the engine with reason "stop" and
  its routing trace like any other (vLLM aborts it in the core once its detokenizer sees
  the string; a step already scheduled may still run, so the trace's mean fusion weights
  can include a token generated past the stop string and discarded);
- streams token deltas, then fetches the routing trace in a batched RPC;
- loads checkpoint versions into free slots while serving, activates them, unloads inactive
  unpinned ones (freeing their slot), reports health.

Version semantics: a request keeps the version it started with (its slot stays pinned until
it finishes); loading copies into another slot between engine steps; activation only changes
what new requests get. A corrupt or mismatched checkpoint is refused before anything is
copied and the serving version keeps serving.

What it does not do: HTTP, chat templating, image decoding, instruction extraction or
embedding (the server's job); it neither reads nor writes environment variables (entry points
prepare vLLM's with `smolora.server.cli.prepare_vllm_environment`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from smolora.adapters.checkpoint import (
    CheckpointError,
    base_model_fingerprint,
    latest_version,
    read_manifest,
)
from smolora.server.engine.checkpoint_fit import check_fit
from smolora.server.engine.config import (
    ARCHITECTURE,
    EXTRA_ARGS_KEY,
    HF_CONFIG_KEY,
    KERNEL_CONFIG_KEY,
    MM_KEY,
    AdapterLayout,
    EngineConfig,
    EngineConfigError,
)
from smolora.server.engine.protocol import (
    EngineHealth,
    EngineUnavailableError,
    GenerateChunk,
    GenerateRequest,
    InvalidRequestError,
    LayerRoute,
    RequestTrace,
    TokenLogprob,
    VersionInfo,
    VersionLoadError,
    VersionNotResidentError,
)
from smolora.server.engine.row_tracker import ROW_TRACKER
from smolora.server.engine.traces import TraceCollector
from smolora.server.engine.versions import VersionTable, resolve_vu_routing
from smolora.server.engine.worker_extension import WORKER_EXTENSION, SlotLoadResult

#: How often a hot-load asks the worker whether the checkpoint is verified (seconds).
STAGE_POLL_S = 0.02
#: LoRA weight bytes a hot-load copies into a slot per worker RPC (between two engine steps).
COPY_BYTES_PER_CALL = 32 << 20

logger = logging.getLogger(__name__)


def resolve_layout(config: EngineConfig) -> AdapterLayout:
    """The adapter layout to allocate: explicit, or from the first checkpoint's manifest."""
    if not config.adapters:
        return AdapterLayout(enabled=False)
    if config.layout is not None:
        return config.layout
    assert config.checkpoint is not None
    manifest = read_manifest(config.checkpoint)
    if manifest.adapter_kind != "smolora":
        raise EngineConfigError(
            f"{config.checkpoint}: adapter_kind {manifest.adapter_kind!r} is not 'smolora'"
        )
    return AdapterLayout.from_smolora_config(
        manifest.adapter_config,
        config.num_slots,
        config.trace_step_routes,
        config.cpu_kernel_max_tokens,
        config.cpu_overlap,
    )


def engine_args(config: EngineConfig, layout: AdapterLayout) -> dict[str, Any]:
    """vLLM engine arguments for a config (also used by benchmarks to start `LLM`)."""
    overrides: dict[str, Any] = {"architectures": [ARCHITECTURE]}
    args: dict[str, Any] = dict(
        model=str(config.model_dir),
        hf_overrides=overrides,
        dtype=config.dtype,
        enforce_eager=config.enforce_eager,
        enable_prefix_caching=False,
        enable_chunked_prefill=config.chunked_prefill,
        max_num_seqs=config.max_num_seqs,
        kv_cache_memory_bytes=config.kv_cache_bytes,
        mm_processor_cache_gb=config.mm_cache_gb,
        limit_mm_per_prompt={"image": 1},
        seed=config.seed,
        tensor_parallel_size=config.tensor_parallel_size,
        async_scheduling=False,
    )
    if config.max_model_len is not None:
        args["max_model_len"] = config.max_model_len
    if config.max_num_batched_tokens is not None:
        args["max_num_batched_tokens"] = config.max_num_batched_tokens
    if layout.enabled:
        overrides[HF_CONFIG_KEY] = layout.to_dict()
        overrides[KERNEL_CONFIG_KEY] = config.kernel.to_dict()
        args["logits_processors"] = [ROW_TRACKER]
        args["worker_extension_cls"] = WORKER_EXTENSION
    args.update(config.extra_engine_args)
    return args


def _instruction_list(instruction: Any, dim: int) -> list[float]:
    try:
        values = [
            float(v)
            for v in (instruction.tolist() if hasattr(instruction, "tolist") else instruction)
        ]
    except (TypeError, ValueError):
        raise InvalidRequestError(
            "instruction must be a sequence of floats (the instruction embedding)"
        ) from None
    if len(values) != dim:
        raise InvalidRequestError(
            f"instruction embedding has {len(values)} dims; this engine's adapters read {dim}"
        )
    if not all(math.isfinite(v) for v in values):
        raise InvalidRequestError("instruction embedding contains NaN or inf")
    return values


def _trace_from_raw(raw: dict[str, Any], version: int, request: GenerateRequest) -> RequestTrace:
    layers = [
        LayerRoute(
            layer=e["layer"],
            vu_expert=int(e["vu_expert"]),
            if_expert=int(e["if_expert"]),
            w_vu=float(e["w_vu"]),
            w_if=float(e["w_if"]),
            vu_steps=e.get("vu_steps"),
        )
        for e in raw["layers"]
    ]
    return RequestTrace(
        version=version,
        vu_routing=raw["vu_routing"],
        instruction_source=request.instruction_source,
        instruction_similarity=request.instruction_similarity,
        layers=layers,
        exact=bool(raw.get("exact", True)),
    )


def _token_logprobs(token_ids: Sequence[int], positions: Any, top: int) -> list[TokenLogprob]:
    """vLLM's per-position `{token_id: Logprob}` dicts as one `TokenLogprob` per generated token,
    with the `top` most likely tokens of each position (vLLM adds the chosen token when it is
    not among them)."""
    out: list[TokenLogprob] = []
    for token_id, entries in zip(token_ids, positions or ()):
        chosen = entries[token_id]
        ranked = sorted(
            (
                (lp.rank if lp.rank is not None else math.inf, tid, lp)
                for tid, lp in entries.items()
            ),
            key=lambda e: (e[0], -e[2].logprob),
        )
        out.append(
            TokenLogprob(
                token_id=int(token_id),
                token=chosen.decoded_token or "",
                logprob=float(chosen.logprob),
                top=[
                    TokenLogprob(int(tid), lp.decoded_token or "", float(lp.logprob))
                    for _, tid, lp in ranked[:top]
                ],
            )
        )
    return out


class SMoLoRAEngine:
    """vLLM `AsyncLLM` serving a LLaVA model with routed SMoLoRA adapters.

    Create with `await SMoLoRAEngine.start(config)` inside the event loop that will use it.
    """

    #: Most images one request may carry (vLLM's `limit_mm_per_prompt`).
    max_images_per_prompt = 1

    def __init__(
        self,
        config: EngineConfig,
        llm: Any,
        layout: AdapterLayout,
        attach_info: dict[str, Any] | None,
        fingerprint: str | None,
    ) -> None:
        self.config = config
        self.max_model_len = int(llm.model_config.max_model_len)
        self.layout = layout
        self._llm = llm
        self._attach = attach_info or {}
        self._fingerprint = fingerprint
        self._expected_shapes = {
            k: tuple(v) for k, v in self._attach.get("expected_shapes", {}).items()
        }
        self._versions = VersionTable(layout.num_slots) if layout.enabled else None
        self._keys = itertools.count(1)
        self._load_lock = asyncio.Lock()
        self._in_flight = 0
        self._traces = TraceCollector(self._fetch_traces, max_batch=config.trace_batch_window)
        self._closed = False
        #: vLLM's `vllm:*` metrics of this engine, a prometheus_client registry (set by `start`).
        self.metrics_registry: Any = None

    # -- lifecycle --------------------------------------------------------------------------
    @classmethod
    async def start(cls, config: EngineConfig) -> SMoLoRAEngine:
        """Start vLLM, attach the hook and load `config.checkpoint`.

        vLLM's engine start (tens of seconds) runs on the calling event loop, which it blocks:
        its async client binds to that loop.

        Raises:
            EngineConfigError: the configuration cannot serve SMoLoRA correctly.
            VersionLoadError: the first checkpoint was refused.
        """
        from prometheus_client import CollectorRegistry
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from smolora.server.engine.vllm_metrics import prometheus_stat_logger

        layout = resolve_layout(config)
        fingerprint = (
            await asyncio.to_thread(base_model_fingerprint, config.model_dir)
            if layout.enabled
            else None
        )
        # vLLM's vllm:* metrics go to this engine's own registry (served beside ours on /metrics).
        metrics_registry = CollectorRegistry()
        llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**engine_args(config, layout)),
            stat_loggers=[prometheus_stat_logger(metrics_registry)],
        )
        attach = None
        try:
            if layout.enabled and llm.vllm_config.use_v2_model_runner:
                raise EngineConfigError(
                    "SMoLoRA routing needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0 "
                    "before starting (smolora.server.cli.prepare_vllm_environment does)"
                )
            if layout.enabled:
                attach = (await llm.collective_rpc("smolora_attach"))[0]
            engine = cls(config, llm, layout, attach, fingerprint)
            engine.metrics_registry = metrics_registry
            if layout.enabled and config.checkpoint is not None:
                await engine.load_version(config.checkpoint, activate=True)
        except BaseException:
            llm.shutdown()
            raise
        logger.info(
            "SMoLoRA engine ready (adapters=%s, slots=%d)", layout.enabled, layout.num_slots
        )
        return engine

    async def shutdown(self) -> None:
        """Stop vLLM's engine core and its processes."""
        if not self._closed:
            self._closed = True
            self._llm.shutdown()

    @property
    def vllm(self) -> Any:
        """The underlying `vllm.v1.engine.async_llm.AsyncLLM` (for tests and diagnostics)."""
        return self._llm

    @property
    def trace_rpc_count(self) -> int:
        """How many trace RPCs were issued so far (batching makes it far below requests)."""
        return self._traces.rpc_count

    def _check_open(self) -> None:
        if self._closed or self._llm.errored:
            raise EngineUnavailableError("the engine is not running; restart the server")

    # -- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream one request (see `EngineClient.generate`)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        self._check_open()
        use_adapter = self.layout.enabled and request.instruction is not None
        if request.instruction is not None and not self.layout.enabled:
            raise InvalidRequestError("this engine serves the base model only; send no instruction")
        request_id = request.request_id or uuid.uuid4().hex
        key = next(self._keys)
        slot: int | None = None
        version: int | None = None
        extra: dict[str, Any] | None = None
        if use_adapter:
            assert self._versions is not None
            instruction = _instruction_list(request.instruction, self.layout.instruction_dim)
            slot, version = self._versions.acquire(request.version)
            extra = {
                EXTRA_ARGS_KEY: {
                    "key": key,
                    "slot": slot,
                    "instruction": instruction,
                    "vu_routing": resolve_vu_routing(
                        request.vu_routing, self.config.vu_routing, self._versions.vu_routing(slot)
                    ),
                }
            }
        elif request.version is not None:
            raise InvalidRequestError("a version was named but no instruction embedding was given")
        try:
            try:
                params = SamplingParams(
                    temperature=request.temperature,
                    top_p=request.top_p,
                    max_tokens=request.max_tokens,
                    seed=request.seed,
                    top_k=request.top_k,
                    min_p=request.min_p,
                    repetition_penalty=request.repetition_penalty,
                    presence_penalty=request.presence_penalty,
                    frequency_penalty=request.frequency_penalty,
                    min_tokens=request.min_tokens,
                    logprobs=request.logprobs,
                    stop=list(request.stop) if request.stop else None,
                    include_stop_str_in_output=False,
                    stop_token_ids=request.stop_token_ids,
                    ignore_eos=request.ignore_eos,
                    output_kind=RequestOutputKind.DELTA,
                    extra_args=extra,
                )
            except (ValueError, VLLMClientError) as e:  # vLLM's own checks of the sampling values
                raise InvalidRequestError(str(e)) from e
            prompt: dict[str, Any] = (
                {"prompt": request.prompt}
                if isinstance(request.prompt, str)
                else {"prompt_token_ids": list(request.prompt)}
            )
            if request.image is not None:
                prompt["multi_modal_data"] = {"image": request.image}
                if use_adapter:
                    prompt["mm_processor_kwargs"] = {MM_KEY: key}
            self._in_flight += 1
            try:
                async for chunk in self._stream(
                    prompt, params, request_id, key, version, request, use_adapter
                ):
                    yield chunk
            finally:
                self._in_flight -= 1
        finally:
            if slot is not None and self._versions is not None:
                self._versions.release(slot)

    async def _stream(
        self,
        prompt: dict[str, Any],
        params: Any,
        request_id: str,
        key: int,
        version: int | None,
        request: GenerateRequest,
        use_adapter: bool,
    ) -> AsyncIterator[GenerateChunk]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        prompt_tokens: int | None = None
        try:
            async for out in self._llm.generate(prompt, params, request_id):
                if prompt_tokens is None and out.prompt_token_ids is not None:
                    prompt_tokens = len(out.prompt_token_ids)
                completion = out.outputs[0]
                logprobs = (
                    _token_logprobs(completion.token_ids, completion.logprobs, request.logprobs)
                    if request.logprobs is not None
                    else None
                )
                if not out.finished:
                    yield GenerateChunk(
                        request_id,
                        list(completion.token_ids),
                        completion.text,
                        version=version,
                        logprobs=logprobs,
                    )
                    continue
                trace = None
                if use_adapter and request.trace and version is not None:
                    raw = await self._traces.fetch(key)
                    trace = _trace_from_raw(raw, version, request) if raw is not None else None
                reason = (
                    completion.finish_reason
                    if completion.finish_reason in ("stop", "length", "abort")
                    else "stop"
                )
                yield GenerateChunk(
                    request_id,
                    list(completion.token_ids),
                    completion.text,
                    finished=True,
                    finish_reason=reason,
                    version=version,
                    trace=trace,
                    prompt_tokens=prompt_tokens,
                    logprobs=logprobs,
                )
        except EngineDeadError as e:
            raise EngineUnavailableError(f"the engine core died: {e}") from e
        except (
            VLLMClientError,
            ValueError,
        ) as e:  # input validation (e.g. image/placeholder mismatch, too long)
            raise InvalidRequestError(str(e)) from e

    async def _fetch_traces(self, keys: list[int]) -> dict[Any, Any]:
        return (await self._llm.collective_rpc("smolora_fetch_traces", args=(keys,)))[0]

    # -- versions -----------------------------------------------------------------------------
    def _require_adapters(self) -> VersionTable:
        if self._versions is None:
            raise InvalidRequestError("this engine was started without adapters")
        return self._versions

    async def load_version(self, path: str | Path, activate: bool = True) -> VersionInfo:
        """Load a checkpoint folder into a free slot without disturbing in-flight requests.

        The front end reads only the manifest (version number, tasks, instruction table,
        and whether its adapter fits the resident layout); the worker reads and verifies
        the tensors on a background thread, then copies them between engine steps, a byte
        budget per RPC, so a load reads and hashes the files once and running streams wait
        for at most one part of the copy per step.

        Raises:
            VersionLoadError: corrupt, unknown format, other base model, or other layout
                (nothing was copied; the serving versions are untouched).
            NoFreeSlotError: every slot is active or serving requests.
        """
        versions = self._require_adapters()
        self._check_open()
        path = Path(path)
        async with self._load_lock:
            t0 = time.perf_counter()
            try:
                manifest = await asyncio.to_thread(read_manifest, path)
                check_fit(manifest, None, self.layout, self._expected_shapes)
            except CheckpointError as e:
                raise VersionLoadError(f"{path}: {e}", type(e).__name__) from e
            if manifest.version is None:
                raise VersionLoadError(
                    f"{path}: manifest has no version; publish it with publish_checkpoint",
                    "CheckpointError",
                )
            existing = versions.slot_of(manifest.version)
            if existing is not None and versions.info(existing).path == path.resolve():
                info = versions.info(existing)
            else:
                if existing is not None:
                    raise VersionLoadError(
                        f"{path}: version {manifest.version} is already loaded from another folder",
                        "CheckpointError",
                    )
                slot = versions.reserve_for_load()
                result = await self._load_slot(slot, path, manifest.version)
                versions.install(
                    slot,
                    manifest.version,
                    path.resolve(),
                    manifest.tasks,
                    manifest.instruction_types,
                    load_seconds=time.perf_counter() - t0,
                    vu_routing=manifest.adapter_config.get("vu_routing", "pinned"),
                )
                info = versions.info(slot)
                logger.info(
                    "loaded version %d (%s) into slot %d: verified in %.3f s, copied in %.3f s",
                    manifest.version,
                    path,
                    slot,
                    result.verify_seconds,
                    result.copy_seconds,
                )
            if activate:
                versions.activate(manifest.version)
                info = versions.info(versions.slot_of(manifest.version))  # type: ignore[arg-type]
            return info

    async def _load_slot(self, slot: int, path: Path, version: int) -> SlotLoadResult:
        """Have the worker read, verify and copy `path` into the reserved `slot`: verified
        on a worker thread (polled), then copied a byte budget per RPC.

        Raises:
            VersionLoadError: the worker refused the checkpoint (the slot's previous version
                is resident again: nothing was copied).
        """
        assert self._versions is not None
        rpc = self._llm.collective_rpc
        try:
            await rpc("smolora_stage_slot", args=(slot, str(path), self._fingerprint))
            # Every tensor-parallel rank reads and verifies its own copy: wait for all of them.
            raws = await rpc("smolora_staged_result", args=(slot,))
            while any(raw is None for raw in raws):
                await asyncio.sleep(STAGE_POLL_S)
                raws = await rpc("smolora_staged_result", args=(slot,))
            results = [SlotLoadResult.from_wire(raw) for raw in raws]
            refused = [r for r in results if r.refused is not None]
            if refused:
                await rpc("smolora_cancel_staged", args=(slot,))
                self._versions.abandon(slot, copied=False)
                raise VersionLoadError(f"{path}: {refused[0].message}", refused[0].refused)
            changed = [r.version for r in results if r.version != version]
            if changed:
                await rpc("smolora_cancel_staged", args=(slot,))
                self._versions.abandon(slot, copied=False)
                raise VersionLoadError(
                    f"{path}: the manifest changed while loading (version {version} -> "
                    f"{changed[0]}); published versions must not be rewritten",
                    "IntegrityError",
                )
            record = {"version": version, "path": str(path)}
            first: int | None = 0
            while first is not None:
                raws = await rpc(
                    "smolora_copy_staged", args=(slot, first, COPY_BYTES_PER_CALL, record)
                )
                results = [SlotLoadResult.from_wire(raw) for raw in raws]
                if len({r.next_part for r in results}) != 1:  # the same layout on every rank
                    raise RuntimeError(f"tensor-parallel ranks copied different parts: {results}")
                result = results[0]
                first = result.next_part
            return result
        except VersionLoadError:
            raise
        except BaseException:
            self._versions.abandon(slot)
            with contextlib.suppress(Exception):
                await rpc("smolora_cancel_staged", args=(slot,))
            raise

    async def load_latest(self, registry: str | Path, activate: bool = True) -> VersionInfo:
        """Load (if needed) and activate the registry's latest version."""
        entry = latest_version(registry)
        if entry is None:
            raise VersionNotResidentError(f"{registry}: no complete checkpoint version")
        return await self.load_version(entry.path, activate=activate)

    async def activate(self, version: int) -> VersionInfo:
        """Make a resident version the default for new requests."""
        versions = self._require_adapters()
        slot = versions.activate(version)
        return versions.info(slot)

    async def unload_version(self, version: int) -> VersionInfo:
        """Free the slot of a resident, inactive version that no in-flight request is pinned to.

        The slot is freed in the front-end table first (from then on no request can get the
        version, and a later load may reuse the slot); the worker then forgets the slot's
        version. In-flight requests of other versions are untouched.

        Returns:
            The version's info as it was before unloading (`slot` is the freed slot).

        Raises:
            VersionNotResidentError: not resident.
            VersionInUseError: the active version, or pinned by in-flight requests.
        """
        versions = self._require_adapters()
        self._check_open()
        async with self._load_lock:
            slot = versions.slot_of(version)
            info = versions.info(slot) if slot is not None else None
            freed = versions.unload(version)  # raises before anything changes
            assert info is not None
            await self._llm.collective_rpc("smolora_unload_slot", args=(freed,))
            logger.info("unloaded version %d from slot %d", version, freed)
            info.active, info.in_flight = False, 0
            return info

    def list_versions(self) -> list[VersionInfo]:
        """Resident versions, by slot (empty without adapters)."""
        return self._versions.resident() if self._versions is not None else []

    def active_version(self) -> VersionInfo | None:
        """The version new requests get by default."""
        if self._versions is None or self._versions.active_version is None:
            return None
        return self._versions.info(self._versions.slot_of(self._versions.active_version))  # type: ignore[arg-type]

    # -- health -------------------------------------------------------------------------------
    async def health(self, detail: bool = True) -> EngineHealth:
        """Liveness (vLLM has not marked the engine core dead) and adapter state; with
        `detail`, the worker's counters too (one RPC)."""
        ok = not self._closed and not self._llm.errored
        stats: dict[str, Any] = {}
        if ok:
            try:
                await self._llm.check_health()
                if detail and self.layout.enabled:
                    ranks = await self._llm.collective_rpc("smolora_stats")
                    stats = dict(ranks[0])
                    # what each tensor-parallel rank holds (one entry at TP=1)
                    stats["rank_slot_versions"] = [r["slot_versions"] for r in ranks]
            except Exception as e:  # a dead core raises here
                ok = False
                stats = {"error": f"{type(e).__name__}: {e}"}
        resident = {v.slot: v.version for v in self.list_versions() if v.slot is not None}
        active = self._versions.active_version if self._versions is not None else None
        return EngineHealth(
            ok=ok,
            adapters=self.layout.enabled,
            active_version=active,
            resident_versions=resident,
            in_flight=self._in_flight,
            detail=stats,
        )


async def collect(engine: Any, request: GenerateRequest) -> GenerateChunk:
    """Run a request to completion; returns its final chunk with all token ids, text and
    logprobs."""
    ids: list[int] = []
    text = ""
    logprobs: list[TokenLogprob] = []
    last: GenerateChunk | None = None
    async for chunk in engine.generate(request):
        ids.extend(chunk.token_ids)
        text += chunk.text
        logprobs.extend(chunk.logprobs or ())
        last = chunk
    assert last is not None and last.finished
    last.token_ids, last.text = ids, text
    if last.logprobs is not None:
        last.logprobs = logprobs
    return last


async def collect_all(engine: Any, requests: Sequence[GenerateRequest]) -> list[GenerateChunk]:
    """`collect` all requests concurrently; results in request order."""
    return list(await asyncio.gather(*(collect(engine, r) for r in requests)))
