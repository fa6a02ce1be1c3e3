"""A no-op vLLM v1 logits processor that tracks which request sits in each batch row.

vLLM calls every logits processor's `update_state(BatchUpdate)` after it has added,
removed, condensed and reordered the persistent batch and before it prepares the forward
(`InputBatch.refresh_metadata`). That is exactly when the routed layers need to know each
row's request, so this processor forwards the update to the model's `RowRoutingState`
(bound by the worker extension's `smolora_attach`). It never changes logits.

`validate_params` runs in the API process for every request and rejects malformed
SMoLoRA arguments before they reach the engine core.

It does not work with vLLM's "Model Runner V2" (GPU default in 0.32, different logits
processor interface): set `VLLM_USE_V2_MODEL_RUNNER=0` on GPUs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from smolora.server.engine.row_state import RequestArgs, RowRoutingState

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)

#: Import path vLLM loads the processor from (engine arg `logits_processors`).
ROW_TRACKER = "smolora.server.engine.row_tracker:SMoLoRARowTracker"


class SMoLoRARowTracker(LogitsProcessor):
    """Forwards persistent-batch changes to the bound `RowRoutingState`."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        RequestArgs.parse(sampling_params.extra_args)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.state: RowRoutingState | None = None
        self._warned = False

    def bind(self, state: RowRoutingState) -> None:
        """Start forwarding updates to `state` (called once, before any request)."""
        self.state = state

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        if self.state is None:
            if batch_update.added and not self._warned:
                logger.warning("SMoLoRA row tracker is not attached: requests run without adapters")
                self._warned = True
            return
        self.state.apply_batch_update(batch_update)
