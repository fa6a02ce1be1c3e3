"""Zero-shot: the frozen base model alone, never trained (the lower bound)."""

from __future__ import annotations

from torch import nn

from smolora.training.methods.base import ContinualMethod


class ZeroShotMethod(ContinualMethod):
    """No adapter, no training."""

    name = "zeroshot"
    adapter_kind = "none"
    trains = False

    def build_adapter(self, model: nn.Module) -> None:
        return None
