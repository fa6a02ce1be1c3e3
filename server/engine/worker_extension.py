"""Methods mixed into vLLM's worker (`worker_extension_cls`), called with `collective_rpc`.

- `smolora_attach`: bind the row tracker (a logits processor) to the model's row state and
  describe the resident layout (columns, expected checkpoint tensor shapes).
- a hot-load in steps, so running streams keep their pace: `smolora_stage_slot` starts
  reading and verifying a checkpoint (hashes, format, base model, fit: the one place a
  hot-load reads and hashes the files; the front end reads only the manifest) on a
  background thread, on the CPUs the worker's forward does not use; `smolora_staged_result`
  says when it is done (or refused); `smolora_copy_staged` then copies it into the slot a
  few adapted sublayers (a byte budget) per call. RPCs run between engine steps, so each step waits
  for at most one such part instead of the whole load. A partly copied slot is never read:
  the front end reserved it (no request routes to it) until the last copy has landed.
  `smolora_cancel_staged` drops a staged load. Which slot is free is the front end's call:
  it counts the in-flight requests of every slot (a finished request can sit in the
  persistent batch until the next step, so the worker cannot tell).
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
import os
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

import torch

from smolora.adapters.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from smolora.server.engine.checkpoint_fit import check_fit
from smolora.server.engine.row_tracker import SMoLoRARowTracker

logger = logging.getLogger(__name__)

#: Import path vLLM resolves (engine arg `worker_extension_cls`).
WORKER_EXTENSION = "smolora.server.engine.worker_extension.SMoLoRAWorkerExtension"


@dataclass
class SlotLoadResult:
    """What a hot-load's worker RPCs found and did (`smolora_staged_result`,
    `smolora_copy_staged`).

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
        next_part: for a load copied in steps, the first part (adapted sublayer) the next
            `smolora_copy_staged` call copies; None once the slot holds the checkpoint.
    """

    slot: int
    version: int | None = None
    refused: str | None = None
    message: str = ""
    verify_seconds: float = 0.0
    copy_seconds: float = 0.0
    next_part: int | None = None

    @classmethod
    def from_wire(cls, raw: SlotLoadResult | dict[str, Any]) -> SlotLoadResult:
        """The result as `collective_rpc` delivers it (a dict across processes)."""
        if isinstance(raw, cls):
            return raw
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(raw).items() if k in names})


class _StagedLoad:
    """A checkpoint being read and verified on a background thread for one slot."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.done = threading.Event()
        self.checkpoint: Checkpoint | None = None
        self.refused: str | None = None
        self.message = ""
        self.verify_seconds = 0.0
        self.copy_seconds = 0.0

    def run(
        self,
        path: str,
        expected_fingerprint: str | None,
        layout: Any,
        expected_shapes: dict[str, list[int]],
    ) -> None:
        _off_the_forward_cpus()
        t0 = time.perf_counter()
        try:
            ckpt = load_checkpoint(path, expected_fingerprint=expected_fingerprint)
            check_fit(ckpt.manifest, ckpt.tensors, layout, expected_shapes)
            self.checkpoint = ckpt
        except CheckpointError as e:
            self.refused, self.message = type(e).__name__, str(e)
        except Exception as e:  # an unexpected failure must still end the wait
            self.refused, self.message = "CheckpointError", f"{type(e).__name__}: {e}"
        finally:
            self.verify_seconds = time.perf_counter() - t0
            self.done.set()

    def result(self) -> SlotLoadResult:
        version = self.checkpoint.manifest.version if self.checkpoint is not None else None
        return SlotLoadResult(
            self.slot,
            version=version,
            refused=self.refused,
            message=self.message,
            verify_seconds=self.verify_seconds,
            copy_seconds=self.copy_seconds,
        )


