"""Vision-tower pretraining: give the from-scratch CLIP tower what a pretrained CLIP has.

A real LLaVA starts from a CLIP tower pretrained on image-text pairs; the embedded models
start from random weights, and the language-model loss of the alignment alone teaches the
tower little about shapes (a shape word is one token in thirty, and the language model
cannot read a feature the tower does not compute yet; `base_probe.py` measures it, and
bench/README.md, "mini-CVIT base", has the numbers).

This stage trains the tower on the same image-description pairs the alignment uses, with
the description's facts as targets (`scene.parse_description`): for each of the 3 x 3 grid
cells, the shape, colour and size of the object there (or none); for the picture, the scene
(or book cover) and the sign word (or none), classified from the features LLaVA passes to
the projector (the tower's `vision_feature_layer`; see `FactHeads`). The heads are dropped
afterwards; the tower keeps the features, and the alignment stage then teaches the
projector and the language model to read them (`train_modules="language"` keeps the tower
as this stage left it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from smolora.training.data.batches import next_indices
from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.cvit_json import Example
from smolora.training.data.scene import (
    BACKGROUNDS,
    CELL_NAMES,
    COLOURS,
    SHAPES,
    WORDS,
    parse_description,
)
from smolora.training.stage_loop import cosine_adamw, final_loss, optimizer_step

CELLS = tuple(CELL_NAMES)
OBJECT_SIZES = ("small", "large", "huge")
#: Classes of each head; index 0 of a cell head is "no object in this cell".
HEAD_CLASSES: dict[str, tuple[str, ...]] = {
    "shape": ("none", *SHAPES),
    "colour": ("none", *COLOURS),
    "size": ("none", *OBJECT_SIZES),
    "scene": (*BACKGROUNDS, "cover"),
    "sign": ("none", *WORDS),
}
CELL_HEADS = ("shape", "colour", "size")
PICTURE_HEADS = ("scene", "sign")


def fact_targets(description: str) -> dict[str, Tensor]:
    """Class indices of every head for one description: cell heads `[9]`, picture heads `[]`."""
    facts = parse_description(description)
    cell = {name: torch.zeros(len(CELLS), dtype=torch.long) for name in CELL_HEADS}
    for o in facts.objects:
        i = CELLS.index(o.cell)
        cell["shape"][i] = HEAD_CLASSES["shape"].index(o.shape)
        cell["colour"][i] = HEAD_CLASSES["colour"].index(o.colour)
        cell["size"][i] = HEAD_CLASSES["size"].index(o.size)
    scene = "cover" if facts.cover is not None else facts.background
    if scene is None:
        raise ValueError(f"description names neither a scene nor a cover: {description!r}")
    return {
        **cell,
        "scene": torch.tensor(HEAD_CLASSES["scene"].index(scene)),
        "sign": torch.tensor(HEAD_CLASSES["sign"].index(facts.sign or "none")),
    }


class FactHeads(nn.Module):
    """Classifiers of the facts from the tower's patch features.

    A cell's features are the average and the maximum of the patch features under it
    (the patch grid pooled to 3 x 3, overlapping windows); a small MLP per cell head
    classifies them. The picture's features come from one learned query attending over all
    patches (the sign may be anywhere).
    """

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.query = nn.Parameter(torch.randn(1, hidden) * 0.02)
        self.attn = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.cell_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.GELU())
        self.out = nn.ModuleDict({k: nn.Linear(hidden, len(v)) for k, v in HEAD_CLASSES.items()})

    def forward(self, patches: Tensor) -> dict[str, Tensor]:
        b, n, h = patches.shape
        side = int(round(n**0.5))
        x = self.norm(patches)
        grid = x.transpose(1, 2).reshape(b, h, side, side)
        rows, cols = zip(*CELLS)
        shape = (max(rows) + 1, max(cols) + 1)
        pooled = torch.cat(
            [
                nn.functional.adaptive_avg_pool2d(grid, shape),
                nn.functional.adaptive_max_pool2d(grid, shape),
            ],
            dim=1,
        )  # [B, 2h, 3, 3], row-major like CELLS
        cells = self.cell_mlp(pooled.flatten(2).transpose(1, 2))  # [B, 9, h]
        picture, _ = self.attn(self.query.expand(b, 1, h), x, x, need_weights=False)
        return {
            **{k: self.out[k](cells) for k in CELL_HEADS},  # [B, 9, classes]
            **{k: self.out[k](picture[:, 0]) for k in PICTURE_HEADS},  # [B, classes]
        }


def tower_features(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """The patch features LLaVA projects: `vision_feature_layer`'s hidden states, CLS
    dropped (the tiny models use the "default" select strategy), `[B, patches, hidden]`."""
    layer = model.config.vision_feature_layer
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[layer][:, 1:]


def _batch(encoder: ExampleEncoder, examples: Sequence[Example], device: torch.device):
    pixels = torch.stack([encoder.pixel_values(e) for e in examples]).to(device)
    targets = [fact_targets(e.answer) for e in examples]
    stacked = {k: torch.stack([t[k] for t in targets]).to(device) for k in HEAD_CLASSES}
    return pixels, stacked


def _loss(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    return sum(
        nn.functional.cross_entropy(
            logits[k].reshape(-1, logits[k].shape[-1]), targets[k].reshape(-1)
        )
        for k in HEAD_CLASSES
    )


@torch.no_grad()
def head_accuracy(
    model: nn.Module,
    heads: FactHeads,
    encoder: ExampleEncoder,
    examples: Sequence[Example],
    device: torch.device,
) -> dict[str, float]:
    """Accuracy (%) per head on `examples`; cell heads count only cells holding an object."""
    right = dict.fromkeys(HEAD_CLASSES, 0)
    seen = dict.fromkeys(HEAD_CLASSES, 0)
    for i in range(0, len(examples), 64):
        pixels, targets = _batch(encoder, examples[i : i + 64], device)
        logits = heads(tower_features(model, pixels).float())
        occupied = targets["shape"] > 0
        for k in HEAD_CLASSES:
            hit = logits[k].argmax(-1) == targets[k]
            mask = occupied if k in CELL_HEADS else torch.ones_like(hit)
            right[k] += int((hit & mask).sum())
            seen[k] += int(mask.sum())
    return {k: 100.0 * right[k] / max(seen[k], 1) for k in HEAD_CLASSES}


def pretrain_tower(
    model: nn.Module,
    encoder: ExampleEncoder,
    data: Sequence[Example],
    heldout: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    autocast_bf16: bool,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model`'s vision tower on the descriptions' facts (in place).

    Returns:
        {"steps", "final_loss", "heldout_accuracy": {head: %} or None}.
    """
    torch.manual_seed(seed)
    tower = model.model.vision_tower
    config = tower.config
    heads = FactHeads(config.hidden_size, config.num_attention_heads).to(device)
    params = [*tower.parameters(), *heads.parameters()]
    for p in params:
        p.requires_grad_(True)
    optim, sched = cosine_adamw(params, lr, 0.01, steps, max(1, steps // 20))
    rng = random.Random(f"{seed}|tower")
    order: list[int] = []
    losses: list[float] = []
    tower.train()
    for _ in tqdm(range(steps), desc="pretrain tower", disable=not progress):
        indices = next_indices(order, len(data), batch_size, rng)
        pixels, targets = _batch(encoder, [data[i] for i in indices], device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = _loss(heads(tower_features(model, pixels)), targets)
        losses.append(optimizer_step(loss, params, optim, sched))
    tower.eval()
    accuracy = head_accuracy(model, heads, encoder, heldout, device) if heldout else None
    return {
        "steps": steps,
        "final_loss": final_loss(losses),
        "heldout_accuracy": accuracy,
    }
