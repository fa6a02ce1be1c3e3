"""SMoLoRA in the continual harness (router_training "frozen_random" or "learned").

Per batch it opens a `RoutingContext` with the MiniLM embedding of each example's
instruction template (the reference embeds only the template, never the question) and
marks the real tokens before each forward. Gates train only in task 1 and only with the
learned router; later tasks freeze them (`set_gates_trainable(False)`); experts and fusion
vectors always train.

Learned router, load balancing: the straight-through top-1 router tends to collapse, all
requests of task 1 on one expert. With `AdapterSizes.router_balance_weight > 0` an
auxiliary Switch-style loss `(E/2) * sum_k f_k * P_k` per layer and router (f = share of
requests routed to expert k, P = mean router probability) is added in task 1. Router
logits are re-computed from the layer inputs captured by forward pre-hooks, so the adapter
library stays untouched.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from smolora.adapters.instructions import InstructionEncoder
from smolora.adapters.smolora import RoutingContext, SMoLoRAConfig, SMoLoRAModel
from smolora.adapters.smolora import router as smolora_router
from smolora.adapters.smolora.config import RouterTraining
from smolora.training.config import RunConfig
from smolora.training.evaluate import MaskHook
from smolora.training.methods.base import ContinualMethod


def switch_balance_loss(logits: Tensor) -> Tensor:
    """Switch-Transformer load-balancing loss of one router over a batch.

    Args:
        logits: `[B, K]` router logits (one row per request).

    Returns:
        Scalar `K * sum_k f_k P_k`; 1 when balanced, K when collapsed on one expert.
    """
    k = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    frac = torch.nn.functional.one_hot(probs.argmax(-1), k).float().mean(0)
    return k * (frac * probs.mean(0)).sum()


class SMoLoRAMethod(ContinualMethod):
    """SMoLoRA with reference-parity frozen random routers (`name="smolora"`)."""

    name = "smolora"
    adapter_kind = "smolora"
    router_training: RouterTraining = "frozen_random"

    def __init__(self, run: RunConfig, instructions: InstructionEncoder):
        super().__init__(run, instructions)
        self._ctx: RoutingContext | None = None
        self._aux: list[Tensor] = []
        self._hooks: list[Any] = []

    def build_adapter(self, model: nn.Module) -> SMoLoRAModel:
        a = self.run.adapter
        cfg = SMoLoRAConfig(
            num_experts=a.num_experts,
            rank=a.rank,
            alpha=a.alpha,
            dropout=a.dropout,
            target_modules=a.target_modules,
            router_training=self.router_training,
        )
        return SMoLoRAModel(model, cfg, seed=self.run.seed)

    @property
    def smodel(self) -> SMoLoRAModel:
        assert isinstance(self.adapter, SMoLoRAModel)
        return self.adapter

    def begin_task(self, index: int, task: str) -> None:
        self.smodel.set_gates_trainable(index == 0)
        self._remove_hooks()
        if index == 0 and self.router_training == "learned" and self.run.adapter.router_balance_weight > 0:
            for layer in self.smodel.layers.values():
                self._hooks.append(layer.register_forward_pre_hook(self._capture))

    def end_task(self, index: int, task: str, examples: list) -> None:
        self._remove_hooks()
        self.smodel.set_gates_trainable(False)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._aux = []

    def _capture(self, layer: nn.Module, args: tuple[Tensor, ...]) -> None:
        """Pre-hook: router logits of this layer's input, for the balance loss."""
        ctx = self._ctx
        if ctx is None or not layer.training or not torch.is_grad_enabled():
            return
        x = args[0]
        layout = ctx.image_layout(x) if layer.image_side else ctx.text_layout(x)  # type: ignore[attr-defined]
        xf = x.reshape(-1, x.shape[-1])
        mean = smolora_router.segment_mean(xf, layout.owners, layout.valid, layout.num_segments)  # [B, d_in]
        vu = smolora_router.gate_logits(layer.gate_vu, mean)  # type: ignore[attr-defined]
        inst = smolora_router.gate_logits(layer.gate_if, ctx.instruction.to(x.device))  # type: ignore[attr-defined]
        self._aux.append(switch_balance_loss(vu) + switch_balance_loss(inst))

    def auxiliary_loss(self) -> Tensor | None:
        if not self._aux:
            return None
        loss = torch.stack(self._aux).mean() * self.run.adapter.router_balance_weight
        self._aux = []
        return loss

    def embed(self, instructions: list[str]) -> Tensor:
        """`[B, 384]` MiniLM embeddings of instruction templates."""
        return self.instructions.encode(instructions)

    @contextlib.contextmanager
    def scope(self, batch: dict[str, Any]) -> Iterator[MaskHook]:
        device = batch["input_ids"].device if hasattr(batch["input_ids"], "device") else "cpu"
        ctx = RoutingContext(self.embed(batch["instructions"]).to(device), vu_routing=self.smodel.config.vu_routing)
        self._ctx = ctx
        try:
            with self.smodel.routing(ctx):
                yield ctx.set_token_mask
        finally:
            self._ctx = None


class LearnedSMoLoRAMethod(SMoLoRAMethod):
    """SMoLoRA whose gates learn in task 1 (straight-through top-1)."""

    name = "smolora_learned"
    router_training: RouterTraining = "learned"
