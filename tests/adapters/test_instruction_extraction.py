"""Training and serving find the same instruction in the same prompt: both go through
`smolora.adapters.instructions.extract_instruction` (training via the CVIT record parser,
serving via the instruction resolver), with the same known templates."""

from __future__ import annotations

import pytest

from smolora.adapters.instructions import InstructionTable, InstructionType, extract_instruction
from smolora.server.instruction_source import InstructionResolver
from smolora.training.data.cvit_json import parse_record
from tests.server.api.helpers import HashingEmbedder

VQA = "Answer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."
SHARE = "Share a concise interpretation of the image provided."  # no instruction verb first
KNOWN = (VQA, MC, SHARE)

# (prompt as a CVIT human turn / a chat user text, the instruction both must find, its rule)
CASES = [
    # paper-style CVIT prompts: the template on its own line after the question
    (f"<image>\nWhat colour is the circle?\n{VQA}", VQA, "trailing_imperative"),
    (f"<image>\nWhich shape is red?\nA. circle\nB. square\n{MC}", MC, "trailing_imperative"),
    (f"What is written on the sign?\n{VQA}", VQA, "trailing_imperative"),
    # llava-style placeholder after the text, and a template on the question's line
    (f"Is it red? {VQA}\n<image>", VQA, "trailing_imperative"),
    # a known template that does not read as an imperative
    (f"<image>\n{SHARE}", SHARE, "known_template"),
    (f"<image>\nWhat is in the picture? {SHARE}", SHARE, "known_template"),
    # multi-sentence instructions and texts
    ("Describe the image briefly. Use one sentence.", None, "trailing_imperative"),
    ("The circle is red. Is the square blue? Please answer yes or no.", None, None),
    ("The circle is red.\nThe square is blue.\nWhich one is larger?", None, "last_line"),
    ("<image>\nHow many shapes are there?", "How many shapes are there?", "whole_text"),
    # no text at all: the caller's default instruction (empty for training records)
    ("<image>", "", "default"),
    ("", "", "default"),
]


def _training_instruction(prompt: str) -> str:
    record = {
        "id": "1",
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "x"}],
    }
    return parse_record(record, "task", None, KNOWN).instruction


def _serving_instruction(prompt: str) -> tuple[str, str | None]:
    embedder = HashingEmbedder()
    table = InstructionTable(
        [
            InstructionType(f"t{i}", text, "task", tuple(v.tolist()))
            for i, (text, v) in enumerate(zip(KNOWN, embedder.encode(list(KNOWN))))
        ]
    )
    # A threshold above 1 never snaps, so the result carries the extracted text itself.
    resolver = InstructionResolver(embedder, snap_threshold=1.5, default_instruction="")
    resolved = resolver.resolve(table, prompt)
    assert resolved.source == "extracted"
    return resolved.extracted_text or "", resolved.rule


@pytest.mark.parametrize("prompt,expected,rule", CASES)
def test_training_and_serving_extract_the_same_instruction(
    prompt: str, expected: str | None, rule: str | None
) -> None:
    shared = extract_instruction(prompt, known=KNOWN)
    training = _training_instruction(prompt)
    serving, serving_rule = _serving_instruction(prompt)
    assert training == serving == shared.text
    assert serving_rule == shared.rule
    if expected is not None:
        assert shared.text == expected
    if rule is not None:
        assert shared.rule == rule


def test_multi_sentence_rules() -> None:
    got = extract_instruction("The circle is red. Is the square blue? Please answer yes or no.")
    assert (got.text, got.rule) == ("Please answer yes or no.", "trailing_imperative")
    got = extract_instruction("The circle is red.\nThe square is blue.\nWhich one is larger?")
    assert (got.text, got.rule) == ("Which one is larger?", "last_line")
    got = extract_instruction("Describe the image briefly. Use one sentence.")
    assert got.text == "Describe the image briefly. Use one sentence."


def test_the_default_is_the_callers() -> None:
    assert extract_instruction("  \n<image>\n", "Describe the image.").text == "Describe the image."
    assert extract_instruction("<image>\n", "Describe the image.").rule == "default"
