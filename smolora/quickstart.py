"""The main job on the embedded default model.

Today: build the embedded LLaVA model (if absent), attach a SMoLoRA adapter, and run a
routed greedy generation for one generated image under two different instructions,
printing the answer and the per-layer routes. Training the default model and serving it
over HTTP plug in here as `training/` and `server/` land.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger("smolora.quickstart")

INSTRUCTIONS = (
    "Answer the question using a single word or phrase.",
    "Provide a one-sentence caption for the provided image.",
)


def _demo_image(size: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (235, 235, 245))
    d = ImageDraw.Draw(img)
    d.ellipse((size * 0.1, size * 0.2, size * 0.5, size * 0.6), fill=(220, 40, 40))
    d.rectangle((size * 0.55, size * 0.5, size * 0.9, size * 0.85), fill=(40, 60, 220))
    return img


def ensure_model(workdir: Path, preset_name: str, seed: int) -> Path:
    """Build the embedded model folder once; later runs reuse it."""
    from smolora.adapters.tiny_llava import build_tiny_llava, get_preset

    model_dir = workdir / "models" / f"{preset_name}-seed{seed}"
    if not (model_dir / "config.json").is_file():
        log.info("building the %s model into %s", preset_name, model_dir)
        build_tiny_llava(get_preset(preset_name), model_dir, seed=seed)
    return model_dir


def run(args: argparse.Namespace) -> int:
    import torch

    from smolora.adapters.instructions import InstructionEncoder
    from smolora.adapters.reference_generate import ReferenceRequest, generate_one_by_one
    from smolora.adapters.smolora import SMoLoRAConfig, SMoLoRAModel
    from smolora.adapters.tiny_llava import get_preset, load_llava

    t0 = time.perf_counter()
    model_dir = ensure_model(Path(args.workdir), args.preset, args.seed)
    model, processor = load_llava(model_dir)
    smodel = SMoLoRAModel(model, SMoLoRAConfig(num_experts=8, rank=64, alpha=128), seed=args.seed)
    encoder = InstructionEncoder()
    image = _demo_image(get_preset(args.preset).image_size)
    question = "What colour is the circle?"
    reqs = []
    for instruction in INSTRUCTIONS:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{question}\n{instruction}"}]}]
        prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
        reqs.append(ReferenceRequest(prompt, image, encoder.encode([instruction])[0]))
    with torch.no_grad():
        results = generate_one_by_one(smodel, processor, reqs, max_new_tokens=args.max_tokens)
    print(f"model: {model_dir} ({args.preset}, untrained base + fresh SMoLoRA adapter)")
    for instruction, res in zip(INSTRUCTIONS, results):
        text = processor.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        print(f"\ninstruction: {instruction}\nanswer: {text!r}")
        print("  layer                       VU  IF   w_vu  w_if")
        for t in res.trace:
            print(f"  {t['layer']:<26} {t['vu_expert']:>3} {t['if_expert']:>3}  {t['w_vu']:.2f}  {t['w_if']:.2f}")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="build the embedded model and run a routed generation")
    p.add_argument("--workdir", default=".cache/smolora", help="where models and checkpoints live")
    p.add_argument("--preset", default="small", help="embedded model size: tiny, small or wide")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=12)
    p.set_defaults(func=run)
