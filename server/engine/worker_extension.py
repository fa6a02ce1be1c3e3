"""Methods mixed into vLLM's worker (`worker_extension_cls`), called with `collective_rpc`.

- `smolora_attach`: bind the row tracker (a logits processor) to the model's row state and
  describe the resident layout (columns, expected checkpoint tensor shapes).
- `smolora_load_slot`: read a checkpoint (verified: hashes, format, base model), check it
  fits, and copy it into one version slot of the resident adapter tensors, in place. RPCs
  run between engine steps, so a forward never sees a half-copied slot. Which slot is free
  is the front end's call: it counts the in-flight requests of every slot (a finished
  request can sit in the persistent batch until the next step, so the worker cannot tell).
- `smolora_unload_slot`: forget the version of a slot the front end has freed (its tensors
  stay until a later load overwrites them; no request can select the slot meanwhile).
- `smolora_fetch_traces`: routing traces of many requests in one call.
- `smolora_stats`: counters for health and tests.

Results are plain lists/dicts (a returned tensor would arrive as an undecoded stub). Errors
are returned as `{"ok": False, "error": <class name>, "message": ...}` so the front end can
re-raise them typed. It does not pick slots or versions (the front end does).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from smolora.adapters.checkpoint import CheckpointError, load_checkpoint
from smolora.server.engine.checkpoint_fit import check_fit
from smolora.server.engine.row_tracker import SMoLoRARowTracker

logger = logging.getLogger(__name__)

#: Import path vLLM resolves (engine arg `worker_extension_cls`).
WORKER_EXTENSION = "smolora.server.engine.worker_extension.SMoLoRAWorkerExtension"


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
                f"expected one SMoLoRA row tracker among the logits processors, found {len(trackers)}"
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
    ) -> dict[str, Any]:
        """Load the checkpoint at `path` into `slot` (all or nothing)."""
        model = self._smolora_model()
        state = model.smolora_state
        try:
            if not 0 <= slot < model.layout.num_slots:
                raise ValueError(f"slot {slot} out of range [0, {model.layout.num_slots})")
            ckpt = load_checkpoint(path, expected_fingerprint=expected_fingerprint)
            check_fit(ckpt.manifest, ckpt.tensors, model.layout, self._smolora_expected_shapes())
        except (CheckpointError, ValueError) as e:
            return {"ok": False, "error": type(e).__name__, "message": str(e)}
        alpha = float(ckpt.manifest.adapter_config["alpha"])
        with torch.no_grad():
            for adapter in model.routed_adapters():
                adapter.load_slot(slot, ckpt.tensors, state)
            state.slot_scaling[slot] = alpha / model.layout.rank
        state.slot_versions[slot] = dict(version)
        state.epoch += 1  # cached routing plans hold copies of slot-derived values
        logger.info("loaded checkpoint %s into slot %d", path, slot)
        return {"ok": True, "slot": slot, "version": ckpt.manifest.version}

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
