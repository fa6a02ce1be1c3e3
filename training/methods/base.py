"""The seam between the continual trainer and one continual-learning method.

`ContinualMethod` says how a method adapts the frozen base (which adapter), what trains in
each task, how batches are drawn (e.g. replay mixing), what a forward needs per batch
(e.g. a SMoLoRA routing context), which weights answer a task at evaluation (e.g. DirLoRA's
per-task LoRA), and what is published. Defaults describe a plain sequential adapter; each
method file overrides only what differs. The trainer (`training/trainer.py`) owns the loop,
optimiser, evaluation and publishing; methods never write files.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from smolora.adapters.adapter_model import AdapterModel
from smolora.adapters.instructions import InstructionEncoder
from smolora.training.config import RunConfig
from smolora.training.data.batches import next_indices
from smolora.training.data.cvit_json import Example
from smolora.training.evaluate import MaskHook, no_scope


class Probe(Protocol):
    """Runs a no-grad forward of `examples` through the adapted model under the method's
    scope: with their answers appended (as in training) or prompts only (as at prefill)."""

    def __call__(self, examples: list[Example], with_answers: bool) -> None: ...


class LossFn(Protocol):
    """The training loss (mean over answer tokens, with grad) of `examples` under the
    method's scope, in the model's current train/eval mode."""

    def __call__(self, examples: list[Example]) -> Tensor: ...


class ContinualMethod:
    """Base class: one adapter trained task after task (SeqLoRA semantics).

    Args:
        run: the run configuration (sizes, seed, replay settings).
        instructions: the MiniLM encoder (methods that route by instruction use it).

    Class attributes:
        name: method key (as in results and manifests).
        adapter_kind: manifest `adapter_kind` ("smolora", "lora", "moelora" or "none").
        trains: False for methods that never train (zero-shot).
        joint: True when all tasks are trained together in one stage (multitask).
    """

    name = "base"
    adapter_kind = "lora"
    trains = True
    joint = False
    #: The trainer's no-grad forward (see `Probe`), set by the trainer before any stage
    #: (also when resuming, where `end_task` runs without `prepare_task`).
    probe: Probe | None = None
    #: The trainer's loss of a batch with grad (see `LossFn`), set like `probe`.
    loss: LossFn | None = None

    def __init__(self, run: RunConfig, instructions: InstructionEncoder):
        self.run = run
        self.instructions = instructions
        self.adapter: AdapterModel | None = None
        self.model: nn.Module | None = None

    # -- building ---------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Freeze the base and inject this method's adapter."""
        self.model = model
        self.adapter = self.build_adapter(model)
        if self.adapter is None:
            for p in model.parameters():
                p.requires_grad_(False)

    def build_adapter(self, model: nn.Module) -> AdapterModel | None:
        raise NotImplementedError

    def adapter_config(self) -> dict[str, Any]:
        """The adapter's config dict for the manifest."""
        return self.adapter.config.to_dict() if self.adapter is not None else {}  # type: ignore[attr-defined]

    # -- one task stage ---------------------------------------------------------------
    def prepare_task(self, index: int, task: str, examples: list[Example], probe: Probe) -> None:
        """Called before `begin_task` with the task's training examples and a way to run
        no-grad forwards of some of them (e.g. to fit routers); default: nothing."""

    def begin_task(self, index: int, task: str) -> None:
        """Called before training task number `index` (0-based)."""

    def batches(
        self, index: int, examples: list[Example], batch_size: int, rng: random.Random
    ) -> Iterator[list[Example]]:
        """Endless training batches: reshuffled passes over the task's examples."""
        order: list[int] = []
        while True:
            yield [examples[i] for i in next_indices(order, len(examples), batch_size, rng)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.adapter.trainable_parameters() if self.adapter is not None else []

    def auxiliary_loss(self) -> Tensor | None:
        """An extra loss term of the last forward (e.g. router load balancing), or None."""
        return None

    def end_task(self, index: int, task: str, examples: list[Example]) -> None:
        """Called after training (and before evaluating) task number `index`."""

    # -- forwards ---------------------------------------------------------------------
    def scope(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager[MaskHook]:
        """What a forward of `batch` needs (train and eval alike)."""
        return no_scope(batch)

    def evaluation(
        self, task: str, instruction_texts: list[str] | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """Weights that answer `task` (whose instructions are `instruction_texts`) at
        evaluation; default: the current ones."""
        return contextlib.nullcontext()

    # -- state ------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """What is published after a stage."""
        return self.adapter.adapter_state_dict() if self.adapter is not None else {}

    def load_state(self, index: int, task: str, tensors: dict[str, Tensor]) -> None:
        """Restore the state published after stage `index` (resume). The trainer then calls
        `end_task` for the stage, as after training, to rebuild derived state."""
        if self.adapter is not None:
            self.adapter.load_adapter_state_dict(tensors)

    def run_state(self) -> Any:
        """Method state beyond the published adapter that a resumed run needs (the trainer
        keeps it in the run folder); None when there is none."""
        return None

    def load_run_state(self, state: Any) -> None:
        """Restore what `run_state` returned."""

    def snapshot(self) -> Any:
        """Everything needed to undo a later stage (few-shot fine-tunes start from here)."""
        return {k: v.clone() for k, v in self.state_tensors().items()}

    def restore_snapshot(self, snap: Any) -> None:
        if self.adapter is not None:
            self.adapter.load_adapter_state_dict(snap)


def seeded_generator(seed: int, *parts: Any) -> torch.Generator:
    """A CPU generator seeded from a seed and labels (stable across processes)."""
    h = random.Random("|".join(str(p) for p in (seed, *parts))).randrange(1 << 62)
    return torch.Generator().manual_seed(h)
