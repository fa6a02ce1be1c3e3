"""Evaluate a (possibly adapted) LLaVA model on task examples by greedy generation.

What it does: batched, left-padded greedy decoding with the KV cache for any adapter
method (the method supplies a `BatchScope`: for SMoLoRA it opens the routing context and
marks real tokens at prefill, exactly as `adapters/reference_generate.py` does), then
scores the answers (accuracy or CIDEr-D) and the format-following rate behind MIF.
What it does not do: train, or decide which adapter weights are loaded (the method's
`evaluation` scope does that).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from smolora.adapters.reference_generate import greedy_decode
from smolora.training import metrics
from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.cvit_json import Example
from smolora.training.data.tasks import TASKS, TaskSpec

logger = logging.getLogger(__name__)

#: Called before every forward with the mask of real tokens (`[B, T]`, or None at decode).
MaskHook = Callable[[Tensor | None], None]


class BatchScope(Protocol):
    """Opens whatever a forward of this batch needs (e.g. a SMoLoRA routing context)."""

    def __call__(self, batch: dict[str, Any]) -> contextlib.AbstractContextManager[MaskHook]: ...


@contextlib.contextmanager
def no_scope(batch: dict[str, Any]) -> Iterator[MaskHook]:
    """The scope of adapters that need nothing per batch."""
    yield lambda mask: None


@dataclass
class TaskResult:
    """Evaluation of one task.

    Attributes:
        task: task name.
        score: 0-100, the balanced scale (accuracy, or CIDEr-D x 10 for captions; see
            `metrics.py` for the paper's scale).
        format_rate: 0-100 share of answers that follow the instruction's format.
        n: examples evaluated.
        metric: "accuracy" or "cider".
        raw_cider: mean CIDEr-D (caption tasks only).
        predictions: (id, prediction, answer) per example.
    """

    task: str
    score: float
    format_rate: float
    n: int
    metric: str
    raw_cider: float | None = None
    predictions: list[tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = {
            "score": round(self.score, 4),
            "format_rate": round(self.format_rate, 4),
            "n": self.n,
            "metric": self.metric,
        }
        if self.raw_cider is not None:
            d["cider_d"] = round(self.raw_cider, 4)
        return d


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    batch: dict[str, Any],
    scope: BatchScope,
    max_new_tokens: int,
    eos_token_id: int,
) -> list[list[int]]:
    """Greedy-decode a left-padded batch under the method's scope (the reference loop,
    `adapters/reference_generate.greedy_decode`).

    Args:
        model: a LLaVA model (adapted or not), in eval mode.
        batch: `ExampleEncoder.collate_generate` output (`input_ids`, `attention_mask`
            `[B, T]`, `pixel_values` `[B, 3, H, W]`, absent for a text-only batch).
        scope: opens the method's per-batch context.
        max_new_tokens: decoding budget.
        eos_token_id: stops a row once generated.

    Returns:
        Generated token ids per row (EOS included when reached).
    """
    param = next(model.parameters())
    inputs = {
        "input_ids": batch["input_ids"].to(param.device),
        "attention_mask": batch["attention_mask"].to(param.device),
    }
    if "pixel_values" in batch:  # absent for a text-only batch
        inputs["pixel_values"] = batch["pixel_values"].to(param.device, dtype=param.dtype)
    with scope(batch) as set_mask:
        return greedy_decode(model, inputs, max_new_tokens, eos_token_id, set_mask)


def score_predictions(
    spec: TaskSpec, examples: Sequence[Example], predictions: Sequence[str]
) -> TaskResult:
    """Score generated answers of one task.

    Returns:
        A `TaskResult` (predictions included).
    """
    refs = [list(ex.references) for ex in examples]
    fmt = [metrics.follows_format(p, spec.answer_format, r) for p, r in zip(predictions, refs)]
    raw = None
    if spec.metric == "cider":
        raw = sum(metrics.cider_d(predictions, refs)) / max(1, len(predictions))
        score = metrics.BALANCED_CIDER_SCALE * raw
    else:
        correct = [
            metrics.score_answer(p, r, spec.answer_format) for p, r in zip(predictions, refs)
        ]
        score = 100.0 * sum(correct) / max(1, len(correct))
    return TaskResult(
        task=spec.name,
        score=score,
        format_rate=100.0 * sum(fmt) / max(1, len(fmt)),
        n=len(examples),
        metric=spec.metric,
        raw_cider=raw,
        predictions=[(ex.id, p, ex.answer) for ex, p in zip(examples, predictions)],
    )


def spec_for(task: str, examples: Sequence[Example]) -> TaskSpec:
    """The mini-CVIT spec of a task; real CVIT tasks fall back to a short-answer spec."""
    if task in TASKS:
        return TASKS[task]
    fmt = (
        "letter"
        if all(len(ex.answer.strip()) == 1 and ex.answer.strip().isupper() for ex in examples)
        else "short"
    )
    return TaskSpec(
        task, task, "upstream", "accuracy", fmt, tuple(f"t{i}" for i in range(5)), ("h0", "h1"), 16
    )


def evaluate_task(
    model: nn.Module,
    encoder: ExampleEncoder,
    examples: Sequence[Example],
    scope: BatchScope = no_scope,
    batch_size: int = 32,
    spec: TaskSpec | None = None,
    progress: bool = False,
) -> TaskResult:
    """Generate answers for `examples` (all of one task) and score them.

    Args:
        model: the model (put in eval mode here and restored after).
        encoder: tokenizes the examples.
        examples: the task's test examples.
        scope: the method's per-batch scope.
        batch_size: generation batch size.
        spec: the task's spec (default: looked up by the examples' task name).
        progress: show a progress bar.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    task = examples[0].task
    spec = spec or spec_for(task, examples)
    was_training = model.training
    model.eval()
    preds: list[str] = []
    eos = encoder.tokenizer.eos_token_id
    try:
        for s in tqdm(
            range(0, len(examples), batch_size),
            desc=f"eval {task}",
            leave=False,
            disable=not progress,
        ):
            chunk = examples[s : s + batch_size]
            out = greedy_generate(
                model, encoder.collate_generate(chunk), scope, spec.max_new_tokens, eos
            )
            preds.extend(encoder.decode(o) for o in out)
    finally:
        model.train(was_training)
    return score_predictions(spec, examples, preds)
