"""Chat messages -> the model's prompt text, and the prompt's token count.

`PromptRenderer` applies the model folder's own chat template to OpenAI-style messages
whose image parts have already been validated, and counts the prompt's tokens the way the
engine will see them: the tokenizer's count with each image placeholder expanded to the
model's image tokens. The HTTP layer needs the count before it submits anything, to reject
prompts over the context length with a 400 and to size `max_tokens`.

Real templates expect content in one of two shapes, and the renderer maps OpenAI content
onto the one the template understands (as vLLM's chat utilities do):
- `"openai"`: content is a list of parts; an image is `{"type": "image"}` (llava-hf's
  llava-1.5 template writes `<image>` only for those, and renders nothing for a string
  content), text is `{"type": "text", "text": ...}`. OpenAI `image_url` parts become image
  parts; string content becomes one text part.
- `"string"`: content is a string (Vicuna-style templates that print `message['content']`);
  the image placeholders are written at its start, one line each, then the text parts.
The shape is found once, at construction, by rendering probe messages: a one-image message
must render with exactly one image placeholder and its text, a text-only message with its
text and none. A template that fits neither shape is refused with a `ChatTemplateError`
naming the model folder, so a server never starts with a template that drops images.

It does not tokenize for the engine (the engine re-tokenizes the prompt text) and does not
decode images.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("smolora.server.prompt")

DEFAULT_IMAGE_TOKEN = "<image>"
ContentFormat = Literal["openai", "string"]
CONTENT_FORMATS: tuple[ContentFormat, ...] = ("openai", "string")

_PROBE_TEXT = "Probe question: what is shown?"
_IMAGE_PART_TYPES = ("image_url", "image")


class ChatTemplateError(ValueError):
    """The model folder's chat template cannot render an image request as the model needs."""


class PromptRenderer:
    """Renders chat messages with the model's chat template and counts prompt tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (renders and counts).
        image_tokens: placeholder tokens one image expands to inside the model.
        image_token: the placeholder string the template writes for an image.
        chat_template: the template to render with; None takes the tokenizer's own.
        content_format: "openai" or "string" (see the module docstring); None detects it.
        source: where the template came from, for error messages (e.g. the model folder).

    Raises:
        ChatTemplateError: no template, or one that renders a one-image message with other
            than exactly one image placeholder in either content shape.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_tokens: int,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        chat_template: str | None = None,
        content_format: ContentFormat | None = None,
        source: str = "the tokenizer",
    ):
        if image_tokens < 1:
            raise ValueError("image_tokens must be >= 1")
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ChatTemplateError(
                f"{source} has no chat template (chat_template.jinja, chat_template.json or "
                "tokenizer_config.json's chat_template); the server needs one to render requests"
            )
        if content_format is not None and content_format not in CONTENT_FORMATS:
            raise ValueError(
                f"content_format must be one of {CONTENT_FORMATS}, got {content_format!r}"
            )
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_token = image_token
        self.chat_template: str = template
        self.source = source
        self.content_format: ContentFormat = content_format or self._detect_format()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> PromptRenderer:
        """Load the tokenizer, chat template and image-token count of a LLaVA folder (offline).

        The template is the processor's (`chat_template.json` / `chat_template.jinja`, as
        llava-hf folders ship it) or else the tokenizer's.
        """
        from transformers import AutoTokenizer

        root = Path(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        config = json.loads((root / "config.json").read_text())
        template = _processor_chat_template(root) or getattr(tokenizer, "chat_template", None)
        return cls(
            tokenizer,
            image_tokens_from_config(config),
            _image_token(root, tokenizer),
            chat_template=template,
            source=f"the model folder {root}",
        )

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt text, ending with the assistant turn's opening.

        Args:
            messages: `{"role", "content"}` dicts; content is a string or a list of
                `{"type": "text", "text"}` / `{"type": "image_url" | "image", ...}` parts.
        """
        return self._apply([self._shape(m, self.content_format) for m in messages])

    def count_tokens(self, prompt: str, num_images: int) -> int:
        """Tokens the engine will process for `prompt` (each image expanded)."""
        n = len(self.tokenizer(prompt)["input_ids"])
        return n + num_images * (self.image_tokens - 1)

    # -- content shapes -------------------------------------------------------------------
    def _shape(self, message: dict[str, Any], fmt: ContentFormat) -> dict[str, Any]:
        content = message.get("content")
        if content is None:
            parts: list[dict[str, Any]] = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        else:
            parts = list(content)
        images = sum(1 for p in parts if p.get("type") in _IMAGE_PART_TYPES)
        texts = [p["text"] for p in parts if p.get("type") == "text"]
        shaped = {k: v for k, v in message.items() if k != "content"}
        if fmt == "string":
            shaped["content"] = "".join(self.image_token + "\n" for _ in range(images)) + "\n".join(
                texts
            )
        else:
            shaped["content"] = [
                {"type": "image"}
                if p.get("type") in _IMAGE_PART_TYPES
                else {"type": "text", "text": p["text"]}
                for p in parts
            ]
        return shaped

    def _apply(self, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )

    def _detect_format(self) -> ContentFormat:
        image_msg = {
            "role": "user",
            "content": [{"type": "image_url"}, {"type": "text", "text": _PROBE_TEXT}],
        }
        text_msg = {"role": "user", "content": [{"type": "text", "text": _PROBE_TEXT}]}
        seen: list[str] = []
        for fmt in CONTENT_FORMATS:
            try:
                with_image = self._apply([self._shape(image_msg, fmt)])
                text_only = self._apply([self._shape(text_msg, fmt)])
            except Exception as e:  # a template that fails on this shape: try the other
                seen.append(f"{fmt}: the template raised {type(e).__name__}: {e}")
                continue
            n = with_image.count(self.image_token)
            if (
                n == 1
                and _PROBE_TEXT in with_image
                and _PROBE_TEXT in text_only
                and self.image_token not in text_only
            ):
                log.info("chat template of %s takes %s content", self.source, fmt)
                return fmt
            seen.append(
                f"{fmt}: a one-image message rendered {n} {self.image_token!r} placeholder(s)"
                + (
                    ""
                    if _PROBE_TEXT in with_image and _PROBE_TEXT in text_only
                    else " and lost its text"
                )
                + f" ({with_image!r})"
            )
        raise ChatTemplateError(
            f"the chat template of {self.source} cannot render an image request: "
            "a one-user-message prompt with one image must contain exactly one "
            f"{self.image_token!r} placeholder and the message text. Tried "
            + "; ".join(seen)
            + ". Give the folder a chat template that writes the image placeholder for "
            "{'type': 'image'} content parts (as llava-hf's templates do) or for a string content."
        )


def _processor_chat_template(root: Path) -> str | None:
    """The processor-level chat template of a folder, if it has one."""
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = root / "chat_template.json"
    if legacy.is_file():
        template = json.loads(legacy.read_text()).get("chat_template")
        return template if isinstance(template, str) and template else None
    return None


def _image_token(root: Path, tokenizer: Any) -> str:
    """The image placeholder string: the processor's, else the tokenizer's, else `<image>`."""
    config = root / "processor_config.json"
    if config.is_file():
        tok = json.loads(config.read_text()).get("image_token")
        if isinstance(tok, str) and tok:
            return tok
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
        raise ValueError(
            "cannot tell image tokens per image: config has neither image_seq_length nor "
            "vision_config.image_size/patch_size"
        )
    n = (size // patch) ** 2
    return n + 1 if config.get("vision_feature_select_strategy") == "full" else n
