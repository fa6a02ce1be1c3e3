"""The instruction extraction rule and snapping (pure logic; one test with the real MiniLM)."""

from __future__ import annotations

import pytest
import torch

from smolora.adapters.instructions import (
    InstructionTable,
    InstructionType,
    extract_instruction,
    is_imperative,
)
from smolora.server.instruction_source import InstructionResolver, UnknownInstructionTypeError
from tests.server.api.helpers import INSTRUCTIONS, HashingEmbedder

DEFAULT = "Provide a one-sentence caption for the provided image."


@pytest.mark.parametrize(
    "text,expected,rule",
    [
        (
            "What colour is the circle?\nAnswer the question using a single word or phrase.",
            "Answer the question using a single word or phrase.",
            "trailing_imperative",
        ),
        (
            "What colour is the circle? Answer the question using a single word or phrase.",
            "Answer the question using a single word or phrase.",
            "trailing_imperative",
        ),
        (
            "Which shape is red?\nA. circle\nB. square\n"
            "Answer with the option's letter from the given choices directly.",
            "Answer with the option's letter from the given choices directly.",
            "trailing_imperative",
        ),
        (
            "Describe the image briefly. Use one sentence.",
            "Describe the image briefly. Use one sentence.",
            "trailing_imperative",
        ),
        ("Is it red? Please answer yes or no.", "Please answer yes or no.", "trailing_imperative"),
        ("How many shapes are there?", "How many shapes are there?", "whole_text"),
        # Several lines with no instruction sentence: the last line, where CVIT puts its
        # template (training's rule; serving used to take the whole text).
        ("The circle is red.\nWhat colour is it?", "What colour is it?", "last_line"),
        ("", DEFAULT, "default"),
        ("   \n  ", DEFAULT, "default"),
    ],
)
def test_extraction_rule(text: str, expected: str, rule: str) -> None:
    got = extract_instruction(text, DEFAULT)
    assert (got.text, got.rule) == (expected, rule)


def test_questions_are_never_imperative() -> None:
    assert not is_imperative("Describe what?")
    assert is_imperative("Read the text in the image.")
    assert not is_imperative("A. circle")


def _table(emb: HashingEmbedder) -> InstructionTable:
    names = ("vqa_short", "mc_letter")
    vecs = emb.encode([INSTRUCTIONS[n][0] for n in names])
    return InstructionTable(
        [
            InstructionType(n, INSTRUCTIONS[n][0], INSTRUCTIONS[n][1], tuple(v.tolist()))
            for n, v in zip(names, vecs)
        ]
    )


def test_resolution_order_and_snapping() -> None:
    emb = HashingEmbedder()
    table = _table(emb)
    r = InstructionResolver(emb, snap_threshold=0.75, default_instruction=DEFAULT)
    typed = r.resolve(table, "anything", instruction_type="mc_letter")
    assert (typed.source, typed.type_name, typed.similarity) == ("type", "mc_letter", 1.0)
    assert typed.embedding == table.get("mc_letter").embedding
    explicit = r.resolve(
        table, "What colour?\nAnswer with the option's letter.", instruction="Say it loud."
    )
    assert explicit.source == "explicit" and explicit.text == "Say it loud."
    snapped = r.resolve(table, "What colour?\nAnswer the question using a single word or phrase.")
    assert (snapped.source, snapped.type_name, snapped.rule) == (
        "snapped",
        "vqa_short",
        "trailing_imperative",
    )
    assert snapped.embedding == table.get(
        "vqa_short"
    ).embedding and snapped.similarity == pytest.approx(1.0)
    loose = r.resolve(table, "Tell me a story about dragons.")
    assert (
        loose.source == "extracted"
        and loose.similarity < 0.75
        and loose.text == "Tell me a story about dragons."
    )
    assert len(loose.embedding) == 384
    with pytest.raises(UnknownInstructionTypeError, match="known: vqa_short, mc_letter"):
        r.resolve(table, "x", instruction_type="nope")


def test_empty_table_never_snaps() -> None:
    r = InstructionResolver(HashingEmbedder(), 0.75, DEFAULT)
    got = r.resolve(InstructionTable(), "Answer the question using a single word or phrase.")
    assert got.source == "extracted" and got.type_name is None and got.similarity is None


def test_minilm_snaps_a_paraphrase_to_its_type(instruction_encoder) -> None:
    names = ("vqa_short", "mc_letter", "caption")
    vecs = instruction_encoder.encode([INSTRUCTIONS[n][0] for n in names])
    table = InstructionTable(
        [
            InstructionType(n, INSTRUCTIONS[n][0], INSTRUCTIONS[n][1], tuple(v.tolist()))
            for n, v in zip(names, vecs)
        ]
    )
    r = InstructionResolver(instruction_encoder, 0.75, DEFAULT)
    got = r.resolve(
        table,
        "Which one is red?\nA. circle\nB. star\nAnswer with the letter of the correct option.",
    )
    assert (got.source, got.type_name) == ("snapped", "mc_letter") and got.similarity >= 0.75
    assert torch.allclose(torch.tensor(got.embedding), vecs[1])
    unrelated = r.resolve(table, "Tell me a joke.")
    assert unrelated.source == "extracted"
