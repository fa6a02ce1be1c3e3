"""Chat messages -> the model's prompt text, and the prompt's token count.

`PromptRenderer` applies the base model's chat template (LLaVA-1.5 style for the
embedded model: `USER: <image>\\n{text} ASSISTANT:`) to OpenAI-style messages whose image
parts have already been validated, and counts the prompt's tokens the way the engine
will see them: the tokenizer's count with each `<image>` placeholder expanded to the
model's image tokens. The HTTP layer needs the count before it submits anything, to
reject prompts over the context length with a 400 and to size `max_tokens`.

It does not tokenize for the engine (the engine re-tokenizes the prompt text) and does not
decode images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("smolora.server.prompt")

DEFAULT_IMAGE_TOKEN = "<image>"


class PromptRenderer:
    """Renders chat messages with the model's chat template and counts prompt tokens.

    Args:
        tokenizer: a Hugging Face tokenizer carrying a chat template.
        image_tokens: placeholder tokens one image expands to inside the model.
        image_token: the placeholder string the template writes for an image.
    """

    def __init__(self, tokenizer: Any, image_tokens: int, image_token: str = DEFAULT_IMAGE_TOKEN):
        if image_tokens < 1:
            raise ValueError("image_tokens must be >= 1")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; the model folder needs one")
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_token = image_token

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> "PromptRenderer":
        """Load the tokenizer and the image-token count from a LLaVA model folder (offline)."""
        from transformers import AutoTokenizer

        root = Path(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        config = json.loads((root / "config.json").read_text())
        return cls(tokenizer, image_tokens_from_config(config), _image_token(tokenizer))

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt text, ending with the assistant turn's opening.

        Args:
            messages: `{"role", "content"}` dicts; content is a string or a list of
                `{"type": "text", "text"}` / `{"type": "image_url", ...}` parts.
        """
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def count_tokens(self, prompt: str, num_images: int) -> int:
        """Tokens the engine will process for `prompt` (each image expanded)."""
        n = len(self.tokenizer(prompt)["input_ids"])
        return n + num_images * (self.image_tokens - 1)


def _image_token(tokenizer: Any) -> str:
    tok = getattr(tokenizer, "image_token", None)
    return tok if isinstance(tok, str) and tok else DEFAULT_IMAGE_TOKEN


def image_tokens_from_config(config: dict[str, Any]) -> int:
    """Image placeholder tokens per image of a LLaVA config.

    `image_seq_length` when present; else (image_size / patch_size)^2 (CLS dropped, the
    LLaVA "default" feature strategy), plus one with the "full" strategy.
    """
    if isinstance(config.get("image_seq_length"), int):
        return int(config["image_seq_length"])
    vision = config.get("vision_config") or {}
    size, patch = vision.get("image_size"), vision.get("patch_size")
    if not (isinstance(size, int) and isinstance(patch, int) and patch > 0):
        raise ValueError("cannot tell image tokens per image: config has neither image_seq_length nor "
                         "vision_config.image_size/patch_size")
    n = (size // patch) ** 2
    return n + 1 if config.get("vision_feature_select_strategy") == "full" else n
