"""Base-model alignment: give a tiny LLaVA visual grounding, but no task formats.

The embedded models start from random weights, so the alignment stage trains the whole
model (vision tower, projector, language model: `train_modules="all"`) on mini-CVIT's
generic descriptions ("This is a beach scene. There is a small red circle at the top
left. ..."), answered after generic prompts ("Describe the image."). The result states
everything in a picture but answers no task's format, which is why the zero-shot row of
the benchmark is low. For a real LLaVA checkpoint the analogue is LLaVA's stage 1
(`train_modules="projector"`: projector only, on image-caption pairs).

The output is a standard HF LLaVA folder (weights, tokenizer, processor) plus
`alignment.json` (config, losses, provenance): the frozen base every method starts from.
It does not attach adapters (see `trainer.py`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm
from transformers import get_scheduler

from smolora.adapters.precision import DTYPE_CHOICES, DTypeChoice, resolve_dtype
from smolora.adapters.tiny_llava import build_tiny_llava, get_preset, load_llava
from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.mini_cvit import load_pretrain

logger = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """Alignment-stage settings.

    Attributes:
        preset: embedded model preset to build from random init ("tiny", "small", "wide");
            ignored when `init_dir` is given.
        init_dir: start from an existing LLaVA folder instead of a fresh preset.
        data_root: a built mini-CVIT folder (its `pretrain/train.json` is used).
        out_dir: where the aligned base model folder is written.
        train_modules: "all" (from scratch) or "projector" (LLaVA stage 1).
        steps, batch_size, lr, weight_decay, warmup_ratio: optimisation (AdamW, cosine).
        limit: use only the first `limit` descriptions.
        seed: init and data-order seed.
        num_threads: torch CPU threads (None: leave as is).
        device: torch device.
        dtype: "auto", "float32" or "bfloat16": bfloat16 runs forward/backward under autocast
            (weights and optimizer state stay float32); "auto" picks it only where the
            device computes bfloat16 natively (`adapters/precision.py`).
    """

    data_root: Path
    out_dir: Path
    preset: str = "small"
    init_dir: Path | None = None
    train_modules: Literal["all", "projector"] = "all"
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    limit: int | None = None
    seed: int = 0
    num_threads: int | None = None
    device: str = "cpu"
    dtype: DTypeChoice = "auto"

    def __post_init__(self) -> None:
        self.data_root, self.out_dir = Path(self.data_root), Path(self.out_dir)
        self.init_dir = Path(self.init_dir) if self.init_dir is not None else None
        if self.init_dir is None:
            get_preset(self.preset)  # raises with the known names
        if self.train_modules not in ("all", "projector"):
            raise ValueError(
                f"train_modules must be 'all' or 'projector', got {self.train_modules!r}"
            )
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps, batch_size and lr must be positive")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _trainable(model: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    for name, p in model.named_parameters():
        p.requires_grad_(which == "all" or "multi_modal_projector" in name)
    return [p for p in model.parameters() if p.requires_grad]


def pretrain_base(cfg: PretrainConfig, progress: bool = True) -> Path:
    """Run the alignment stage and save the frozen base.

    Returns:
        The base model folder (`cfg.out_dir`).
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.set_flush_denormal(True)  # denormal floats slow CPU training several-fold
    start = time.perf_counter()
    if cfg.init_dir is not None:
        model, processor = load_llava(cfg.init_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model, processor = load_llava(
                build_tiny_llava(get_preset(cfg.preset), tmp, seed=cfg.seed)
            )
    device = torch.device(cfg.device)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    model.to(device)
    encoder = ExampleEncoder(processor)
    data = load_pretrain(cfg.data_root, cfg.limit)
    params = _trainable(model, cfg.train_modules)
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler(
        "cosine",
        optim,
        num_warmup_steps=int(cfg.warmup_ratio * cfg.steps),
        num_training_steps=cfg.steps,
    )
    rng = random.Random(f"{cfg.seed}|pretrain")
    torch.manual_seed(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="align base", disable=not progress)
    for _ in bar:
        if len(order) < cfg.batch_size:
            fresh = list(range(len(data)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch = encoder.collate_train([data[i] for i in order[: cfg.batch_size]])
        del order[: cfg.batch_size]
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
            loss = model(**tensors).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out_dir)
    processor.save_pretrained(cfg.out_dir)
    tail = losses[-max(1, len(losses) // 20) :]
    info = {
        "config": cfg.to_dict(),
        "final_loss": sum(tail) / len(tail),
        "loss_curve": [
            round(sum(losses[i : i + 50]) / len(losses[i : i + 50]), 4)
            for i in range(0, len(losses), 50)
        ],
        "seconds": time.perf_counter() - start,
    }
    (cfg.out_dir / "alignment.json").write_text(json.dumps(info, indent=1))
    logger.info(
        "aligned base saved to %s (final loss %.3f, %.0f s)",
        cfg.out_dir,
        info["final_loss"],
        info["seconds"],
    )
    return cfg.out_dir
