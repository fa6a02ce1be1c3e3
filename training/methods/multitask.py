"""Multitask: one LoRA trained jointly on all tasks at once (the upper bound).

A single stage over the shuffled union of every task's training data, with as many steps
as the whole sequence gets. Its accuracy matrix has one row (MAP and BWT are undefined).
"""

from __future__ import annotations

from smolora.training.methods.seqlora import SeqLoRAMethod


class MultitaskMethod(SeqLoRAMethod):
    """Joint training of one LoRA."""

    name = "multitask"
    joint = True
