"""Which text of a request is its instruction, and which 384-d embedding routes it.

SMoLoRA routes its instruction-following experts by a MiniLM embedding of the task's
instruction *template* ("Answer the question using a single word or phrase."), never of
the question. A request names its instruction in one of three ways, in this order:

1. `smolora.instruction_type`: a known instruction type of the serving checkpoint; its
   stored embedding is used as is (source `"type"`, similarity 1).
2. `smolora.instruction`: free text; it is embedded as given (source `"explicit"`); the
   trace still reports the nearest known type and its similarity, for information.
3. Neither: the instruction is extracted from the last user message's text by
   `smolora.adapters.instructions.extract_instruction` (the one rule training uses too; the
   checkpoint's instruction texts are its known templates), embedded, and snapped to the
   nearest known type when the cosine similarity is at least the threshold (source
   `"snapped"`: the type's stored embedding is used); otherwise the extracted text's own
   embedding is used (source `"extracted"`). An empty text (an image-only request) uses the
   server's default instruction.

This module is pure logic over an `Embedder` (anything with `encode(texts) -> [n, 384]`)
and an `InstructionTable`; it neither loads MiniLM nor knows about HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from smolora.adapters.instructions import (
    EMBED_DIM,
    ExtractionRule,
    InstructionTable,
    extract_instruction,
)
from smolora.server.embedding_batcher import BatchedEncoder, Embedder

InstructionSourceName = Literal["type", "explicit", "snapped", "extracted"]


@dataclass(frozen=True)
class ResolvedInstruction:
    """The instruction a request is routed by.

    Attributes:
        source: "type", "explicit", "snapped" or "extracted" (see the module docstring).
        text: the instruction text (the type's text when a type was named or snapped to).
        type_name: the known type used or nearest to it; None when the table is empty.
        similarity: cosine similarity between the embedded text and `type_name`'s embedding.
        embedding: the 384-d vector handed to the engine.
        extracted_text: the text the extraction rule produced (sources snapped/extracted).
        rule: the extraction rule that applied (sources snapped/extracted).
        threshold: the snap threshold in force.
    """

    source: InstructionSourceName
    text: str
    type_name: str | None
    similarity: float | None
    embedding: tuple[float, ...]
    extracted_text: str | None = None
    rule: ExtractionRule | None = None
    threshold: float | None = None

    def to_trace(self) -> dict[str, Any]:
        """The JSON the response's `smolora.instruction` carries (no embedding)."""
        return {
            "source": self.source,
            "text": self.text,
            "type": self.type_name,
            "similarity": None if self.similarity is None else round(self.similarity, 6),
            "extracted_text": self.extracted_text,
            "rule": self.rule,
            "threshold": self.threshold,
        }


class UnknownInstructionTypeError(ValueError):
    """The request named an instruction type the checkpoint does not know."""


def _as_tuple(vec: Tensor) -> tuple[float, ...]:
    flat = vec.detach().to(torch.float32).reshape(-1)
    if flat.numel() != EMBED_DIM:
        raise ValueError(f"instruction embedding has {flat.numel()} values, expected {EMBED_DIM}")
    return tuple(float(x) for x in flat)


class InstructionResolver:
    """Resolves a request's instruction to an embedding (thread-safe; call it off the event loop).

    Args:
        embedder: MiniLM encoder (or a test double with the same `encode`).
        snap_threshold: cosine similarity at or above which extracted text snaps to a type.
        default_instruction: the instruction of an image-only request.
    """

    def __init__(self, embedder: Embedder, snap_threshold: float, default_instruction: str):
        self.snap_threshold = snap_threshold
        self.default_instruction = default_instruction
        # Concurrent requests share encode calls; one encode at a time (its LRU cache is not
        # thread-safe).
        self.encoder = BatchedEncoder(embedder)

    def embed(self, text: str) -> Tensor:
        """`[384]` embedding of one text."""
        return self.encoder.encode_one(text)

    def resolve(
        self,
        table: InstructionTable,
        user_text: str,
        instruction: str | None = None,
        instruction_type: str | None = None,
    ) -> ResolvedInstruction:
        """Pick the instruction and its embedding (see the module docstring for the order).

        Args:
            table: the serving checkpoint's known instruction types.
            user_text: the last user message's text.
            instruction: explicit instruction text from the request, if any.
            instruction_type: a known type name from the request, if any.

        Raises:
            UnknownInstructionTypeError: `instruction_type` is not in `table`.
        """
        if instruction_type is not None:
            t = table.get(instruction_type)
            if t is None:
                known = ", ".join(x.name for x in table.types) or "none"
                raise UnknownInstructionTypeError(
                    f"instruction type {instruction_type!r} is not known to this checkpoint "
                    f"(known: {known})"
                )
            return ResolvedInstruction("type", t.text, t.name, 1.0, tuple(t.embedding))
        if instruction is not None:
            emb = self.embed(instruction)
            nearest, sim = table.nearest(emb)
            return ResolvedInstruction(
                "explicit",
                instruction,
                nearest.name if nearest else None,
                sim if nearest else None,
                _as_tuple(emb),
            )
        found = extract_instruction(
            user_text, self.default_instruction, known=[t.text for t in table.types]
        )
        emb = self.embed(found.text)
        nearest, sim = table.nearest(emb)
        if nearest is not None and sim >= self.snap_threshold:
            return ResolvedInstruction(
                "snapped",
                nearest.text,
                nearest.name,
                sim,
                tuple(nearest.embedding),
                found.text,
                found.rule,
                self.snap_threshold,
            )
        return ResolvedInstruction(
            "extracted",
            found.text,
            nearest.name if nearest else None,
            sim if nearest else None,
            _as_tuple(emb),
            found.text,
            found.rule,
            self.snap_threshold,
        )
