"""Build the mini-CVIT benchmark on disk, deterministically from a seed, and load it back.

Layout of a built benchmark folder:

    manifest.json                       generator config + task specs (a rebuild check)
    images/<task>/<split>-<n>.png       Pillow-rendered pictures (shared by both settings)
    single/<task>/{train,test,test_heldout}.json   single-type instructions
    multi/<task>/{train,test,test_heldout}.json    multi-type (5 paraphrases; held-out 2)
    pretrain/train.json                 generic descriptions for base alignment

Every JSON file is in the LLaVA/CVIT conversation format (`cvit_json.py`), so the same
loader reads the paper's real CVIT files. Randomness comes from `random.Random` seeded by
strings of (seed, task, split), so a task's data does not depend on which other tasks were
built. This module does not tokenize or train.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from smolora.training.data.cvit_json import Example, load_examples, make_record, write_records
from smolora.training.data.scene import (
    describe,
    render_scene,
    sample_cover,
    sample_scene,
    sample_single_object,
)
from smolora.training.data.tasks import (
    FEW_SHOT,
    TASKS,
    UPSTREAM_ORDER,
    ZERO_SHOT,
    all_backgrounds,
    make_item,
    places_item,
)

logger = logging.getLogger(__name__)

Setting = Literal["single", "multi"]
GENERATOR_VERSION = 1
PRETRAIN_PROMPTS = (
    "Describe the image.",
    "What is in this picture?",
    "Tell me about the image.",
    "What do you see?",
)


@dataclass
class MiniCVITConfig:
    """What to generate.

    Attributes:
        seed: master seed; the same seed gives byte-identical files.
        image_size: picture side in pixels (the processor resizes to the model's size).
        train_per_task: training items per upstream task.
        test_per_task: test items per upstream task and per zero-shot task.
        few_shot_max: training shots per class kept for the few-shot task (5- and 10-shot
            runs take the first k per class).
        pretrain_size: generic descriptions for base alignment.
        tasks: upstream task order.
    """

    seed: int = 0
    image_size: int = 64
    train_per_task: int = 2000
    test_per_task: int = 100
    few_shot_max: int = 10
    pretrain_size: int = 24000
    tasks: tuple[str, ...] = UPSTREAM_ORDER

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS or TASKS[t].kind != "upstream"]
        if unknown:
            raise ValueError(
                f"not upstream mini-CVIT tasks: {unknown}; choose from {list(UPSTREAM_ORDER)}"
            )
        if (
            min(self.train_per_task, self.test_per_task, self.few_shot_max) < 1
            or self.pretrain_size < 0
        ):
            raise ValueError("item counts must be positive")
        if self.image_size < 16:
            raise ValueError("image_size must be >= 16")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["generator_version"] = GENERATOR_VERSION
        return d


def _rng(seed: int, *parts: str) -> random.Random:
    return random.Random("|".join([str(seed), *parts]))


def _write_split(
    root: Path, cfg: MiniCVITConfig, task: str, split: str, n: int, bar: tqdm, items=None
) -> None:
    """Render `n` items of a task split and write its files for both settings."""
    spec = TASKS[task]
    rng = _rng(cfg.seed, task, split)
    img_dir = root / "images" / task
    img_dir.mkdir(parents=True, exist_ok=True)
    files: dict[tuple[str, str], list] = {}
    for i in range(n):
        item = items[i] if items is not None else make_item(task, rng)
        rel = f"images/{task}/{split}-{i:05d}.png"
        render_scene(item.scene, cfg.image_size, seed=rng.randrange(1 << 30)).save(root / rel)
        multi_seen = rng.choice(spec.templates)
        held = rng.choice(spec.heldout)
        rid = f"{task}-{split}-{i:05d}"
        per_setting = {"single": spec.single_template, "multi": multi_seen}
        for setting, instruction in per_setting.items():
            files.setdefault((setting, split), []).append(
                make_record(
                    rid, rel, item.question, instruction, item.answer, task, item.references
                )
            )
            if split == "test":
                files.setdefault((setting, "test_heldout"), []).append(
                    make_record(rid, rel, item.question, held, item.answer, task, item.references)
                )
        bar.update(1)
    for (setting, name), records in files.items():
        write_records(root / setting / task / f"{name}.json", records)


def build_mini_cvit(
    root: str | Path, config: MiniCVITConfig | None = None, progress: bool = True
) -> Path:
    """Generate the benchmark into `root` (skipped when an identical build is there).

    Args:
        root: output folder.
        config: what to generate (defaults to `MiniCVITConfig()`).
        progress: show a progress bar.

    Returns:
        The folder path.
    """
    cfg = config or MiniCVITConfig()
    out = Path(root)
    manifest_path = out / "manifest.json"
    want = {"config": cfg.to_dict(), "tasks": {t: asdict(TASKS[t]) for t in TASKS}}
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == json.loads(
        json.dumps(want)
    ):
        logger.info("mini-CVIT already built at %s", out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    n_bg = len(all_backgrounds())
    total = (
        len(cfg.tasks) * (cfg.train_per_task + cfg.test_per_task)
        + len(ZERO_SHOT) * cfg.test_per_task
        + len(FEW_SHOT) * (cfg.few_shot_max * n_bg + cfg.test_per_task)
        + cfg.pretrain_size
    )
    with tqdm(total=total, desc="mini-CVIT", unit="img", disable=not progress) as bar:
        for task in cfg.tasks:
            _write_split(out, cfg, task, "train", cfg.train_per_task, bar)
            _write_split(out, cfg, task, "test", cfg.test_per_task, bar)
        for task in ZERO_SHOT:
            _write_split(out, cfg, task, "test", cfg.test_per_task, bar)
        for task in FEW_SHOT:
            rng = _rng(cfg.seed, task, "shots")
            # Shot k of every class before shot k+1, so the first k*classes items are k-shot.
            shots = [
                places_item(rng, bg) for _ in range(cfg.few_shot_max) for bg in all_backgrounds()
            ]
            _write_split(out, cfg, task, "train", len(shots), bar, items=shots)
            _write_split(out, cfg, task, "test", cfg.test_per_task, bar)
        _write_pretrain(out, cfg, bar)
    manifest_path.write_text(json.dumps(want, indent=1))
    return out


def _write_pretrain(root: Path, cfg: MiniCVITConfig, bar: tqdm) -> None:
    """Generic descriptions of every kind of picture (no task question, no task format)."""
    rng = _rng(cfg.seed, "pretrain")
    (root / "images" / "pretrain").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(cfg.pretrain_size):
        r = rng.random()
        scene = (
            sample_single_object(rng)
            if r < 0.15
            else sample_cover(rng)
            if r < 0.25
            else sample_scene(rng, 0, 5, sign=rng.random() < 0.35)
        )
        rel = f"images/pretrain/{i:05d}.png"
        render_scene(scene, cfg.image_size, seed=rng.randrange(1 << 30)).save(root / rel)
        records.append(
            make_record(
                f"pretrain-{i:05d}",
                rel,
                "",
                rng.choice(PRETRAIN_PROMPTS),
                describe(scene),
                "pretrain",
                [],
            )
        )
        bar.update(1)
    write_records(root / "pretrain" / "train.json", records)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
def task_file(root: str | Path, setting: Setting, task: str, split: str) -> Path:
    """Path of one split file (`train`, `test` or `test_heldout`)."""
    if setting not in ("single", "multi"):
        raise ValueError(f"setting must be 'single' or 'multi', got {setting!r}")
    return Path(root) / setting / task / f"{split}.json"


def load_split(
    root: str | Path, setting: Setting, task: str, split: str, limit: int | None = None
) -> list[Example]:
    """Load one mini-CVIT split as `Example`s (images resolved against `root`).

    Raises:
        FileNotFoundError: with a hint to build the benchmark first.
    """
    path = task_file(root, setting, task, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: build mini-CVIT first (python -m smolora.training build-data "
            f"--out {root})"
        )
    spec = TASKS.get(task)
    known = (spec.templates + spec.heldout) if spec else ()
    return load_examples(path, task=task, image_root=root, known_instructions=known, limit=limit)


def few_shot_split(examples: list[Example], shots: int) -> list[Example]:
    """The first `shots` examples of each class (answer) of a few-shot pool."""
    taken: dict[str, int] = {}
    out = []
    for ex in examples:
        if taken.get(ex.answer, 0) < shots:
            out.append(ex)
            taken[ex.answer] = taken.get(ex.answer, 0) + 1
    return out


def load_pretrain(root: str | Path, limit: int | None = None) -> list[Example]:
    """The base-alignment descriptions."""
    return load_examples(
        Path(root) / "pretrain" / "train.json", task="pretrain", image_root=root, limit=limit
    )
