"""Methods mixed into vLLM's worker (`worker_extension_cls`), called with `collective_rpc`.

- `smolora_attach`: bind the row tracker (a logits processor) to the model's row state and
  describe the resident layout (columns, expected checkpoint tensor shapes).
- `smolora_load_slot`: read a checkpoint, verify it (hashes, format, base model: the one
  place a hot-load reads and hashes the files; the front end reads only the manifest),
  check it fits, and copy it into one version slot of the resident adapter tensors, in
  place. RPCs run between engine steps, so a forward never sees a half-copied slot. Which
  slot is free is the front end's call: it counts the in-flight requests of every slot (a
  finished request can sit in the persistent batch until the next step, so the worker
  cannot tell).
- `smolora_unload_slot`: forget the version of a slot the front end has freed (its tensors
  stay until a later load overwrites them; no request can select the slot meanwhile).
- `smolora_fetch_traces`: routing traces of many requests in one call.
- `smolora_stats`: counters for health and tests.

Results are plain lists/dicts or small dataclasses (vLLM's serialiser sends a dataclass as
a dict, which `SlotLoadResult.from_wire` turns back; a returned tensor would arrive as an
undecoded stub). A refused checkpoint is a `SlotLoadResult` with `refused` set (nothing was
copied), because an exception raised in the worker reaches the front end as an untyped
message; the front end maps it onto `VersionLoadError` in one place. It does not pick slots
or versions (the front end does).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from typing import Any

import torch

from smolora.adapters.checkpoint import CheckpointError, load_checkpoint
from smolora.server.engine.checkpoint_fit import check_fit
from smolora.server.engine.row_tracker import SMoLoRARowTracker

logger = logging.getLogger(__name__)

#: Import path vLLM resolves (engine arg `worker_extension_cls`).
WORKER_EXTENSION = "smolora.server.engine.worker_extension.SMoLoRAWorkerExtension"


@dataclass
class SlotLoadResult:
    """What `smolora_load_slot` did.

    Attributes:
        slot: the slot it was asked to fill.
        version: the checkpoint's manifest version (None when refused before reading it).
        refused: None when the slot now holds the checkpoint; else the class name of the
            `CheckpointError` that refused it (e.g. "IntegrityError",
            "CheckpointMismatchError"), and nothing was copied: the slot's tensors and
            version are what they were.
        message: why it was refused.
        verify_seconds: reading + verifying the files + checking the fit.
        copy_seconds: copying into the slot.
    """

    slot: int
    version: int | None = None
    refused: str | None = None
    message: str = ""
    verify_seconds: float = 0.0
    copy_seconds: float = 0.0

    @classmethod
    def from_wire(cls, raw: SlotLoadResult | dict[str, Any]) -> SlotLoadResult:
        """The result as `collective_rpc` delivers it (a dict across processes)."""
        if isinstance(raw, cls):
            return raw
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(raw).items() if k in names})


class SMoLoRAWorkerExtension:
    """Mixed into vLLM's worker class; `self.model_runner` is the worker's model runner."""

    model_runner: Any

    def _smolora_model(self) -> Any:
        model = self.model_runner.get_model()
        if getattr(model, "smolora_state", None) is None:
            raise RuntimeError(
                "the served model has no SMoLoRA adapters (engine started with adapters disabled)"
            )
        return model

    def _smolora_expected_shapes(self) -> dict[str, list[int]]:
        model = self._smolora_model()
        dim = model.layout.instruction_dim
        shapes: dict[str, list[int]] = {}
        for adapter in model.routed_adapters():
            for name in adapter.names:
                for suffix, shape in adapter.expected_shapes(dim).items():
                    shapes[f"{name}.{suffix}"] = list(shape)
        return shapes

    def smolora_attach(self) -> dict[str, Any]:
        """Bind the row tracker to the row state; returns the resident layout."""
        model = self._smolora_model()
        trackers = [
            p
            for p in self.model_runner.input_batch.logitsprocs.all
            if isinstance(p, SMoLoRARowTracker)
        ]
        if len(trackers) != 1:
            raise RuntimeError(
                "expected one SMoLoRA row tracker among the logits processors, found "
                f"{len(trackers)}"
            )
        trackers[0].bind(model.smolora_state)
        state = model.smolora_state
        return {
            "layout": model.layout.to_dict(),
            "columns": [c.name for c in state.columns],
            "max_rows": state.max_rows,
            "expected_shapes": self._smolora_expected_shapes(),
        }

    def smolora_load_slot(
        self, slot: int, path: str, expected_fingerprint: str | None, version: dict[str, Any]
    ) -> SlotLoadResult:
        """Read, verify and copy the checkpoint at `path` into `slot` (all or nothing).

        Raises:
            ValueError: `slot` is out of range (a front-end bug, not a checkpoint problem).
        """
        model = self._smolora_model()
        state = model.smolora_state
        if not 0 <= slot < model.layout.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {model.layout.num_slots})")
        t0 = time.perf_counter()
        try:
            ckpt = load_checkpoint(path, expected_fingerprint=expected_fingerprint)
            check_fit(ckpt.manifest, ckpt.tensors, model.layout, self._smolora_expected_shapes())
        except CheckpointError as e:
            return SlotLoadResult(slot, refused=type(e).__name__, message=str(e))
        t1 = time.perf_counter()
        alpha = float(ckpt.manifest.adapter_config["alpha"])
        with torch.no_grad():
            for adapter in model.routed_adapters():
                adapter.load_slot(slot, ckpt.tensors, state)
            state.slot_scaling[slot] = alpha / model.layout.rank
        state.slot_versions[slot] = dict(version)
        state.epoch += 1  # cached routing plans hold copies of slot-derived values
        logger.info("loaded checkpoint %s into slot %d", path, slot)
        return SlotLoadResult(
            slot,
            version=ckpt.manifest.version,
            verify_seconds=t1 - t0,
            copy_seconds=time.perf_counter() - t1,
        )

    def smolora_unload_slot(self, slot: int) -> dict[str, Any]:
        """Forget the version held by `slot` (the front end no longer routes requests to it)."""
        state = self._smolora_model().smolora_state
        removed = state.slot_versions.pop(int(slot), None)
        logger.info("unloaded slot %d (%s)", slot, removed)
        return {"ok": True, "slot": int(slot), "version": removed}

    def smolora_fetch_traces(self, keys: list[int]) -> dict[int, Any]:
        """Traces of the given request keys (None for unknown keys)."""
        return self._smolora_model().smolora_state.traces([int(k) for k in keys])

    def smolora_stats(self) -> dict[str, Any]:
        """Counters: rows in use, parked traces, split prompts seen, requests that came back
        into the batch (and were recomputed after preemption), steps run; routed layers, and
        how many of them have run on the compiled CPU kernel; the overlap helper's CPUs, jobs
        and waits (`overlap`: None when there is none; see `OverlapHelper.stats`)."""
        model = self._smolora_model()
        state = model.smolora_state
        adapters = model.routed_adapters()
        helper = model.overlap_helper
        return {
            "overlap": helper.stats() if helper is not None else None,
            "routed_layers": len(adapters),
            "cpu_kernel_layers": sum(a.uses_cpu_kernel for a in adapters),
            "adapter_dtype": str(adapters[0].lora_a.dtype).removeprefix("torch.")
            if adapters
            else None,
            "live_requests": sum(k is not None for k in state.keys),
            "parked_traces": len(state.parked),
            "partial_prefills": state.partial_prefills,
            "resumed_requests": state.resumed,
            "recomputed_requests": state.recomputed,
            "steps_run": state.steps_run,
            "slots_in_use": sorted(state.slots_in_use()),
            "slot_versions": {int(k): v for k, v in state.slot_versions.items()},
        }
