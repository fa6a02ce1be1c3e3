"""Evaluate a published checkpoint (SMoLoRA, LoRA or MoELoRA) or the bare base on tasks.

Loads the base, verifies the checkpoint against the base fingerprint, rebuilds the adapter
its manifest names, and evaluates each task's split with the same generation and scoring
as training (`evaluate.py`). SMoLoRA requests are routed by the MiniLM embedding of each
example's instruction template. It does not train or publish.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from smolora.adapters.baselines import (
    DoRAConfig,
    DoRAModel,
    LoRAConfig,
    LoRAModel,
    MoELoRAConfig,
    MoELoRAModel,
)
from smolora.adapters.checkpoint import base_model_fingerprint, latest_version, load_checkpoint
from smolora.adapters.instructions import InstructionEncoder
from smolora.adapters.smolora import RoutingContext, SMoLoRAConfig, SMoLoRAModel
from smolora.adapters.tiny_llava import load_llava
from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.mini_cvit import load_split
from smolora.training.data.tasks import TASKS
from smolora.training.evaluate import MaskHook, evaluate_task, no_scope


def _resolve(path: Path) -> Path:
    """A checkpoint folder, or the `latest` version of a registry folder."""
    if (path / "manifest.json").is_file():
        return path
    entry = latest_version(path)
    if entry is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint nor a registry with versions")
    return entry.path


def attach_checkpoint(model: torch.nn.Module, checkpoint: Path, base_dir: Path):
    """Attach the adapter a checkpoint describes and load its tensors.

    Returns:
        (adapter model, manifest).
    """
    ck = load_checkpoint(
        _resolve(checkpoint), expected_fingerprint=base_model_fingerprint(base_dir)
    )
    kind, cfg = ck.manifest.adapter_kind, dict(ck.manifest.adapter_config)
    if kind == "smolora":
        adapter: Any = SMoLoRAModel(model, SMoLoRAConfig.from_dict(cfg))
    elif kind == "lora":
        adapter = LoRAModel(model, LoRAConfig(**cfg))
    elif kind == "moelora":
        adapter = MoELoRAModel(model, MoELoRAConfig(**cfg))
    elif kind == "dora":
        adapter = DoRAModel(model, DoRAConfig(**cfg))
    else:
        raise ValueError(f"cannot evaluate adapter kind {kind!r}")
    adapter.load_adapter_state_dict(ck.tensors)
    return adapter, ck.manifest


def evaluate_checkpoint(
    checkpoint: Path | None,
    base_dir: Path,
    data_root: Path,
    setting: str,
    tasks: Sequence[str],
    split: str = "test",
    test_limit: int | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Scores per task (`TaskResult.summary()`), plus which checkpoint was used."""
    model, processor = load_llava(base_dir)
    model.to(device)
    encoder = ExampleEncoder(processor)
    scope = no_scope
    used = None
    if checkpoint is not None:
        adapter, manifest = attach_checkpoint(model, Path(checkpoint), Path(base_dir))
        used = {"version": manifest.version, "tasks": manifest.tasks, "kind": manifest.adapter_kind}
        if isinstance(adapter, SMoLoRAModel):
            minilm = InstructionEncoder()

            @contextlib.contextmanager
            def scope(batch: dict[str, Any]) -> Iterator[MaskHook]:  # type: ignore[misc]
                ctx = RoutingContext(
                    minilm.encode(batch["instructions"]), vu_routing=adapter.config.vu_routing
                )
                with adapter.routing(ctx):
                    yield ctx.set_token_mask

    out: dict[str, Any] = {"checkpoint": used, "split": split, "tasks": {}}
    for task in tasks:
        examples = load_split(data_root, setting, task, split, test_limit)  # type: ignore[arg-type]
        out["tasks"][task] = evaluate_task(
            model, encoder, examples, scope, batch_size, TASKS.get(task), progress
        ).summary()
    return out
