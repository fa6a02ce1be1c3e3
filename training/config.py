"""Typed configuration of a continual-training run, one dataclass per concern.

`OptimConfig` (optimiser and schedule), `AdapterSizes` (adapter hyper-parameters of every
method), `EvalConfig` (what is evaluated after each stage and at the end) and `RunConfig`
(paths, method, task sequence, seed, device). Each has mini-CVIT defaults for the embedded
small models on CPU and a `paper()` constructor with the paper's hyper-parameters for real
LLaVA-1.5 checkpoints on GPUs. This module builds nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from smolora.adapters.precision import DTYPE_CHOICES, DTypeChoice
from smolora.adapters.smolora.config import DEFAULT_TARGET_MODULES
from smolora.training.data.tasks import UPSTREAM_ORDER

Schedule = Literal["cosine", "linear", "constant"]
METHOD_NAMES = (
    "smolora",
    "smolora_learned",
    "seqlora",
    "moelora",
    "ewc",
    "replay",
    "dora",
    "dirlora",
    "multitask",
    "zeroshot",
)


@dataclass
class OptimConfig:
    """Optimisation of one task stage (AdamW; the optimizer state restarts every task).

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step (global batch = batch_size * grad_accum).
        steps_per_task: optimizer steps per task; exclusive with `epochs`.
        epochs: passes over each task's training data; exclusive with `steps_per_task`.
        warmup_ratio: share of a stage's steps with linear warm-up.
        schedule: decay after warm-up.
        max_grad_norm: gradient clipping (0 disables).
    """

    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    steps_per_task: int | None = 120
    epochs: float | None = None
    warmup_ratio: float = 0.05
    schedule: Schedule = "cosine"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if (self.steps_per_task is None) == (self.epochs is None):
            raise ValueError("set exactly one of steps_per_task and epochs")
        if self.steps_per_task is not None and self.steps_per_task < 1:
            raise ValueError("steps_per_task must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("epochs must be positive")
        if self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("lr, batch_size and grad_accum must be positive")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"unknown schedule {self.schedule!r}")

    @classmethod
    def paper(cls) -> OptimConfig:
        """LLaVA-1.5 LoRA fine-tuning recipe used by the reference code for real models:
        lr 2e-4, one epoch per task, cosine with 3% warm-up, no weight decay, global batch
        128 (here 16 x 8 accumulation; scale batch_size to the GPUs you have)."""
        return cls(
            lr=2e-4, batch_size=16, grad_accum=8, steps_per_task=None, epochs=1.0, warmup_ratio=0.03
        )

    def stage_steps(self, num_examples: int) -> int:
        """Optimizer steps of a stage over `num_examples` training examples."""
        if self.steps_per_task is not None:
            return self.steps_per_task
        per_step = self.batch_size * self.grad_accum
        return max(1, int(round(self.epochs * num_examples / per_step)))  # type: ignore[operator]


@dataclass
class AdapterSizes:
    """Adapter hyper-parameters of every method.

    Attributes:
        rank, alpha, num_experts: SMoLoRA and MoELoRA (total rank; r/E per expert). The
            mini-CVIT default has E = 16 experts of rank 8 (the paper: E = 8 of rank 16)
            so that each of the six tasks can own a VU and an IF expert (8 of each); a
            token still runs 2 x 8 = 16 ranks, the plain LoRA rank of the baselines.
        lora_rank, lora_alpha: plain LoRA (SeqLoRA, Replay, DirLoRA, Multitask).
        dropout: LoRA dropout for all.
        target_modules: module-name suffixes to adapt (default: MLP projections + projector).
    """

    rank: int = 128
    alpha: float = 256.0
    num_experts: int = 16
    lora_rank: int = 16
    lora_alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank % self.num_experts or self.num_experts % 2:
            raise ValueError("rank must be a multiple of num_experts, which must be even")
        if self.lora_rank < 1 or self.alpha <= 0 or self.lora_alpha <= 0:
            raise ValueError("ranks and alphas must be positive")

    @classmethod
    def paper(cls) -> AdapterSizes:
        """The paper's sizes: E = 8 experts, total rank 128, alpha 256, dropout 0.05."""
        return cls(
            rank=128, alpha=256.0, num_experts=8, lora_rank=128, lora_alpha=256.0, dropout=0.05
        )


