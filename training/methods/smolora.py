"""SMoLoRA in the continual harness (router_training "frozen_random" or "learned").

Per batch it opens a `RoutingContext` with the MiniLM embedding of each example's
instruction template (the reference embeds only the template, never the question) and
marks the real tokens before each forward. With frozen random gates, all experts and the
fusion vectors train in every task; the learned router restricts that (below).

Reference parity (`smolora`): the gates stay the random projections they were initialised
as (hard argmax gives them no gradient in the reference).

Learned router (`smolora_learned`): every task gets its own experts (an instruction
already seen keeps its IF expert), trains only the experts it owns with its VU routes
teacher-forced, and the gates are refit to a route memory of every task's instruction
embeddings and prompt-only mean layer inputs (see `route_fit.py` and
`LearnedSMoLoRAMethod`). The routing a request gets at serving time is unchanged: linear
top-1 gates on the prompt mean and the instruction embedding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

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
from smolora.training.methods.route_fit import (
    RouteEntry,
    RouteMemory,
    fit_gate,
    fit_gate_fresh,
    gate_accuracy,
    pick_expert,
)

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
        smodel.set_gates_trainable(
            False
        )  # no gate trains by gradient during a task (see module doc)
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
        ctx = RoutingContext(
            self.embed(batch["instructions"]).to(device),
            vu_routing=self.smodel.config.vu_routing,
            pinned_vu=self.pinned_vu(batch["input_ids"].shape[0], device),
        )
        self._ctx = ctx
        try:
            with self.smodel.routing(ctx):
                yield ctx.set_token_mask
        finally:
            self._ctx = None

    def pinned_vu(self, batch_size: int, device: Any) -> dict[str, Tensor] | None:
        """VU routes to force on every request of a batch (layer -> `[B]`); None routes by
        the gates."""
        return None


class LearnedSMoLoRAMethod(SMoLoRAMethod):
    """SMoLoRA whose gates are fit to a task-owned route assignment (see `route_fit.py`).

    Per task t (the serving semantics of the gates are untouched; only how training sets
    the parameters differs from the reference):
    - `prepare_task`: assign t its experts in every layer (`route_fit` assignment: IF expert
      shared by identical instruction texts, a fresh VU expert per task), refit the IF gates
      on the remembered instruction embeddings. The experts t *owns* (assigned to no earlier
      task) are the only expert rows that receive gradient in t: a reused IF expert stays
      as the task that trained it left it (gradient mask on `lora_A` / `lora_B`).
    - `begin_task`: the fusion vectors train in the first task only (they are shared by all
      tasks of a layer). The projector's VU experts never train: the projector sees only
      the image, which tasks share, so its VU gate cannot tell tasks apart; an untrained
      expert outputs zero, so whichever one the gate picks changes nothing.
    - training: every text layer's VU route is pinned to t's assigned expert (teacher-forced
      routes), so t's experts learn exactly the computation its requests should get.
    - `end_task`: the prompt-only mean inputs (what the pinned VU route sees at prefill) of
      `probe_size` of t's requests, run through the trained model under t's routes, are
      remembered; every text layer's VU gate is refit from zero (L2-regularised softmax
      regression) on all remembered tasks. Since nothing an earlier task routes through
      changes later, earlier tasks' remembered inputs stay exactly what they produce.
    """

    name = "smolora_learned"
    router_training: RouterTraining = "learned"
    #: Training requests whose prompt-only mean layer inputs are remembered per task and layer.
    probe_size = 256
    #: L2 weight of the VU gate fit.
    gate_l2 = 1e-3

    def __init__(self, run: RunConfig, instructions: InstructionEncoder):
        super().__init__(run, instructions)
        self.memory = RouteMemory()
        self.fit_log: list[dict[str, Any]] = []
        self._grad_mask: dict[str, Tensor] = {}
        self._pins: dict[str, int] | None = None

    def build_adapter(self, model: nn.Module) -> SMoLoRAModel:
        smodel = super().build_adapter(model)
        for name, layer in smodel.layers.items():
            self._grad_mask[name] = torch.ones(layer.config.num_experts)
            for param in (layer.lora_A, layer.lora_B):
                param.register_hook(
                    lambda g, name=name: g * self._grad_mask[name].to(g)[:, None, None]
                )
        return smodel

    def trainable_experts(self, layer: str) -> list[int]:
        """Global ids of the experts of `layer` that receive gradient in the current task."""
        return [int(e) for e in self._grad_mask[layer].nonzero().flatten()]

    # -- stages -----------------------------------------------------------------------
    def prepare_task(self, index: int, task: str, examples: list[Example], probe: Probe) -> None:
        """Assign this task's experts in every layer, refit the IF gates, set the gradient
        mask (see the class doc)."""
        self.probe = probe
        self.memory.truncate(index)
        self.fit_log = [log for log in self.fit_log if log["stage"] < index]
        texts = sorted({ex.instruction for ex in examples})
        inst = self.embed(texts).float()
        half = self.smodel.config.experts_per_group
        log: dict[str, Any] = {"stage": index, "task": task, "layers": {}}
        for name, layer in self.smodel.layers.items():
            if_expert = self.memory.if_expert_for(name, texts)
            if if_expert is None:
                if_expert = pick_expert(self.memory.loads(name, "if", half))
            self.memory.entries.append(
                RouteEntry(index, task, name, "if", if_expert, inst, tuple(texts))
            )
            vu_expert = None
            if not layer.image_side:
                vu_expert = pick_expert(
                    self.memory.loads(name, "vu", half),
                    avoid=self.memory.vu_paired_with(name, if_expert),
                )
                # Inputs are filled in by `end_task`, once the task's experts have trained.
                self.memory.entries.append(
                    RouteEntry(
                        index, task, name, "vu", vu_expert, torch.zeros(0, layer.gate_vu.shape[1])
                    )
                )
            x, y = self.memory.training_set(name, "if")
            with torch.no_grad():
                layer.gate_if.copy_(fit_gate(layer.gate_if, x, y))
            mask = torch.zeros(self.smodel.config.num_experts)
            mask[self.memory.owned(name, index, half)] = 1.0
            self._grad_mask[name] = mask
            log["layers"][name] = {
                "vu": vu_expert,
                "if": if_expert,
                "trains": self.trainable_experts(name),
                "fit_accuracy": {"if": gate_accuracy(layer.gate_if, x, y)},
            }
        self.fit_log.append(log)

    def begin_task(self, index: int, task: str) -> None:
        for layer in self.smodel.layers.values():
            layer.fuse_vu.requires_grad_(index == 0)
            layer.fuse_if.requires_grad_(index == 0)
        self._pins = self._vu_routes(index)

    def end_task(self, index: int, task: str, examples: list[Example]) -> None:
        """Remember this task's prompt-only mean inputs under its routes; refit the VU gates."""
        self._pins = None
        assert self.probe is not None, "end_task needs the trainer's probe"
        step = max(1, len(examples) // self.probe_size)
        sample = examples[::step][: self.probe_size]
        pins = self._vu_routes(index)
        feats = self._prompt_means(sample, pins)
        for e in self.memory.entries:
            if e.stage == index and e.kind == "vu":
                e.feats = feats[e.layer]
        log = next((log for log in self.fit_log if log["stage"] == index), None)
        if log is None:  # resumed run: prepare_task's log is in the saved state, or rebuild it
            log = {"stage": index, "task": task, "layers": {n: {} for n in self.smodel.layers}}
            self.fit_log.append(log)
        half = self.smodel.config.experts_per_group
        for name, layer in self.smodel.layers.items():
            acc = log["layers"].setdefault(name, {}).setdefault("fit_accuracy", {})
            if layer.image_side:
                acc["vu"] = None
                continue
            x, y = self.memory.training_set(name, "vu", upto=index)
            with torch.no_grad():
                layer.gate_vu.copy_(
                    fit_gate_fresh(half, x, y, l2=self.gate_l2).to(layer.gate_vu.dtype)
                )
            acc["vu"] = gate_accuracy(layer.gate_vu, x, y)
        worst = min(
            v["fit_accuracy"]["vu"]
            for v in log["layers"].values()
            if v["fit_accuracy"].get("vu") is not None
        )
        logger.info(
            "%s: VU gates refit after task %d (%s); worst remembered-route accuracy %.3f",
            self.name,
            index,
            task,
            worst,
        )

    # -- forwards ---------------------------------------------------------------------
    def pinned_vu(self, batch_size: int, device: Any) -> dict[str, Tensor] | None:
        """While a task trains (and while its inputs are probed): its assigned VU experts."""
        if self._pins is None:
            return None
        return {
            name: torch.full((batch_size,), e, dtype=torch.long, device=device)
            for name, e in self._pins.items()
        }

    def _vu_routes(self, index: int) -> dict[str, int]:
        """Stage `index`'s VU expert per text layer (from the route memory)."""
        return {
            e.layer: e.expert for e in self.memory.entries if e.stage == index and e.kind == "vu"
        }

    # -- state ------------------------------------------------------------------------
    def run_state(self) -> Any:
        return {"route_memory": self.memory.to_list(), "fit_log": self.fit_log}

    def load_run_state(self, state: Any) -> None:
        self.memory = RouteMemory.from_list(state.get("route_memory"))
        self.fit_log = list(state.get("fit_log", []))

    def _prompt_means(self, examples: list[Example], pins: dict[str, int]) -> dict[str, Tensor]:
        """Per-request prompt-only mean inputs of every text layer, `[n, d_in]` each, with
        the VU routes pinned to `pins` (IF routes from the gates)."""
        got: dict[str, list[Tensor]] = {name: [] for name in pins}
        handles = []

        def hook(mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            ctx = self._ctx
            assert ctx is not None
            x = args[0]
            layout = ctx.text_layout(x)
            xf = x.detach().reshape(-1, x.shape[-1])
            got[mod.name].append(
                smolora_router.segment_mean(xf, layout.owners, layout.valid, layout.num_segments)
            )  # type: ignore[attr-defined]

        for name in pins:
            handles.append(self.smodel.layers[name].register_forward_pre_hook(hook))
        self._pins = pins
        try:
            assert self.probe is not None
            self.probe(examples, with_answers=False)
        finally:
            self._pins = None
            for h in handles:
                h.remove()
        return {name: torch.cat(v).float() for name, v in got.items()}
