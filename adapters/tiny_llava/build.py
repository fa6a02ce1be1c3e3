"""Build, save and load the embedded LLaVA-architecture model.

`build_tiny_llava` creates a standard HF LLaVA folder (config, safetensors weights, trained
tokenizer, CLIP image processor, chat template) that `transformers` and our vLLM model
both load. Weights are randomly initialised from a seed; `training/` pre-trains them.
`load_llava` loads any LLaVA folder, ours or a real checkpoint such as llava-1.5.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.clip import CLIPImageProcessorPil

from smolora.adapters.tiny_llava.presets import TinyLlavaPreset
from smolora.adapters.tiny_llava.tokenizer import IMAGE_TOKEN, train_tokenizer

# CLIP's normalisation constants (as in openai/clip-vit-*), kept for realism.
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def tiny_llava_config(preset: TinyLlavaPreset) -> LlavaConfig:
    """The HF `LlavaConfig` for a preset (image token id 4, pad 0, bos 1, eos 2)."""
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden,
        intermediate_size=preset.vision_intermediate,
        num_hidden_layers=preset.vision_layers,
        num_attention_heads=preset.vision_heads,
        image_size=preset.image_size,
        patch_size=preset.patch_size,
        projection_dim=preset.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=preset.vocab_size,
        hidden_size=preset.text_hidden,
        intermediate_size=preset.text_intermediate,
        num_hidden_layers=preset.text_layers,
        num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads,
        max_position_embeddings=preset.max_positions,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=4,
        image_seq_length=preset.image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    cfg.pad_token_id = 0
    cfg.smolora_preset = preset.to_dict()
    return cfg


def tiny_llava_processor(preset: TinyLlavaPreset) -> LlavaProcessor:
    """Tokenizer (trained here) + CLIP image processor + chat template for a preset."""
    tokenizer = train_tokenizer(preset.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": preset.image_size},
        crop_size={"height": preset.image_size, "width": preset.image_size},
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=preset.patch_size,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_tiny_llava(preset: TinyLlavaPreset, out_dir: str | Path, seed: int = 0) -> Path:
    """Create and save a randomly initialised tiny LLaVA model folder.

    Args:
        preset: architecture sizes.
        out_dir: folder to write (created; existing files are overwritten).
        seed: weight-init seed; the same seed gives identical weights.

    Returns:
        The folder path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(preset))
    model.eval()
    model.save_pretrained(out)
    tiny_llava_processor(preset).save_pretrained(out)
    return out


def load_llava(
    model_dir: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a LLaVA folder (ours or a real checkpoint) and its processor, offline, in eval mode."""
    model = LlavaForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=dtype, local_files_only=True
    )
    model.eval()
    processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    return model, processor
