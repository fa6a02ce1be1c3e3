"""The embedded LLaVA-architecture model: presets, tokenizer, builder, loader."""

from smolora.adapters.tiny_llava.build import build_tiny_llava, load_llava, tiny_llava_config
from smolora.adapters.tiny_llava.presets import PRESETS, TinyLlavaPreset, get_preset

__all__ = [
    "PRESETS",
    "TinyLlavaPreset",
    "build_tiny_llava",
    "get_preset",
    "load_llava",
    "tiny_llava_config",
]
