"""Read and write instruction data in the LLaVA / CVIT JSON conversation format.

A file is a JSON list (or JSON-lines) of records. The training format, as in LLaVA-1.5 and
the paper's CVIT instruction files:

    {"id": "...", "image": "rel/path.png",
     "conversations": [{"from": "human", "value": "<image>\\n{question}\\n{instruction}"},
                       {"from": "gpt", "value": "{answer}"}]}

The evaluation format of CVIT/CoIN question files is also read: `{"question_id", "image",
"text", "answer"}` (`label` or `answers` are accepted for the answer). mini-CVIT adds
optional keys (`task`, `instruction`, `question`, `references`) which real files lack.

Instruction rule (the reference embeds only a task's instruction template): the record's
`instruction` key if present; else `smolora.adapters.instructions.extract_instruction`, the
one rule serving applies too (trailing imperative sentences, else the longest known template
the prompt ends with, else the prompt's last line, where CVIT appends its template). Only the first
human/gpt turn of a multi-turn conversation is read. This module does not tokenize.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolora.adapters.instructions import IMAGE_PLACEHOLDER, extract_instruction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One instruction-following example.

    Attributes:
        id: record id.
        task: task name.
        image: absolute image path, or None for a text-only record.
        prompt: the user's text without the image placeholder (question + instruction).
        instruction: the instruction template (what SMoLoRA's IF router embeds).
        answer: the target / first reference answer.
        references: every acceptable answer (several for captions).
    """

    id: str
    task: str
    image: Path | None
    prompt: str
    instruction: str
    answer: str
    references: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.references:
            object.__setattr__(self, "references", (self.answer,))


def human_value(question: str, instruction: str) -> str:
    """The human turn of a mini-CVIT record: image placeholder, question, instruction."""
    body = f"{question}\n{instruction}" if question else instruction
    return f"{IMAGE_PLACEHOLDER}\n{body}"


def make_record(
    rid: str,
    image: str,
    question: str,
    instruction: str,
    answer: str,
    task: str,
    references: Sequence[str],
) -> dict[str, Any]:
    """A LLaVA-format record with mini-CVIT's extra keys."""
    return {
        "id": rid,
        "image": image,
        "conversations": [
            {"from": "human", "value": human_value(question, instruction)},
            {"from": "gpt", "value": answer},
        ],
        "task": task,
        "instruction": instruction,
        "question": question,
        "references": list(references),
    }


def _strip_placeholder(value: str) -> str:
    return (
        value.replace(IMAGE_PLACEHOLDER + "\n", "")
        .replace("\n" + IMAGE_PLACEHOLDER, "")
        .replace(IMAGE_PLACEHOLDER, "")
        .strip()
    )


def _read_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
    else:  # JSON lines
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON list of objects (or JSON lines)")
    return data


def parse_record(
    rec: dict[str, Any], task: str, image_root: Path | None, known_instructions: Sequence[str] = ()
) -> Example:
    """One record (training or evaluation format) -> `Example`.

    Raises:
        ValueError: if the record has neither conversations nor text+answer.
    """
    rid = str(rec.get("id", rec.get("question_id", "")))
    if "conversations" in rec:
        turns = rec["conversations"]
        human = next((t["value"] for t in turns if t.get("from") == "human"), None)
        gpt = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        if human is None or gpt is None:
            raise ValueError(f"record {rid!r}: conversations need a human and a gpt turn")
        prompt, answer = _strip_placeholder(str(human)), str(gpt).strip()
    elif "text" in rec:
        prompt = _strip_placeholder(str(rec["text"]))
        raw = rec.get("answer", rec.get("label", rec.get("answers", "")))
        answer = str(raw[0] if isinstance(raw, list) and raw else raw).strip()
    else:
        raise ValueError(f"record {rid!r}: neither 'conversations' nor 'text' is present")
    refs = (
        rec.get("references")
        or (rec.get("answers") if isinstance(rec.get("answers"), list) else None)
        or [answer]
    )
    instruction = (
        rec.get("instruction") or extract_instruction(prompt, known=known_instructions).text
    )
    image = rec.get("image")
    image_path = None
    if image:
        image_path = Path(image) if image_root is None else Path(image_root) / image
    return Example(
        id=rid,
        task=str(rec.get("task", task)),
        image=image_path,
        prompt=prompt,
        instruction=str(instruction),
        answer=answer,
        references=tuple(str(r) for r in refs),
    )


def load_examples(
    path: str | Path,
    task: str | None = None,
    image_root: str | Path | None = None,
    known_instructions: Sequence[str] = (),
    limit: int | None = None,
) -> list[Example]:
    """Load a LLaVA/CVIT JSON (or JSON-lines) file.

    Args:
        path: the file.
        task: task name for records without a `task` key (default: the file's parent folder).
        image_root: folder image paths are relative to (default: the file's folder).
        known_instructions: instruction templates to recognise at the end of prompts.
        limit: keep only the first `limit` records.

    Returns:
        Examples in file order.
    """
    p = Path(path)
    records = _read_records(p)[:limit]
    root = Path(image_root) if image_root is not None else p.parent
    name = task or p.parent.name
    return [parse_record(r, name, root, known_instructions) for r in records]


def write_records(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """Write records as an indented JSON list (atomically: temp file then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(list(records), indent=1))
    tmp.replace(p)
