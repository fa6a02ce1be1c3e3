"""Turn `Example`s into LLaVA model inputs: chat prompts, token ids, labels, pixel values.

The prompt is the processor's own chat template with a generation prompt (for LLaVA-1.5
and our tiny models: `USER: <image>\\n{prompt} ASSISTANT:`); the target is
` {answer}</s>`, tokenized separately and appended, so training sees exactly the token
boundary that generation continues from. Labels are -100 everywhere but the answer and
EOS. Training batches are right-padded, generation batches left-padded (positions then
come from the attention mask). The `<image>` placeholder is expanded to the number of
image tokens the processor uses (measured once on a dummy image), so this also works for
real LLaVA checkpoints. A text-only example (no image: the base alignment's text-skill
stage) gets the same template with no image placeholder, and a batch of them has no
`pixel_values`; a batch mixes no text-only with image examples.

It does not embed instructions (methods do) and does not batch by length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from smolora.training.data.cvit_json import Example

IGNORE_INDEX = -100


@dataclass
class EncodedExample:
    """Token ids of one example.

    Attributes:
        prompt_ids: prompt tokens (BOS, expanded image tokens, text, "ASSISTANT:").
        answer_ids: target tokens (" answer" + EOS).
    """

    prompt_ids: list[int]
    answer_ids: list[int]


class ExampleEncoder:
    """Tokenizes and batches examples for one LLaVA processor.

    Args:
        processor: a `LlavaProcessor` (tokenizer + image processor + chat template).
        max_prompt_tokens: prompts longer than this are cut from the left of their text
            (image tokens are kept); None keeps everything.
        cache: keep token ids and pixel values of examples seen (the datasets are small).
    """

    def __init__(self, processor: Any, max_prompt_tokens: int | None = None, cache: bool = True):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.cache = cache
        self.image_token: str = processor.image_token
        self.image_token_id: int = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.pad_id: int = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        )
        self.eos_token: str = self.tokenizer.eos_token
        size = self._image_side()
        probe = processor(
            text=[self.image_token], images=[Image.new("RGB", (size, size))], return_tensors="pt"
        )
        self.num_image_tokens = int((probe["input_ids"] == self.image_token_id).sum())
        self._ids: dict[tuple[str, str, str], EncodedExample] = {}
        self._pixels: dict[str, Tensor] = {}

    def _image_side(self) -> int:
        crop = getattr(self.processor.image_processor, "crop_size", None) or {}
        return int(crop.get("height", 336)) if isinstance(crop, dict) else 336

    # -- single examples ------------------------------------------------------------------
    def prompt_text(self, ex: Example) -> str:
        """The chat-formatted prompt with one image placeholder (none for a text-only
        example)."""
        image = [] if ex.image is None else [{"type": "image"}]
        messages = [{"role": "user", "content": [*image, {"type": "text", "text": ex.prompt}]}]
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )

    def encode(self, ex: Example) -> EncodedExample:
        """Prompt and answer token ids of an example (cached by id, prompt and answer)."""
        key = (ex.id, ex.prompt, ex.answer)
        if self.cache and key in self._ids:
            return self._ids[key]
        text = self.prompt_text(ex)
        if ex.image is not None:
            text = text.replace(self.image_token, self.image_token * self.num_image_tokens, 1)
        prompt_ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if self.max_prompt_tokens is not None and len(prompt_ids) > self.max_prompt_tokens:
            keep_head = (
                prompt_ids.index(self.image_token_id) + self.num_image_tokens
                if ex.image is not None
                else 1
            )
            cut = len(prompt_ids) - self.max_prompt_tokens
            prompt_ids = prompt_ids[:keep_head] + prompt_ids[keep_head + cut :]
        answer_ids = self.tokenizer(" " + ex.answer + self.eos_token, add_special_tokens=False)[
            "input_ids"
        ]
        enc = EncodedExample(list(prompt_ids), list(answer_ids))
        if self.cache:
            self._ids[key] = enc
        return enc

    def pixel_values(self, ex: Example) -> Tensor:
        """Processed image, `[3, H, W]`.

        Raises:
            ValueError: for a text-only example.
        """
        if ex.image is None:
            raise ValueError(f"example {ex.id!r} has no image")
        key = str(ex.image)
        if self.cache and key in self._pixels:
            return self._pixels[key]
        with Image.open(ex.image) as im:
            pv = self.processor.image_processor(images=[im.convert("RGB")], return_tensors="pt")[
                "pixel_values"
            ][0]
        if self.cache:
            self._pixels[key] = pv
        return pv

    # -- batches --------------------------------------------------------------------------
    def _pixel_batch(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        """`{"pixel_values": [B, 3, H, W]}`, or nothing for a text-only batch.

        Raises:
            ValueError: when the batch mixes text-only and image examples.
        """
        text_only = [ex.image is None for ex in examples]
        if all(text_only):
            return {}
        if any(text_only):
            raise ValueError("a batch mixes text-only and image examples")
        return {"pixel_values": torch.stack([self.pixel_values(ex) for ex in examples])}

    def collate_train(self, examples: Sequence[Example]) -> dict[str, Any]:
        """A right-padded training batch.

        Returns:
            dict with `input_ids`, `attention_mask`, `labels` (`[B, T]`), `pixel_values`
            (`[B, 3, H, W]`; absent for a text-only batch), `instructions` (list of B
            strings) and `tasks` (B names).
        """
        encs = [self.encode(ex) for ex in examples]
        t = max(len(e.prompt_ids) + len(e.answer_ids) for e in encs)
        b = len(encs)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        for i, e in enumerate(encs):
            seq = e.prompt_ids + e.answer_ids
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, len(e.prompt_ids) : len(seq)] = torch.tensor(e.answer_ids)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            **self._pixel_batch(examples),
            "instructions": [ex.instruction for ex in examples],
            "tasks": [ex.task for ex in examples],
        }

    def collate_generate(self, examples: Sequence[Example]) -> dict[str, Any]:
        """A left-padded prompt batch for generation.

        Returns:
            dict with `input_ids`, `attention_mask` (`[B, T]`), `pixel_values` (absent for a
            text-only batch), `instructions` and `tasks`.
        """
        encs = [self.encode(ex).prompt_ids for ex in examples]
        t = max(len(e) for e in encs)
        b = len(encs)
        ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, t), dtype=torch.long)
        for i, e in enumerate(encs):
            ids[i, t - len(e) :] = torch.tensor(e)
            mask[i, t - len(e) :] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            **self._pixel_batch(examples),
            "instructions": [ex.instruction for ex in examples],
            "tasks": [ex.task for ex in examples],
        }

    def decode(self, token_ids: Sequence[int]) -> str:
        """Generated ids -> text (EOS and padding dropped)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()