@dataclass
class EvalConfig:
    """What is evaluated.

    Attributes:
        test_limit: test examples per task (None: all).
        batch_size: generation batch size.
        unseen: evaluate the zero-shot tasks with the final model.
        few_shot: shot counts for the few-shot task (fine-tuned from the final model).
        few_shot_steps: optimizer steps of each few-shot fine-tune.
        robustness: evaluate held-out instruction paraphrases with the final model.
    """

    test_limit: int | None = None
    batch_size: int = 32
    unseen: bool = True
    few_shot: tuple[int, ...] = (5, 10)
    few_shot_steps: int = 30
    robustness: bool = True

    def __post_init__(self) -> None:
        self.few_shot = tuple(self.few_shot)
        if self.batch_size < 1 or any(k < 1 for k in self.few_shot) or self.few_shot_steps < 1:
            raise ValueError("batch_size, shot counts and few_shot_steps must be positive")


@dataclass
class RunConfig:
    """One method trained over one task sequence.

    Attributes:
        method: one of `METHOD_NAMES`.
        data_root: a built mini-CVIT folder (or any folder in its layout).
        base_dir: the frozen base model folder (HF LLaVA format).
        out_dir: run folder (results, matrix, registry).
        setting: "single" or "multi" instruction type.
        tasks: task order.
        seed: seeds adapter init, data order and dropout.
        train_limit: training examples per task (None: all).
        registry: checkpoint registry (default `out_dir/registry`).
        device: torch device.
        dtype: "auto", "float32" or "bfloat16" (bfloat16 autocast, float32 weights); "auto" is
            bfloat16 only where the device computes it natively (`adapters/precision.py`).
        num_threads: torch CPU threads (None: leave as is).
        replay_size: examples kept per past task (Replay).
        replay_ratio: share of each batch drawn from the buffer (Replay).
        ewc_lambda: weight of the online-EWC penalty `(lambda / 2) sum F (theta - theta*)^2`.
        ewc_decay: online EWC's gamma: the running Fisher is `gamma F_old + F_task` after
            each task (1.0: plain sum over tasks).
        ewc_fisher_samples: training examples per task whose squared per-example gradients
            estimate the diagonal Fisher.
    """

    method: str
    data_root: Path
    base_dir: Path
    out_dir: Path
    setting: Literal["single", "multi"] = "single"
    tasks: tuple[str, ...] = UPSTREAM_ORDER
    seed: int = 0
    train_limit: int | None = None
    registry: Path | None = None
    device: str = "cpu"
    dtype: DTypeChoice = "auto"
    num_threads: int | None = None
    replay_size: int = 100
    replay_ratio: float = 0.25
    ewc_lambda: float = 100.0
    ewc_decay: float = 1.0
    ewc_fisher_samples: int = 64
    optim: OptimConfig = field(default_factory=OptimConfig)
    adapter: AdapterSizes = field(default_factory=AdapterSizes)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.data_root, self.base_dir, self.out_dir = (
            Path(self.data_root),
            Path(self.base_dir),
            Path(self.out_dir),
        )
        self.registry = (
            Path(self.registry) if self.registry is not None else self.out_dir / "registry"
        )
        self.tasks = tuple(self.tasks)
        if self.method not in METHOD_NAMES:
            raise ValueError(f"unknown method {self.method!r}; choose from {list(METHOD_NAMES)}")
        if self.setting not in ("single", "multi"):
            raise ValueError(f"setting must be 'single' or 'multi', got {self.setting!r}")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError("tasks must be a non-empty sequence without repeats")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if not 0.0 <= self.replay_ratio < 1.0 or self.replay_size < 0:
            raise ValueError("replay_ratio must be in [0, 1) and replay_size >= 0")
        if self.ewc_lambda < 0 or not 0.0 <= self.ewc_decay <= 1.0 or self.ewc_fisher_samples < 1:
            raise ValueError(
                "ewc_lambda must be >= 0, ewc_decay in [0, 1], ewc_fisher_samples >= 1"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        d = dataclasses.asdict(self)
        for k in ("data_root", "base_dir", "out_dir", "registry"):
            d[k] = str(d[k])
        d["tasks"] = list(self.tasks)
        d["adapter"]["target_modules"] = list(self.adapter.target_modules)
        d["eval"]["few_shot"] = list(self.eval.few_shot)
        return d

    def run_key(self) -> dict[str, Any]:
        """The settings a resumed run must share with the versions it continues from."""
        d = self.to_dict()
        for k in ("out_dir", "registry", "device", "num_threads", "data_root", "base_dir"):
            d.pop(k)
        d.pop("eval")
        if self.method != "ewc":  # keeps other methods' keys as they were before EWC existed
            for k in ("ewc_lambda", "ewc_decay", "ewc_fisher_samples"):
                d.pop(k)
        return d
