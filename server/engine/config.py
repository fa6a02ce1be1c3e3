"""Typed configuration of the vLLM-backed SMoLoRA engine.

Two concerns, two dataclasses:
- `AdapterLayout` is what the model inside vLLM's worker needs to allocate the resident
  adapter tensors: the adapter's shape, which is a `SMoLoRAConfig`'s (experts, rank,
  instruction width, target layers: built from one by `from_smolora_config`, returned as
  one by `adapter_shape`, validated by `SMoLoRAConfig`'s own rules), plus serving-only
  fields (version slots, trace depth). It travels to the worker inside the HF config
  (`hf_overrides`), so it must stay JSON-serialisable.
- `EngineConfig` is what a caller of `SMoLoRAEngine` chooses: the model folder, the first
  checkpoint, the vLLM scheduler knobs we allow, and the serving defaults.

Neither starts anything; `engine.py` turns an `EngineConfig` into vLLM engine arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from smolora.adapters.config_dicts import config_from_dict, config_to_dict
from smolora.adapters.precision import resolve_dtype, serving_device
from smolora.adapters.smolora.config import (
    DEFAULT_TARGET_MODULES,
    INSTRUCTION_DIM,
    VU_ROUTINGS,
    SMoLoRAConfig,
    VuRouting,
)
from smolora.server.engine.kernel_config import KernelConfig

#: The architecture name our vLLM model class is registered under.
ARCHITECTURE = "SMoLoRALlavaForConditionalGeneration"
#: The key under which `AdapterLayout` travels in the HF config.
HF_CONFIG_KEY = "smolora_engine"
#: The HF-config key that carries the `KernelConfig` to the worker's model.
KERNEL_CONFIG_KEY = "smolora_kernel"
#: The key of our per-request dict in `SamplingParams.extra_args`.
EXTRA_ARGS_KEY = "smolora"
#: The `mm_processor_kwargs` key that tags a request's image with its request key.
MM_KEY = "smolora_key"

#: Target-module suffixes the engine knows how to route (vLLM fuses gate/up into one linear).
SUPPORTED_TARGETS = frozenset(DEFAULT_TARGET_MODULES)

CpuOverlap = Literal["auto", "on", "off"]


class EngineConfigError(ValueError):
    """An engine configuration cannot serve SMoLoRA correctly; the message says what to change."""


def _check_cpu_overlap(value: str) -> None:
    if value not in get_args(CpuOverlap):
        raise EngineConfigError(f"cpu_overlap must be 'auto', 'on' or 'off', got {value!r}")


@dataclass
class AdapterLayout:
    """Shape of the adapter tensors resident in the engine.

    The four shape fields are `SMoLoRAConfig`'s fields of the same names (see there); a
    serving engine builds its layout from the first checkpoint's config
    (`from_smolora_config`) and `check_fit` holds every later checkpoint to it.

    Attributes:
        enabled: False builds the plain base model (no adapter tensors, no routing hook).
        num_experts: `SMoLoRAConfig.num_experts`.
        rank: `SMoLoRAConfig.rank` (total rank).
        instruction_dim: `SMoLoRAConfig.instruction_dim`.
        target_modules: `SMoLoRAConfig.target_modules`, a subset of `SUPPORTED_TARGETS`.
        num_slots: how many checkpoint versions are resident at once (stacked slots).
        trace_step_routes: in `per_step` mode, how many decode steps' VU routes are kept per
            request for the trace (0 keeps none; the prefill route is always kept).
        cpu_kernel_max_tokens: forward steps of at most this many tokens run the routed layers
            through the compiled CPU kernel (`routed_kernel.py`; float32 or bfloat16 on CPU,
            when a C compiler is present); larger steps use grouped matmuls. 0 never uses
            the kernel (the kernel is the faster path at every step size measured;
            `bench/README.md`, History).
        cpu_overlap: "auto", "on" or "off": run the MLP layers' routed deltas (CPU kernel) on a
            helper thread while the worker runs the layer's base matmul
            (`overlap_helper.OverlapHelper`). "auto" does when the worker computes on one thread
            and a CPU outside its binding exists (vLLM keeps one for the engine core and the
            API server). That pays where that CPU is otherwise idle (an engine embedded in a
            program); the HTTP server's own processes keep it busy, so the server sets "off".
    """

    enabled: bool = True
    num_experts: int = 8
    rank: int = 128
    instruction_dim: int = INSTRUCTION_DIM
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    num_slots: int = 2
    trace_step_routes: int = 0
    cpu_kernel_max_tokens: int = 8192
    cpu_overlap: CpuOverlap = "auto"

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        _check_cpu_overlap(self.cpu_overlap)
        try:
            self.adapter_shape()  # the shape rules are SMoLoRAConfig's
        except ValueError as e:
            raise EngineConfigError(f"adapter layout: {e}") from None
        unknown = set(self.target_modules) - SUPPORTED_TARGETS
        if unknown or not self.target_modules:
            raise EngineConfigError(
                f"target_modules {sorted(unknown) or '[]'} cannot be routed by the engine; "
                f"choose a non-empty subset of {sorted(SUPPORTED_TARGETS)}"
            )
        if not 1 <= self.num_slots <= 16:
            raise EngineConfigError(f"num_slots must be in [1, 16], got {self.num_slots}")
        if self.trace_step_routes < 0:
            raise EngineConfigError(f"trace_step_routes must be >= 0, got {self.trace_step_routes}")
        if self.cpu_kernel_max_tokens < 0:
            raise EngineConfigError(
                f"cpu_kernel_max_tokens must be >= 0, got {self.cpu_kernel_max_tokens}"
            )

    def adapter_shape(self) -> SMoLoRAConfig:
        """The shape fields as a `SMoLoRAConfig` (its other fields at their defaults).

        Raises:
            ValueError: the shape breaks one of `SMoLoRAConfig`'s rules.
        """
        return SMoLoRAConfig(
            num_experts=self.num_experts,
            rank=self.rank,
            instruction_dim=self.instruction_dim,
            target_modules=self.target_modules,
        )

    @property
    def experts_per_group(self) -> int:
        """E/2 (`SMoLoRAConfig.experts_per_group`)."""
        return self.num_experts // 2

    @property
    def expert_rank(self) -> int:
        """r / E (`SMoLoRAConfig.expert_rank`)."""
        return self.rank // self.num_experts

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterLayout:
        return config_from_dict(cls, data, EngineConfigError, "adapter layout")

    @classmethod
    def from_smolora_config(
        cls,
        adapter_config: SMoLoRAConfig | Mapping[str, Any],
        num_slots: int,
        trace_step_routes: int,
        cpu_kernel_max_tokens: int = 8192,
        cpu_overlap: CpuOverlap = "auto",
    ) -> AdapterLayout:
        """The layout a checkpoint's adapter needs: its `SMoLoRAConfig` (or the manifest's
        dict of one) plus the serving fields.

        Raises:
            EngineConfigError: the dict is not a valid `SMoLoRAConfig`.
        """
        if isinstance(adapter_config, SMoLoRAConfig):
            config = adapter_config
        else:
            try:
                config = SMoLoRAConfig.from_dict(dict(adapter_config))
            except (TypeError, ValueError) as e:
                raise EngineConfigError(f"adapter config: {e}") from None
        return cls(
            enabled=True,
            num_experts=config.num_experts,
            rank=config.rank,
            instruction_dim=config.instruction_dim,
            target_modules=config.target_modules,
            num_slots=num_slots,
            trace_step_routes=trace_step_routes,
            cpu_kernel_max_tokens=cpu_kernel_max_tokens,
            cpu_overlap=cpu_overlap,
        )


@dataclass
class EngineConfig:
    """How to start a `SMoLoRAEngine`.

    Attributes:
        model_dir: the LLaVA-architecture base-model folder (HF format).
        checkpoint: the SMoLoRA checkpoint folder to serve first; None with
            `adapters=True` needs `layout`.
        adapters: False serves the base model only (no routing hook at all).
        layout: adapter layout; None derives it from `checkpoint`'s manifest.
        num_slots: checkpoint versions resident at once (in-flight requests keep theirs).
        vu_routing: VU routing of requests that do not choose one, for every version; None
            serves each version with its own (`adapter_config.vu_routing` of its checkpoint:
            "pinned" for the versions this project trains, "per_step" for imported reference
            checkpoints).
        trace_step_routes: see `AdapterLayout.trace_step_routes`.
        cpu_kernel_max_tokens: see `AdapterLayout.cpu_kernel_max_tokens`.
        cpu_overlap: see `AdapterLayout.cpu_overlap` (used when the layout comes from the
            checkpoint; an explicit `layout` carries its own).
        max_num_seqs: concurrent requests per step (vLLM persistent-batch rows).
        max_model_len: context limit; None takes the model's.
        max_num_batched_tokens: token budget per step; None lets vLLM choose (at least
            max_model_len without chunked prefill). It must be >= max_model_len because
            prompts are never split (see `chunked_prefill`).
        chunked_prefill: must stay False with adapters: a prompt's VU route is the argmax of
            a mean over the whole prompt and applies to every prompt token, so a prompt split
            across steps cannot reproduce it (tests/server/engine prove it). Allowed for
            `adapters=False`.
        kv_cache_bytes: KV-cache size (vLLM `kv_cache_memory_bytes`).
        mm_cache_gb: size of vLLM's cache of processed images (`mm_processor_cache_gb`),
            held once in the front-end process and once in the engine core. vLLM's default,
            4 GiB each, fills up under traffic whose images are all new (it only helps a
            repeated image) and is memory a server never gets back; 0 turns it off.
        dtype: model dtype ("float32", "bfloat16", ...; "auto": bfloat16 where the device
            computes it natively, else float32, see `adapters/precision.py`).
        kernel: how the routed CPU kernel is built and run (a dict is converted).
        enforce_eager: must be True with adapters (per-step routing state is Python-side).
        seed: vLLM seed.
        tensor_parallel_size: vLLM tensor-parallel ranks (worker processes); the routed
            adapters are sharded like the linears they adapt (`sharding.py`). On a CPU each
            rank's worker needs CPUs of its own: the serve CLI binds them
            (`prepare_vllm_environment`).
        trace_batch_window: how many finished requests' traces one RPC may fetch at most.
        extra_engine_args: further vLLM engine arguments, passed through last (for example
            `{"disable_log_stats": False}`); they may not override the SMoLoRA invariants.
    """

    model_dir: Path
    checkpoint: Path | None = None
    adapters: bool = True
    layout: AdapterLayout | None = None
    num_slots: int = 2
    vu_routing: VuRouting | None = None
    trace_step_routes: int = 0
    cpu_kernel_max_tokens: int = 8192
    cpu_overlap: CpuOverlap = "auto"
    max_num_seqs: int = 16
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    chunked_prefill: bool = False
    kv_cache_bytes: int = 256 * 1024 * 1024
    mm_cache_gb: float = 0.25
    dtype: str = "float32"
    kernel: KernelConfig = field(default_factory=KernelConfig)
    enforce_eager: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1
    trace_batch_window: int = 256
    extra_engine_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if self.checkpoint is not None:
            self.checkpoint = Path(self.checkpoint)
        if not (self.model_dir / "config.json").is_file():
            raise EngineConfigError(
                f"{self.model_dir}: no config.json; pass a HF LLaVA model folder"
            )
        _check_cpu_overlap(self.cpu_overlap)
        if isinstance(self.kernel, dict):
            self.kernel = KernelConfig.from_dict(self.kernel)
        if self.dtype == "auto":
            self.dtype = resolve_dtype("auto", serving_device())
        if self.vu_routing is not None and self.vu_routing not in VU_ROUTINGS:
            raise EngineConfigError(
                "vu_routing must be 'pinned', 'per_step' or None (each version's own), "
                f"got {self.vu_routing!r}"
            )
        if self.adapters:
            if self.checkpoint is None and self.layout is None:
                raise EngineConfigError("adapters=True needs a checkpoint or an explicit layout")
            if self.chunked_prefill:
                raise EngineConfigError(
                    "chunked_prefill=True cannot serve SMoLoRA exactly: the VU route of every "
                    "prompt token is decided by the mean over the whole prompt, which a split "
                    "prompt has not seen yet. Keep chunked_prefill=False (prompts are scheduled "
                    "whole)."
                )
            if not self.enforce_eager:
                raise EngineConfigError(
                    "enforce_eager must be True with adapters: routing state is per step, in Python"
                )
        if self.max_num_seqs < 1:
            raise EngineConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_num_batched_tokens is not None:
            if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
                raise EngineConfigError(
                    f"max_num_batched_tokens ({self.max_num_batched_tokens}) < max_model_len "
                    f"({self.max_model_len}): without chunked prefill a long prompt could never "
                    "be scheduled"
                )
        if self.kv_cache_bytes <= 0:
            raise EngineConfigError("kv_cache_bytes must be positive")
        if self.mm_cache_gb < 0:
            raise EngineConfigError("mm_cache_gb must be >= 0")
        if self.tensor_parallel_size < 1:
            raise EngineConfigError(
                f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"
            )
        if self.trace_batch_window < 1:
            raise EngineConfigError("trace_batch_window must be >= 1")
        forbidden = {
            "enable_prefix_caching",
            "enable_chunked_prefill",
            "async_scheduling",
            "hf_overrides",
            "logits_processors",
            "worker_extension_cls",
            "model",
            "tensor_parallel_size",
        } & set(self.extra_engine_args)
        if forbidden:
            raise EngineConfigError(
                f"extra_engine_args may not set {sorted(forbidden)}; the engine fixes them or sets "
                "them from its own fields"
            )
        if self.adapters and self.extra_engine_args.get("enable_lora"):
            raise EngineConfigError(
                "enable_lora (vLLM's own LoRA) serves only with adapters=False: the routed "
                "adapters and vLLM's LoRA layers would both wrap the same linears"
            )
