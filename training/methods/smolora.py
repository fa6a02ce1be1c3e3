"""SMoLoRA in the continual harness (router_training "frozen_random" or "learned").

Per batch it opens a `RoutingContext` with the MiniLM embedding of each example's
instruction template (the reference embeds only the template, never the question) and
marks the real tokens before each forward. Experts and fusion vectors always train.

Reference parity (`smolora`): the gates stay the random projections they were initialised
as (hard argmax gives them no gradient in the reference).

Learned router (`smolora_learned`): before each task the gates are refit by
`route_fit.py`'s task-balanced assignment (a new instruction gets its own IF expert, each
task a distinct (VU, IF) pair where possible, earlier tasks' routes held by a route
memory), then frozen while the task trains.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from smolora.adapters.instructions import InstructionEncoder
from smolora.adapters.smolora import RoutingContext, SMoLoRAConfig, SMoLoRAModel
from smolora.adapters.smolora import router as smolora_router
from smolora.adapters.smolora.config import RouterTraining
from smolora.training.config import RunConfig
from smolora.training.data.cvit_json import Example
from smolora.training.evaluate import MaskHook
from smolora.training.methods.base import ContinualMethod, Probe
from smolora.training.methods.route_fit import Kind, RouteEntry, RouteMemory, fit_gate, gate_accuracy, pick_expert

logger = logging.getLogger(__name__)


class SMoLoRAMethod(ContinualMethod):
    """SMoLoRA with reference-parity frozen random routers (`name="smolora"`)."""

    name = "smolora"
    adapter_kind = "smolora"
    router_training: RouterTraining = "frozen_random"

    def __init__(self, run: RunConfig, instructions: InstructionEncoder):
        super().__init__(run, instructions)
        self._ctx: RoutingContext | None = None

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
        smodel = SMoLoRAModel(model, cfg, seed=self.run.seed)
        smodel.set_gates_trainable(False)  # no gate trains by gradient during a task (see module doc)
        return smodel

    @property
    def smodel(self) -> SMoLoRAModel:
        assert isinstance(self.adapter, SMoLoRAModel)
        return self.adapter

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
    """SMoLoRA whose gates are fit to a task-balanced route assignment before every task
    (see `route_fit.py`) and frozen while it trains."""

    name = "smolora_learned"
    router_training: RouterTraining = "learned"
    #: Training examples whose mean layer inputs are remembered per task and layer.
    probe_size = 32

    def __init__(self, run: RunConfig, instructions: InstructionEncoder):
        super().__init__(run, instructions)
        self.memory = RouteMemory()
        self.fit_log: list[dict[str, Any]] = []

    def prepare_task(self, index: int, task: str, examples: list[Example], probe: Probe) -> None:
        """Assign this task's experts in every layer and refit the gates (see module doc)."""
        self.memory.truncate(index)
        texts = sorted({ex.instruction for ex in examples})
        inst = self.embed(texts).float()
        step = max(1, len(examples) // self.probe_size)
        sample = examples[::step][: self.probe_size]
        half = self.smodel.config.experts_per_group
        log: dict[str, Any] = {"stage": index, "task": task, "layers": {}}
        for name, layer in self.smodel.layers.items():  # forward order: each fit sees the routes before it
            if_expert = self.memory.if_expert_for(name, texts)
            if if_expert is None:
                if_expert = pick_expert(self.memory.loads(name, "if", half))
            vu_expert = pick_expert(self.memory.loads(name, "vu", half), avoid=self.memory.vu_paired_with(name, if_expert))
            self.memory.entries.append(RouteEntry(index, task, name, "if", if_expert, inst, tuple(texts)))
            self.memory.entries.append(RouteEntry(index, task, name, "vu", vu_expert, self._mean_inputs(name, sample, probe)))
            acc = {}
            kinds: list[tuple[Kind, nn.Parameter]] = [("if", layer.gate_if), ("vu", layer.gate_vu)]
            for kind, gate in kinds:
                x, y = self.memory.training_set(name, kind)
                with torch.no_grad():
                    gate.copy_(fit_gate(gate, x, y))
                acc[kind] = gate_accuracy(gate, x, y)
            log["layers"][name] = {"vu": vu_expert, "if": if_expert, "fit_accuracy": acc}
        self.fit_log.append(log)
        worst = min(min(v["fit_accuracy"].values()) for v in log["layers"].values())
        logger.info("%s: routes for task %d (%s) fit; worst remembered-route accuracy %.3f", self.name, index, task, worst)

    def run_state(self) -> Any:
        return {"route_memory": self.memory.to_list(), "fit_log": self.fit_log}

    def load_run_state(self, state: Any) -> None:
        self.memory = RouteMemory.from_list(state.get("route_memory"))
        self.fit_log = list(state.get("fit_log", []))

    def _mean_inputs(self, layer_name: str, examples: list[Example], probe: Probe) -> Tensor:
        """Per-request mean inputs of one layer, `[2n, d_in]`: each example with its answer
        (as in training) and without (as at inference prefill)."""
        layer = self.smodel.layers[layer_name]
        got: list[Tensor] = []

        def hook(mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            ctx = self._ctx
            assert ctx is not None
            x = args[0]
            layout = ctx.image_layout(x) if mod.image_side else ctx.text_layout(x)  # type: ignore[attr-defined]
            xf = x.detach().reshape(-1, x.shape[-1])
            got.append(smolora_router.segment_mean(xf, layout.owners, layout.valid, layout.num_segments))

        handle = layer.register_forward_pre_hook(hook)
        try:
            probe(examples, with_answers=True)
            probe(examples, with_answers=False)
        finally:
            handle.remove()
        return torch.cat(got).float()
