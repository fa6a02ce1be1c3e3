"""Replay: SeqLoRA plus a memory buffer of past tasks mixed into every batch.

After each task, `replay_size` of its training examples (a seeded random subset) join the
buffer; while training a later task, `replay_ratio` of each batch is drawn uniformly from
the buffer. The buffer is a deterministic function of the data and seed, so a resumed run
rebuilds it without storing it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from smolora.training.data.cvit_json import Example
from smolora.training.methods.seqlora import SeqLoRAMethod


class ReplayMethod(SeqLoRAMethod):
    """SeqLoRA with experience replay."""

    name = "replay"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buffer: list[Example] = []

    def batches(
        self, index: int, examples: list[Example], batch_size: int, rng: random.Random
    ) -> Iterator[list[Example]]:
        n_replay = int(round(self.run.replay_ratio * batch_size)) if self.buffer else 0
        current = super().batches(index, examples, batch_size - n_replay, rng)
        for batch in current:
            yield batch + [self.buffer[rng.randrange(len(self.buffer))] for _ in range(n_replay)]

    def end_task(self, index: int, task: str, examples: list[Example]) -> None:
        rng = random.Random(f"{self.run.seed}|replay|{task}")
        self.buffer.extend(rng.sample(examples, min(self.run.replay_size, len(examples))))

    def snapshot(self):
        return (super().snapshot(), list(self.buffer))

    def restore_snapshot(self, snap) -> None:
        tensors, buffer = snap
        super().restore_snapshot(tensors)
        self.buffer = buffer
