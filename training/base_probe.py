"""What an aligned base knows about its pictures: teacher-forced accuracy per visual fact.

A base's held-out loss says how well it describes pictures on average, but not which facts
it gets wrong, and the tasks ask for different facts (ImageNet the shape, TextVQA the sign
word, GQA positions, VQAv2 colours). This probe feeds a held-out description with teacher
forcing and counts a fact as known when every token of its words is the model's top
prediction, given the picture and the description up to it. Facts are read from the
description's fixed sentence forms (`training/data/scene.py: DESCRIPTION_FORMS`): the
scene ("This is a beach scene.") or a book cover's colour, each object's size, colour,
shape and position ("There is a small red circle at the top left."), the sign ("A sign
says open.") and a book's title.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.cvit_json import Example
from smolora.training.data.scene import DESCRIPTION_FORMS

FACTS = ("scene", "cover", "size", "colour", "shape", "position", "sign", "title")


def fact_spans(answer: str) -> list[tuple[str, int, int]]:
    """(fact, start, end) character spans of the facts stated in a description."""
    spans = []
    for pattern, names in DESCRIPTION_FORMS:
        for m in pattern.finditer(answer):
            for i, name in enumerate(names, start=1):
                if m.group(i) is not None:
                    spans.append((name, m.start(i), m.end(i)))
    return sorted(spans, key=lambda s: s[1])


@torch.no_grad()
def probe_facts(
    model: torch.nn.Module,
    encoder: ExampleEncoder,
    examples: Sequence[Example],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> dict[str, dict[str, float | int]]:
    """Teacher-forced accuracy per fact over `examples` (descriptions).

    Returns:
        {fact: {"accuracy": %, "n": count}} for each fact that occurs, plus "all".
    """
    tokenizer = encoder.tokenizer
    was_training = model.training
    model.eval()
    right: dict[str, int] = {}
    seen: dict[str, int] = {}
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i : i + batch_size])
        batch = encoder.collate_train(chunk)
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        predicted = model(**tensors).logits.argmax(-1).cpu()  # position t predicts t + 1
        for row, ex in enumerate(chunk):
            enc = encoder.encode(ex)
            text = " " + ex.answer + encoder.eos_token
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
                "offset_mapping"
            ]
            if len(offsets) != len(enc.answer_ids):
                raise ValueError(f"tokenisation of {ex.id!r} does not match its encoding")
            first = len(enc.prompt_ids)  # index of the first answer token in the sequence
            for name, start, end in fact_spans(ex.answer):
                start, end = start + 1, end + 1  # the leading space
                tokens = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
                ok = all(int(predicted[row, first + j - 1]) == enc.answer_ids[j] for j in tokens)
                seen[name] = seen.get(name, 0) + 1
                right[name] = right.get(name, 0) + int(ok)
    model.train(was_training)
    out: dict[str, dict[str, float | int]] = {
        name: {"accuracy": 100.0 * right[name] / seen[name], "n": seen[name]}
        for name in FACTS
        if name in seen
    }
    total = sum(seen.values())
    out["all"] = {"accuracy": 100.0 * sum(right.values()) / max(total, 1), "n": total}
    return out