def _off_the_forward_cpus() -> None:
    """Make the calling thread yield to the worker's forward: run it at the lowest priority
    and move it to the CPUs its process is not bound to, if there are any (vLLM pins the
    forward to its CPUs, and reading + hashing a checkpoint there slows every step of the
    running streams)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
    except OSError:
        pass
    try:
        mine = os.sched_getaffinity(0)
        others = set(range(os.cpu_count() or 1)) - mine
        if others:
            os.sched_setaffinity(0, others)  # 0: the calling thread on Linux
    except OSError:
        pass  # the container does not allow those CPUs: stay where we are


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

    def _smolora_staging(self) -> dict[int, _StagedLoad]:
        return self.__dict__.setdefault("_smolora_staged_loads", {})

    def smolora_stage_slot(self, slot: int, path: str, expected_fingerprint: str | None) -> None:
        """Start reading and verifying the checkpoint at `path` for `slot` on a background
        thread (`smolora_staged_result` says when it is done).

        Raises:
            ValueError: `slot` is out of range or already staging (front-end bugs).
        """
        model = self._smolora_model()
        if not 0 <= slot < model.layout.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {model.layout.num_slots})")
        staging = self._smolora_staging()
        if slot in staging:
            raise ValueError(f"slot {slot} is already staging a load")
        staged = staging[slot] = _StagedLoad(slot)
        threading.Thread(
            target=staged.run,
            args=(path, expected_fingerprint, model.layout, self._smolora_expected_shapes()),
            name=f"smolora-stage-{slot}",
            daemon=True,
        ).start()

    def smolora_staged_result(self, slot: int) -> SlotLoadResult | None:
        """None while `slot`'s checkpoint is still being verified; then what verifying found
        (`refused` set: nothing will be copied; the front end then drops the staged load on
        every rank with `smolora_cancel_staged`)."""
        staged = self._smolora_staging()[slot]
        if not staged.done.is_set():
            return None
        return staged.result()

    def smolora_copy_staged(
        self, slot: int, first: int, max_bytes: int, version: dict[str, Any]
    ) -> SlotLoadResult:
        """Copy the verified checkpoint into `slot` one part (an adapted sublayer: `gate_proj`
        and `up_proj` of one fused linear are two parts) at a time, from part `first` on,
        until about `max_bytes` of LoRA weights are copied (at least one part); `next_part`
        in the result says where the next call starts. The call that copies the last part
        records the slot's scaling and `version` and drops the staged load."""
        model = self._smolora_model()
        state = model.smolora_state
        staged = self._smolora_staging()[slot]
        ckpt = staged.checkpoint
        if ckpt is None:
            raise ValueError(f"slot {slot} has no verified checkpoint to copy")
        parts = [(a, j) for a in model.routed_adapters() for j in range(a.n_sub)]
        t0 = time.perf_counter()
        index, copied = first, 0
        with torch.no_grad():
            while index < len(parts) and (index == first or copied < max_bytes):
                adapter, j = parts[index]
                adapter.load_slot(slot, ckpt.tensors, state, sublayers=(j,))
                name = adapter.names[j]
                copied += sum(ckpt.tensors[f"{name}.{t}"].nbytes for t in ("lora_A", "lora_B"))
                index += 1
            if index >= len(parts):
                alpha = float(ckpt.manifest.adapter_config["alpha"])
                state.slot_scaling[slot] = alpha / model.layout.rank
                state.slot_versions[slot] = dict(version)
                del self._smolora_staging()[slot]
                logger.info("loaded checkpoint %s into slot %d", ckpt.path, slot)
        state.epoch += 1  # cached routing plans hold copies of slot-derived values
        staged.copy_seconds += time.perf_counter() - t0
        result = staged.result()
        result.next_part = index if index < len(parts) else None
        return result

    def smolora_cancel_staged(self, slot: int) -> bool:
        """Drop `slot`'s staged load, if any (a verification still running finishes unused)."""
        return self._smolora_staging().pop(slot, None) is not None

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
            "adapted_sublayers": sum(a.n_sub for a in adapters),
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
