"""Shared builders for adapter tests: a SMoLoRA-adapted tiny LLaVA with visible experts."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from smolora.adapters.smolora import SMoLoRAConfig, SMoLoRAModel
from smolora.adapters.tiny_llava import load_llava


def adapted_tiny(
    model_dir: Path, vu_routing: str = "pinned", seed: int = 0
) -> tuple[SMoLoRAModel, object]:
    """Tiny LLaVA + SMoLoRA (E=4, r=8) with non-zero B so every expert changes outputs."""
    model, processor = load_llava(model_dir)
    smodel = SMoLoRAModel(
        model,
        SMoLoRAConfig(
            num_experts=4, rank=8, alpha=16, dropout=0.0, vu_routing=vu_routing, gate_init_std=1.0
        ),
        seed=seed,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in smodel.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.5)
    return smodel, processor


def shape_image(
    colour: tuple[int, int, int], size: int = 32, box: tuple[int, int, int, int] = (4, 4, 20, 20)
) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(img).ellipse(box, fill=colour)
    return img


def chat_prompt(processor: object, text: str) -> str:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return processor.apply_chat_template(msgs, add_generation_prompt=True)  # type: ignore[attr-defined]
