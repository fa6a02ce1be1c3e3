"""Language-model pretraining: give the from-scratch language model the text skills a
pretrained LLM has.

A real LLaVA starts from a language model (Vicuna) that can already copy from its prompt,
find an option and name its letter. The embedded models start from random weights, and an
alignment on descriptions teaches the language model to read the picture and ignore the
prompt's words; afterwards no amount of ScienceQA training teaches it to answer anything
but the most frequent letter (bench/README.md, "mini-CVIT base", has the numbers).

This stage trains the language model (embeddings, decoder, output head; not the vision
tower or the projector) on the text-skill exercises of `data/reading.py` as text-only
prompts: the alignment's descriptions serve as passages, and no picture is encoded, so a
step costs a fraction of an alignment step. The alignment then keeps the skills with a
`reading_share` of the same exercises, with the picture in the prompt.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from smolora.training.data.batches import next_indices
from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.cvit_json import Example
from smolora.training.data.reading import KIND_WEIGHTS, exercise_kind, reading_exercise
from smolora.training.data.tasks import TaskSpec
from smolora.training.evaluate import evaluate_task
from smolora.training.stage_loop import cosine_adamw, final_loss, loss_curve, optimizer_step

#: How text-skill exercises are scored: exact match, room for ten words.
SKILL_SPEC = TaskSpec(
    "reading",
    "text skills",
    "upstream",
    "accuracy",
    "short",
    tuple(f"t{i}" for i in range(5)),
    ("h0", "h1"),
    32,
)


#: The stage's curriculum: each phase's share of the steps and the kinds of exercise drawn
#: in it (`data/reading.KIND_WEIGHTS` keys). Copying comes first, alone: spread over the
#: whole mix it is learned several times slower, and everything else builds on it. Then
#: mostly word -> letter lookups, the slowest skill and the one ScienceQA needs; questions
#: about a passage last.
CURRICULUM: tuple[tuple[float, Mapping[str, float]], ...] = (
    (0.2, {"repeat": 1.0}),
    (0.6, {"repeat": 0.1, "lookup": 0.6, "option": 0.3}),
    (0.2, {"repeat": 0.1, "lookup": 0.4, "option": 0.2, "question": 0.3}),
)


def curriculum_weights(step: int, steps: int) -> Mapping[str, float]:
    """The kinds drawn at `step` (0-based) of a `steps`-step stage (`CURRICULUM`)."""
    done = 0.0
    for share, weights in CURRICULUM:
        done += share
        if step < round(done * steps):
            return weights
    return CURRICULUM[-1][1]


def skill_exercises(
    descriptions: Sequence[Example],
    rng: random.Random,
    text_only: bool,
    weights: Mapping[str, float] = KIND_WEIGHTS,
) -> list[Example]:
    """One exercise per description, of a kind drawn by `weights` (the description is a
    question's passage; one with nothing to ask about is skipped when a question is drawn),
    without the picture when `text_only`."""
    exercises = [r for ex in descriptions if (r := reading_exercise(ex, rng, weights)) is not None]
    return [replace(r, image=None) for r in exercises] if text_only else exercises


def skill_accuracy(
    model: nn.Module,
    encoder: ExampleEncoder,
    descriptions: Sequence[Example],
    seed: str,
    text_only: bool,
) -> dict[str, float]:
    """Greedy exact-match accuracy (%) on exercises made from `descriptions`, over all of
    them ("all") and per kind of exercise (`data/reading.KIND_WEIGHTS`)."""
    exercises = skill_exercises(descriptions, random.Random(f"{seed}|reading"), text_only)
    result = evaluate_task(model, encoder, exercises, spec=SKILL_SPEC)
    by_kind: dict[str, list[bool]] = {"all": []}
    for ex, (_, prediction, answer) in zip(exercises, result.predictions):
        right = prediction.strip() == answer
        by_kind["all"].append(right)
        by_kind.setdefault(exercise_kind(ex), []).append(right)
    return {k: round(100.0 * sum(v) / len(v), 2) for k, v in by_kind.items()}


def pretrain_language(
    model: nn.Module,
    encoder: ExampleEncoder,
    data: Sequence[Example],
    heldout: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    autocast_bf16: bool,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model`'s language model on text-only skill exercises (in place), kinds drawn
    by `CURRICULUM`, one cosine schedule over all steps.

    Args:
        data: descriptions the exercises are made from (their passages).
        heldout: descriptions whose exercises measure the skills at the end (may be empty).

    Returns:
        {"steps", "final_loss", "loss_curve" (50-step means), "train_seconds", "seconds"
        (with the held-out measurement), "heldout_accuracy": {"all" and per kind: %} or None}.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    params = []
    for name, p in model.named_parameters():
        train = "vision_tower" not in name and "multi_modal_projector" not in name
        p.requires_grad_(train)
        if train:
            params.append(p)
    optim, sched = cosine_adamw(params, lr, 0.0, steps, max(1, steps // 20))
    rng = random.Random(f"{seed}|language")
    order: list[int] = []
    losses: list[float] = []
    model.train()
    for step in tqdm(range(steps), desc="pretrain language", disable=not progress):
        indices = next_indices(order, len(data), batch_size, rng)
        exercises = skill_exercises(
            [data[i] for i in indices], rng, True, curriculum_weights(step, steps)
        )
        batch = encoder.collate_train(exercises)
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = model(**tensors).loss
        losses.append(optimizer_step(loss, params, optim, sched))
    for p in params:
        p.requires_grad_(False)
    train_seconds = time.perf_counter() - start
    accuracy = (
        skill_accuracy(model, encoder, heldout, f"{seed}|heldout", text_only=True)
        if heldout
        else None
    )
    return {
        "steps": steps,
        "final_loss": final_loss(losses),
        "loss_curve": loss_curve(losses),
        "heldout_accuracy": accuracy,
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
    }
