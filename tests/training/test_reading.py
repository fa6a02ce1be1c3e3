"""Text-skill exercises: a repeat's answer is its words, a lookup's letter names the option
asked for and an option exercise's word the letter asked for, a question's letter names the
option the passage supports, every kind and letter is used, no task template is reused, and
an alignment with a reading share trains on them and reports accuracy per kind."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from smolora.training.data.cvit_json import Example
from smolora.training.data.reading import (
    KIND_WEIGHTS,
    READING_INSTRUCTIONS,
    REPEAT_WORDS,
    exercise_kind,
    reading_exercise,
)
from smolora.training.data.scene import CELL_NAMES, parse_description
from smolora.training.data.tasks import TASKS
from smolora.training.pretrain import PretrainConfig, pretrain_base, with_reading

PASSAGES = (
    "This is a night scene. There is a large red square at the right. "
    "There is a small yellow diamond at the bottom left. A sign says cat.",
    "This is a beach scene. There is a green hexagon in the middle.",
    "This is a red book cover. The title is milk. There is a blue ring at the top.",
    "This is a field scene. There is a small purple star at the left. "
    "There is a large purple circle at the top. There is a small orange star at the right.",
)


def _description(text: str, i: int = 0) -> Example:
    return Example(f"d{i}", "pretrain", None, "Describe the image.", "Describe the image.", text)


def _supported(passage: str, question: str, option: str) -> bool:
    """Whether the passage supports `option` as the answer to `question` (read independently
    of how the exercise was made)."""
    facts = parse_description(passage)
    if question == "Which of these words does the passage use?":
        return any(option in (o.colour, o.shape) for o in facts.objects)
    if question == "What kind of scene does the passage describe?":
        return option == facts.background
    m = re.fullmatch(r"In the passage, (what colour|where) is the (\w+)\?", question)
    assert m is not None, question
    (obj,) = [o for o in facts.objects if o.shape == m.group(2)]
    return option == (obj.colour if m.group(1) == "what colour" else CELL_NAMES[obj.cell])


def _options(lines: list[str]) -> dict[str, str]:
    """letter -> option of "A. word" lines, checking the letters run A, B, ..."""
    options = dict(line.split(". ", 1) for line in lines)
    assert list(options) == list("ABCD"[: len(options)]) and 2 <= len(options) <= 4
    assert len(set(options.values())) == len(options)
    return options


def test_each_exercise_is_answered_by_what_its_prompt_states():
    rng = random.Random(0)
    kinds: Counter[str] = Counter()
    letters: Counter[str] = Counter()
    questions: Counter[str] = Counter()
    for i in range(600):
        passage = PASSAGES[i % len(PASSAGES)]
        ex = reading_exercise(_description(passage, i), rng)
        assert ex is not None and ex.task == "reading" and ex.references == (ex.answer,)
        kind = exercise_kind(ex)
        kinds[kind] += 1
        if kind == "repeat":
            assert ex.prompt == f"{ex.instruction} {ex.answer}"
            words = ex.answer
            assert 3 <= len(words.split()) <= 10 and set(words.split()) <= set(REPEAT_WORDS)
            continue
        if kind in ("lookup", "option"):
            head, *lines, question = ex.prompt.split("\n")
            assert head == "Options:" and question == ex.instruction
            options = _options(lines)
            if kind == "lookup":
                word = re.fullmatch(r"Which option is (.+)\? Give its letter\.", question)
                assert word is not None and options[ex.answer] == word.group(1)
                letters[ex.answer] += 1
            else:
                letter = re.fullmatch(r"Which word is option ([A-D])\?", question)
                assert letter is not None and options[letter.group(1)] == ex.answer
            continue
        assert kind == "question"
        head, question, *lines, instruction = ex.prompt.split("\n")
        assert head == f"Passage: {passage}" and instruction in READING_INSTRUCTIONS
        options = _options(lines)
        supported = [k for k, v in options.items() if _supported(passage, question, v)]
        assert supported == [ex.answer]
        letters[ex.answer] += 1
        questions[question.rsplit(" ", 1)[0]] += 1
    assert set(kinds) == set(KIND_WEIGHTS)
    for kind, weight in KIND_WEIGHTS.items():  # drawn by weight (600 draws: within 6 points)
        assert abs(kinds[kind] / 600 - weight) < 0.06, (kind, kinds)
    assert set(letters) == set("ABCD")
    assert len(questions) == 4  # word, colour, where, scene


def test_no_task_template_is_a_reading_instruction():
    templates = {t for spec in TASKS.values() for t in (*spec.templates, *spec.heldout)}
    assert not templates & set(READING_INSTRUCTIONS)


def test_nothing_to_ask_and_no_share_leave_the_batch_alone():
    rng = random.Random(0)
    drawn = [reading_exercise(_description("Describe nothing."), rng) for _ in range(100)]
    assert None in drawn  # a question was drawn: nothing to ask about
    assert all(exercise_kind(ex) != "question" for ex in drawn if ex is not None)
    batch = [_description(p, i) for i, p in enumerate(PASSAGES)]
    assert with_reading(batch, 0.0, "0|0") is batch
    half = with_reading(batch, 0.5, "0|7")
    assert [e.task for e in half] == ["reading", "reading", "pretrain", "pretrain"]
    assert half == with_reading(batch, 0.5, "0|7")  # seeded by the step: a resume redraws them
    assert half[:2] != with_reading(batch, 0.5, "0|8")[:2]


def test_alignment_with_reading_records_heldout_accuracy(data_root: Path, tmp_path: Path):
    cfg = PretrainConfig(
        data_root=data_root,
        out_dir=tmp_path / "base",
        preset="tiny",
        steps=2,
        batch_size=4,
        dtype="float32",
        heldout=4,
        reading_share=0.5,
    )
    info = json.loads((pretrain_base(cfg, progress=False) / "alignment.json").read_text())
    assert info["config"]["reading_share"] == 0.5
    accuracy = info["heldout_reading_accuracy"]
    assert set(accuracy) >= {"all"} and set(accuracy) <= {"all", *KIND_WEIGHTS}
    assert all(0.0 <= v <= 100.0 for v in accuracy.values())
