"""DirLoRA: one fresh LoRA per task, chosen at evaluation by the oracle task id.

Each task trains a newly initialised LoRA (seeded by task), which is kept. Evaluating a
seen task loads that task's LoRA, so DirLoRA cannot forget (BWT = 0 up to evaluation
noise). An unseen task has no LoRA of its own: it gets the LoRA of the seen task whose
instruction embedding is most cosine-similar to its own (no oracle exists for it). The
version published after task t holds task t's LoRA; a resumed run reloads each version
(`load_state` then `end_task`, as for every method).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from smolora.training.data.cvit_json import Example
from smolora.training.methods.base import seeded_generator
from smolora.training.methods.seqlora import SeqLoRAMethod, lora_config


class DirLoRAMethod(SeqLoRAMethod):
    """A LoRA per task with oracle routing."""

    name = "dirlora"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_task: dict[str, dict[str, Tensor]] = {}
        self.task_instruction: dict[str, Tensor] = {}

    def begin_task(self, index: int, task: str) -> None:
        """Re-initialise the LoRA (A ~ N(0, init_std^2), B = 0) from a per-task seed."""
        gen = seeded_generator(self.run.seed, "dirlora", task)
        std = lora_config(self).init_std
        with torch.no_grad():
            for layer in self.adapter.layers.values():  # type: ignore[union-attr]
                a = torch.empty(layer.lora_A.shape).normal_(0.0, std, generator=gen)
                layer.lora_A.copy_(a)
                layer.lora_B.zero_()

    def end_task(self, index: int, task: str, examples: list[Example]) -> None:
        self.per_task[task] = {k: v.clone() for k, v in self.state_tensors().items()}
        texts = sorted({ex.instruction for ex in examples})
        self.task_instruction[task] = self.instructions.encode(texts).mean(0)

    def nearest_task(self, instruction_texts: list[str]) -> str:
        """The seen task whose instruction embedding is closest to these texts' mean."""
        query = self.instructions.encode(sorted(set(instruction_texts))).mean(0)
        names = list(self.task_instruction)
        keys = torch.stack([self.task_instruction[n] for n in names])
        sims = torch.nn.functional.cosine_similarity(keys, query[None], dim=-1)
        return names[int(torch.argmax(sims))]

    @contextlib.contextmanager
    def evaluation(self, task: str, instruction_texts: list[str] | None = None) -> Iterator[None]:
        """Load the task's own LoRA (or the nearest seen task's), restore afterwards."""
        if not self.per_task:
            yield
            return
        chosen = task if task in self.per_task else self.nearest_task(instruction_texts or [task])
        current = {k: v.clone() for k, v in self.state_tensors().items()}
        self.adapter.load_adapter_state_dict(self.per_task[chosen])  # type: ignore[union-attr]
        try:
            yield
        finally:
            self.adapter.load_adapter_state_dict(current)  # type: ignore[union-attr]

    def snapshot(self):
        return (super().snapshot(), dict(self.per_task), dict(self.task_instruction))

    def restore_snapshot(self, snap) -> None:
        tensors, per_task, keys = snap
        super().restore_snapshot(tensors)
        self.per_task, self.task_instruction = per_task, keys
