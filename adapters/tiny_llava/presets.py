"""Sizes of the embedded LLaVA-architecture models the project builds itself.

`tiny` is for tests (sub-second forward on 2 CPU cores); `small` is the default demo and
quickstart model; `cvit` is `small` with a wider, deeper vision tower (192 x 4 instead of
128 x 3) for the mini-CVIT benchmark's base, whose tasks need the tower to tell shapes,
positions and sign words apart (the text model, which dominates a training step's cost, is
`small`'s); `wide` has a representative LLM width (d_model 1024) for
throughput benchmarks of the routed adapter. `shape-7b` and `shape-13b` have the widths
of llava-1.5-7B / 13B (hidden 4096 / 5120, MLP 11008 / 13824, head dim 128, a CLIP-L/14-336
shaped tower: 1024 wide, 576 patches) with two decoder and two vision layers, so a 2-core
machine can measure per-layer costs at real shapes (random weights; the vocabulary stays the
tokenizer's 1,024, so the LM head does not dwarf two layers as 32,000 entries would). Head
dims are >= 32 because vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class TinyLlavaPreset:
    """Architecture sizes of a tiny LLaVA (CLIP tower + 2-layer MLP projector + Llama).

    Attributes:
        name: preset name, recorded in the model's config.
        image_size: square input image side in pixels.
        patch_size: ViT patch side; image tokens = (image_size / patch_size)^2.
        vision_hidden, vision_layers, vision_heads, vision_intermediate: CLIP tower sizes.
        text_hidden, text_layers, text_heads, text_kv_heads, text_intermediate: Llama sizes.
        vocab_size: BPE vocabulary size of the tokenizer trained for the model.
        max_positions: context length.
    """

    name: str
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int
    max_positions: int

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.text_hidden % self.text_heads or self.text_hidden // self.text_heads < 32:
            raise ValueError("text head_dim must be an integer >= 32 (vLLM CPU attention)")
        if self.text_heads % self.text_kv_heads:
            raise ValueError("text_heads must be a multiple of text_kv_heads")
        if self.vision_layers < 2:
            raise ValueError("vision_layers must be >= 2 (LLaVA reads the second-to-last layer)")

    @property
    def image_tokens(self) -> int:
        """Image placeholder tokens per image (CLS dropped, LLaVA 'default' strategy)."""
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, TinyLlavaPreset] = {
    "tiny": TinyLlavaPreset(
        name="tiny",
        image_size=32,
        patch_size=8,
        vision_hidden=32,
        vision_layers=2,
        vision_heads=2,
        vision_intermediate=64,
        text_hidden=64,
        text_layers=2,
        text_heads=2,
        text_kv_heads=2,
        text_intermediate=128,
        vocab_size=512,
        max_positions=256,
    ),
    "small": TinyLlavaPreset(
        name="small",
        image_size=64,
        patch_size=8,
        vision_hidden=128,
        vision_layers=3,
        vision_heads=4,
        vision_intermediate=256,
        text_hidden=256,
        text_layers=4,
        text_heads=8,
        text_kv_heads=4,
        text_intermediate=688,
        vocab_size=1024,
        max_positions=512,
    ),
    "wide": TinyLlavaPreset(
        name="wide",
        image_size=64,
        patch_size=8,
        vision_hidden=128,
        vision_layers=3,
        vision_heads=4,
        vision_intermediate=256,
        text_hidden=1024,
        text_layers=4,
        text_heads=16,
        text_kv_heads=8,
        text_intermediate=2752,
        vocab_size=1024,
        max_positions=512,
    ),
    "shape-7b": TinyLlavaPreset(
        name="shape-7b",
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=2,
        vision_heads=16,
        vision_intermediate=4096,
        text_hidden=4096,
        text_layers=2,
        text_heads=32,
        text_kv_heads=32,
        text_intermediate=11008,
        vocab_size=1024,
        max_positions=1024,
    ),
    "shape-13b": TinyLlavaPreset(
        name="shape-13b",
        image_size=336,
        patch_size=14,
        vision_hidden=1024,
        vision_layers=2,
        vision_heads=16,
        vision_intermediate=4096,
        text_hidden=5120,
        text_layers=2,
        text_heads=40,
        text_kv_heads=40,
        text_intermediate=13824,
        vocab_size=1024,
        max_positions=1024,
    ),
}


PRESETS["cvit"] = replace(
    PRESETS["small"],
    name="cvit",
    vision_hidden=192,
    vision_layers=4,
    vision_heads=6,
    vision_intermediate=768,
)


def get_preset(name: str) -> TinyLlavaPreset:
    """Look up a preset by name.

    Raises:
        KeyError: with the known names, if `name` is not one.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
