"""Continual-learning methods, one file each, behind the `ContinualMethod` seam."""

from __future__ import annotations

from smolora.adapters.instructions import InstructionEncoder
from smolora.training.config import RunConfig
from smolora.training.methods.base import ContinualMethod
from smolora.training.methods.dirlora import DirLoRAMethod
from smolora.training.methods.dora import DoRAMethod
from smolora.training.methods.ewc import EWCMethod
from smolora.training.methods.moelora import MoELoRAMethod
from smolora.training.methods.multitask import MultitaskMethod
from smolora.training.methods.replay import ReplayMethod
from smolora.training.methods.seqlora import SeqLoRAMethod
from smolora.training.methods.smolora import LearnedSMoLoRAMethod, SMoLoRAMethod
from smolora.training.methods.zeroshot import ZeroShotMethod

METHODS: dict[str, type[ContinualMethod]] = {
    m.name: m
    for m in (
        SMoLoRAMethod,
        LearnedSMoLoRAMethod,
        SeqLoRAMethod,
        MoELoRAMethod,
        EWCMethod,
        ReplayMethod,
        DoRAMethod,
        DirLoRAMethod,
        MultitaskMethod,
        ZeroShotMethod,
    )
}


def build_method(run: RunConfig, instructions: InstructionEncoder) -> ContinualMethod:
    """The method object named by `run.method`."""
    return METHODS[run.method](run, instructions)


__all__ = ["METHODS", "ContinualMethod", "build_method"]
