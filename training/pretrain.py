"""Base-model alignment: give a tiny LLaVA visual grounding, but no task formats.

The embedded models start from random weights, so the alignment stage trains the whole
model (vision tower, projector, language model: `train_modules="all"`) on mini-CVIT's
generic descriptions ("This is a beach scene. There is a small red circle at the top
left. ..."), answered after generic prompts ("Describe the image."). The result states
everything in a picture but answers no task's format, which is why the zero-shot row of
the benchmark is low. For a real LLaVA checkpoint the analogue is LLaVA's stage 1
(`train_modules="projector"`: projector only, on image-caption pairs). With
`reading_share`, part of each batch is text-skill exercises (`data/reading.py`: repeat
words, point at an option by its letter and back, answer a multiple-choice question about a
description written into the prompt); the generic skills a pretrained LLM brings to LLaVA,
which a language model trained from scratch on descriptions lacks; `language_steps`
teaches them first, text-only (`language_pretrain.py`), and the share keeps them.

The output is a standard HF LLaVA folder (weights, tokenizer, processor) plus
`alignment.json` (config, losses, held-out losses, provenance): the frozen base every method
starts from. It does not attach adapters (see `trainer.py`).

A long alignment can outlive a machine session: with `checkpoint_every` the whole training
state (weights, optimizer, schedule, data order, random states, losses) is written to
`out_dir/.resume/state.pt` every that many steps, and a later call with the same config
continues from it, giving the same weights as one uninterrupted run. `heldout` keeps the last
descriptions out of training and measures their loss at every checkpoint, so "stop when the
held-out loss stops falling" can be read from `alignment.json`.
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

from smolora.adapters.precision import DTYPE_CHOICES, DTypeChoice, resolve_dtype
from smolora.adapters.tiny_llava import build_tiny_llava, get_preset, load_llava
from smolora.training.base_probe import probe_facts
from smolora.training.data.batches import next_indices
from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.cvit_json import Example
from smolora.training.data.mini_cvit import load_pretrain
from smolora.training.data.reading import reading_exercise
from smolora.training.language_pretrain import pretrain_language, skill_accuracy
from smolora.training.stage_loop import cosine_adamw, final_loss, loss_curve, optimizer_step
from smolora.training.vision_pretrain import pretrain_tower

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
        train_modules: "all" (from scratch), "language" (projector and language model; the
            vision tower stays as it is, as LLaVA keeps CLIP frozen) or "projector" (LLaVA
            stage 1).
        steps, batch_size, lr, weight_decay, warmup_ratio: optimisation (AdamW, cosine).
        limit: use only the first `limit` descriptions.
        seed: init and data-order seed.
        num_threads: torch CPU threads (None: leave as is).
        device: torch device.
        checkpoint_every: write the resumable training state every this many steps (0: never).
        heldout: the last `heldout` descriptions are not trained on; their mean loss is
            measured at each checkpoint and at the end (0: no held-out set).
        tower_steps, tower_batch_size, tower_lr: vision-tower pretraining on the
            descriptions' facts before the alignment (`vision_pretrain.py`; 0: none).
        language_steps, language_batch_size, language_lr: language-model pretraining on
            text-only skill exercises, after the tower's and before the alignment
            (`language_pretrain.py`; 0: none).
        reading_share: the share of each batch turned into text-skill exercises
            (`data/reading.py`: repeat, option lookups, questions about the description),
            the generic skills a pretrained LLM brings; 0: descriptions only.
        dtype: "auto", "float32" or "bfloat16": bfloat16 runs forward/backward under autocast
            (weights and optimizer state stay float32); "auto" picks it only where the
            device computes bfloat16 natively (`adapters/precision.py`).
    """

    data_root: Path
    out_dir: Path
    preset: str = "small"
    init_dir: Path | None = None
    train_modules: Literal["all", "language", "projector"] = "all"
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
    checkpoint_every: int = 0
    heldout: int = 0
    tower_steps: int = 0
    tower_batch_size: int = 64
    tower_lr: float = 1e-3
    language_steps: int = 0
    language_batch_size: int = 32
    language_lr: float = 5e-4
    reading_share: float = 0.0

    def __post_init__(self) -> None:
        self.data_root, self.out_dir = Path(self.data_root), Path(self.out_dir)
        self.init_dir = Path(self.init_dir) if self.init_dir is not None else None
        if self.init_dir is None:
            get_preset(self.preset)  # raises with the known names
        if self.train_modules not in ("all", "language", "projector"):
            raise ValueError(
                "train_modules must be 'all', 'language' or 'projector', "
                f"got {self.train_modules!r}"
            )
        if self.tower_steps < 0 or self.tower_batch_size < 1 or self.tower_lr <= 0:
            raise ValueError("tower_steps must be >= 0, tower_batch_size and tower_lr positive")
        if self.language_steps < 0 or self.language_batch_size < 1 or self.language_lr <= 0:
            raise ValueError(
                "language_steps must be >= 0, language_batch_size and language_lr positive"
            )
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps, batch_size and lr must be positive")
        if not 0.0 <= self.reading_share <= 1.0:
            raise ValueError(f"reading_share must be in [0, 1], got {self.reading_share}")
        if self.checkpoint_every < 0 or self.heldout < 0:
            raise ValueError("checkpoint_every and heldout must be >= 0")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}

    def resume_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the state (threads,
        checkpoint interval and output folder may change between sessions)."""
        d = self.to_dict()
        for k in ("num_threads", "checkpoint_every", "out_dir", "device"):
            d.pop(k)
        return d


class ResumeMismatchError(ValueError):
    """The out_dir holds a resume state written with different alignment settings."""


def _trainable(model: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    for name, p in model.named_parameters():
        p.requires_grad_(
            which == "all"
            or "multi_modal_projector" in name
            or (which == "language" and "vision_tower" not in name)
        )
    return [p for p in model.parameters() if p.requires_grad]


def with_reading(examples: list[Example], share: float, seed: str) -> list[Example]:
    """`examples` with the first `round(share * len)` turned into reading exercises (a
    description with nothing to ask about stays as it is). Seeded by `seed` (the step), so a
    resumed alignment draws the same exercises without saving a random state."""
    n = round(share * len(examples))
    if not n:
        return examples
    rng = random.Random(f"{seed}|reading")
    turned = [reading_exercise(ex, rng) for ex in examples[:n]]
    return [r if r is not None else ex for r, ex in zip(turned, examples)] + examples[n:]


@torch.no_grad()
def _heldout_loss(
    model: torch.nn.Module, encoder: ExampleEncoder, examples: list, device: torch.device
) -> float:
    """Mean per-token loss on held-out descriptions (float32, eval mode, batches of 32)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), 32):
        batch = encoder.collate_train(examples[i : i + 32])
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        n = int((tensors["labels"][:, 1:] != -100).sum())
        total += float(model(**tensors).loss) * n
        tokens += n
    model.train(was_training)
    return total / max(tokens, 1)


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
    if cfg.heldout and cfg.heldout >= len(data):
        raise ValueError(f"heldout={cfg.heldout} leaves no training data (have {len(data)})")
    heldout = data[len(data) - cfg.heldout :] if cfg.heldout else []
    data = data[: len(data) - cfg.heldout]
    state_path = cfg.out_dir / ".resume" / "state.pt"
    state = None
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state["key"] != json.loads(json.dumps(cfg.resume_key())):
            raise ResumeMismatchError(
                f"{state_path} was written by an alignment with other settings; "
                "delete it or align into another folder"
            )
    tower_info = state.get("tower") if state is not None else None
    language_info = state.get("language") if state is not None else None
    if state is None and cfg.tower_steps:
        tower_info = pretrain_tower(
            model,
            encoder,
            data,
            heldout,
            steps=cfg.tower_steps,
            batch_size=cfg.tower_batch_size,
            lr=cfg.tower_lr,
            seed=cfg.seed,
            device=device,
            autocast_bf16=compute_dtype == "bfloat16",
            progress=progress,
        )
        logger.info("vision tower pretrained: %s", tower_info)
    if state is None and cfg.language_steps:
        language_info = pretrain_language(
            model,
            encoder,
            data,
            heldout,
            steps=cfg.language_steps,
            batch_size=cfg.language_batch_size,
            lr=cfg.language_lr,
            seed=cfg.seed,
            device=device,
            autocast_bf16=compute_dtype == "bfloat16",
            progress=progress,
        )
        logger.info("language model pretrained: %s", language_info["heldout_accuracy"])
    params = _trainable(model, cfg.train_modules)
    optim, sched = cosine_adamw(
        params, cfg.lr, cfg.weight_decay, cfg.steps, int(cfg.warmup_ratio * cfg.steps)
    )
    rng = random.Random(f"{cfg.seed}|pretrain")
    torch.manual_seed(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    heldout_curve: list[tuple[int, float]] = []
    done, spent = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        order, losses = state["order"], state["losses"]
        heldout_curve = [tuple(x) for x in state["heldout_curve"]]
        done, spent = state["step"], state["seconds"]
        logger.info("resuming the alignment at step %d of %d", done, cfg.steps)

    def save_state(step: int) -> None:
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "key": cfg.resume_key(),
                "model": model.state_dict(),
                "optim": optim.state_dict(),
                "sched": sched.state_dict(),
                "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "order": order,
                "losses": losses,
                "heldout_curve": heldout_curve,
                "step": step,
                "tower": tower_info,
                "language": language_info,
                "seconds": spent + time.perf_counter() - start,
            },
            tmp,
        )
        tmp.replace(state_path)  # atomic: an interrupted save keeps the previous state

    if state is None and (cfg.tower_steps or cfg.language_steps) and cfg.checkpoint_every:
        save_state(0)  # an interrupted alignment does not pretrain the tower or LM again
    model.train()
    bar = tqdm(range(done, cfg.steps), desc="align base", disable=not progress)
    for step in bar:
        indices = next_indices(order, len(data), cfg.batch_size, rng)
        batch = encoder.collate_train(
            with_reading([data[i] for i in indices], cfg.reading_share, f"{cfg.seed}|{step}")
        )
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16"):
            loss = model(**tensors).loss
        losses.append(optimizer_step(loss, params, optim, sched))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        finished = step + 1
        if cfg.checkpoint_every and finished % cfg.checkpoint_every == 0 and finished < cfg.steps:
            if heldout:
                heldout_curve.append((finished, _heldout_loss(model, encoder, heldout, device)))
                logger.info("step %d: held-out loss %.4f", *heldout_curve[-1])
            save_state(finished)
    if heldout and (not heldout_curve or heldout_curve[-1][0] != cfg.steps):
        heldout_curve.append((cfg.steps, _heldout_loss(model, encoder, heldout, device)))
    facts = probe_facts(model, encoder, heldout, device) if heldout else None
    reading = (
        skill_accuracy(model, encoder, heldout, f"{cfg.seed}|heldout", text_only=False)
        if heldout and cfg.reading_share
        else None
    )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(cfg.out_dir)
    processor.save_pretrained(cfg.out_dir)
    info = {
        "config": cfg.to_dict(),
        "final_loss": final_loss(losses),
        "loss_curve": loss_curve(losses),
        "heldout_curve": [[step, round(loss, 4)] for step, loss in heldout_curve],
        "heldout_loss": heldout_curve[-1][1] if heldout_curve else None,
        "heldout_facts": facts,
        "heldout_reading_accuracy": reading,
        "tower": tower_info,
        "language": language_info,
        "seconds": spent + time.perf_counter() - start,
    }
    (cfg.out_dir / "alignment.json").write_text(json.dumps(info, indent=1))
    if state_path.is_file():
        state_path.unlink()
        state_path.parent.rmdir()
    logger.info(
        "aligned base saved to %s (final loss %.3f, %.0f s)",
        cfg.out_dir,
        info["final_loss"],
        info["seconds"],
    )
    return cfg.out_dir
