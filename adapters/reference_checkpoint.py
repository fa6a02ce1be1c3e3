"""Convert a checkpoint written by the SMoLoRA reference code into checkpoint format v1.

`convert_reference_checkpoint` reads a reference folder (`reference_format.py` checks and
maps its tensors), builds the instruction table from `ins_emb` with the instruction texts and
task names the caller supplies (default: the paper's CVIT list, `data/cvit_instructions.json`),
and returns the tensors and manifest of a format-v1 checkpoint. The manifest's adapter config
says `vu_routing="per_step"`, the reference's decode-time routing, which the engine then
serves the version with by default; `training.reference_semantics` records what the
reference computes.

LLaVA's trainer also writes `non_lora_trainables.bin` (the projector, when it trained it).
Its tensors are compared with the base's: equal is accepted; different needs
`patched_base_dir`, where a copy of the base carrying them is written (the checkpoint then
names that copy as its base). Anything else is refused with `ReferenceCheckpointError`.

It does not publish (`checkpoint.publish_checkpoint`), build models or run anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from smolora.adapters.checkpoint import CheckpointManifest, base_model_fingerprint, sha256_file
from smolora.adapters.instructions import EMBED_DIM, InstructionTable, InstructionType
from smolora.adapters.reference_format import (
    ADAPTER_BIN,
    ADAPTER_CONFIG,
    ADAPTER_SAFETENSORS,
    BaseShapes,
    ReferenceCheckpointError,
    ReferenceConfig,
    adapted_layers,
    first_items,
    map_reference_tensors,
    read_reference_config,
    read_state_dict,
    target_modules_of,
)
from smolora.adapters.smolora.config import SMoLoRAConfig

logger = logging.getLogger(__name__)

NON_LORA = "non_lora_trainables.bin"
CVIT_INSTRUCTIONS = Path(__file__).parent / "data" / "cvit_instructions.json"
#: `non_lora_trainables.bin` keys LLaVA writes for the projector, and our base's names.
_NON_LORA_PROJECTOR = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?mm_projector\.(0|2)\.(weight|bias)$"
)
_BASE_PROJECTOR = {"0": "multi_modal_projector.linear_1", "2": "multi_modal_projector.linear_2"}

REFERENCE_SEMANTICS: dict[str, str] = {
    "vu_routing": "per_step: at a cached decode step the reference's layer input is the new token "
    "alone, so its VU route is recomputed from that token",
    "vu_mean": "unmasked: the reference averages the layer input over all positions, padding "
    "included; it serves one request at a time (no padding), where this equals our masked mean",
    "expert_order": "identical: experts 0..E/2-1 are VU, E/2..E-1 IF, in the reference and here",
}


# -- instructions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstructionSpec:
    """The instruction of one `ins_emb` row: its text and the task it belongs to."""

    task: str
    text: str


def cvit_instructions() -> list[InstructionSpec]:
    """The paper's CVIT single-type instructions, one per `ins_emb` row, in task-id order."""
    data = json.loads(CVIT_INSTRUCTIONS.read_text())
    return [InstructionSpec(d["task"], d["text"]) for d in data["instructions"]]


def read_instruction_file(path: str | Path) -> list[InstructionSpec]:
    """Instructions, one per `ins_emb` row, from a file.

    `.json`: a list (or `{"instructions": [...]}`) of strings or `{"text": ..., "task": ...}`
    objects. Any other file: one instruction per non-empty line, `\\n` written as the two
    characters backslash-n. Rows without a task name are named `task<k>`.

    Raises:
        ReferenceCheckpointError: unreadable or malformed file.
    """
    p = Path(path)
    try:
        raw = p.read_text()
    except OSError as e:
        raise ReferenceCheckpointError(f"{p}: cannot read the instruction file ({e})") from None
    if p.suffix == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ReferenceCheckpointError(f"{p}: not valid JSON ({e})") from None
        items = data.get("instructions") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ReferenceCheckpointError(
                f'{p}: expected a list of instructions (or {{"instructions": [...]}})'
            )
        out = []
        for k, item in enumerate(items):
            if isinstance(item, str):
                out.append(InstructionSpec(f"task{k}", item))
            elif isinstance(item, dict) and isinstance(item.get("text"), str):
                out.append(InstructionSpec(str(item.get("task") or f"task{k}"), item["text"]))
            else:
                raise ReferenceCheckpointError(
                    f"{p}: instruction {k} must be a string or an object with a 'text' string"
                )
        return out
    lines = [line.strip().replace("\\n", "\n") for line in raw.splitlines()]
    return [InstructionSpec(f"task{k}", t) for k, t in enumerate(t for t in lines if t)]


def instruction_table(
    cfg: ReferenceConfig,
    instructions: Sequence[InstructionSpec] | None,
    tasks: Sequence[str] | None,
) -> InstructionTable:
    """One instruction type per `ins_emb` row: name = task name, the row as its embedding.

    With `instructions=None` the paper's CVIT list is used (its first K rows for a K-row
    table). `tasks` renames the rows' tasks.

    Raises:
        ReferenceCheckpointError: counts that differ from the table's rows, empty or
            repeated task names.
    """
    rows = int(cfg.ins_emb.shape[0])
    if instructions is None:
        default = cvit_instructions()
        if rows > len(default):
            raise ReferenceCheckpointError(
                f"ins_emb has {rows} rows but the default CVIT list has {len(default)} "
                "instructions; pass an instruction file with one instruction per row"
            )
        specs = default[:rows]
    else:
        specs = list(instructions)
        if len(specs) != rows:
            raise ReferenceCheckpointError(
                f"{len(specs)} instructions given, but ins_emb has {rows} rows (one instruction "
                "per row, in row order)"
            )
    if tasks is not None:
        if len(tasks) != rows:
            raise ReferenceCheckpointError(
                f"{len(tasks)} task names given, but ins_emb has {rows} rows (one task per row, "
                "in row order)"
            )
        specs = [InstructionSpec(t, s.text) for t, s in zip(tasks, specs)]
    names = [s.task.strip() for s in specs]
    if any(not n for n in names):
        raise ReferenceCheckpointError("task names must not be empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ReferenceCheckpointError(
            f"task names {dupes} repeat; every ins_emb row needs its own task name"
        )
    if any(not s.text.strip() for s in specs):
        raise ReferenceCheckpointError("instruction texts must not be empty")
    emb = cfg.ins_emb.tolist()
    return InstructionTable(
        [
            InstructionType(n, s.text, n, tuple(float(x) for x in emb[k]))
            for k, (n, s) in enumerate(zip(names, specs))
        ]
    )


# -- non-LoRA weights (the projector LLaVA trained) ------------------------------------------------
def _base_weight_index(base_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a model folder."""
    index: dict[str, Path] = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                index[name] = f
    return index


def projector_overrides(path: str | Path, base_dir: str | Path) -> dict[str, Tensor]:
    """The weights of `non_lora_trainables.bin` that differ from the base's.

    Maps `[base_model.model.][model.]mm_projector.{0,2}.{weight,bias}` onto the base's
    `...multi_modal_projector.linear_{1,2}.{weight,bias}` and compares in the base's dtype.

    Returns:
        Base tensor name -> the checkpoint's tensor (in the base's dtype), only for tensors
        that differ; empty when every tensor equals the base's.

    Raises:
        ReferenceCheckpointError: keys other than the projector's, a projector tensor the
            base does not have, or a shape mismatch.
    """
    state = read_state_dict(path)
    root = Path(base_dir)
    index = _base_weight_index(root)
    unmapped = [k for k in state if not _NON_LORA_PROJECTOR.match(k)]
    if unmapped:
        raise ReferenceCheckpointError(
            f"{path}: holds weights other than the projector's ({first_items(sorted(unmapped))}); "
            "this importer maps only mm_projector.0 / .2 onto the base; merge the others into the "
            "base model yourself"
        )
    out: dict[str, Tensor] = {}
    for key, t in sorted(state.items()):
        m = _NON_LORA_PROJECTOR.match(key)
        assert m is not None
        suffix = f"{_BASE_PROJECTOR[m.group(1)]}.{m.group(2)}"
        hits = [n for n in index if n == suffix or n.endswith("." + suffix)]
        if len(hits) != 1:
            raise ReferenceCheckpointError(
                f"{path}: {key} maps to {suffix}, which the base {root} has {len(hits)} times "
                "(need exactly one)"
            )
        with safe_open(str(index[hits[0]]), framework="pt") as fh:
            base = fh.get_tensor(hits[0])
        if tuple(t.shape) != tuple(base.shape):
            raise ReferenceCheckpointError(
                f"{path}: {key} has shape {list(t.shape)}, the base's {hits[0]} {list(base.shape)}"
            )
        trained = t.to(base.dtype)
        if not torch.equal(trained, base):
            out[hits[0]] = trained
    return out


def write_patched_base(
    base_dir: str | Path, out_dir: str | Path, overrides: Mapping[str, Tensor]
) -> Path:
    """Copy a model folder to `out_dir` with some tensors replaced (atomically: written aside,
    then renamed into place).

    Raises:
        ReferenceCheckpointError: `out_dir` exists, or a tensor is not in the base.
    """
    src, out = Path(base_dir), Path(out_dir)
    if out.exists():
        raise ReferenceCheckpointError(
            f"{out}: already exists; choose a new folder for the patched base model"
        )
    index = _base_weight_index(src)
    missing = sorted(set(overrides) - set(index))
    if missing:
        raise ReferenceCheckpointError(f"{src}: has no tensors {missing[:4]} to patch")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    try:
        shutil.copytree(src, tmp)
        for f in sorted({index[n].name for n in overrides}):
            with safe_open(str(tmp / f), framework="pt") as fh:
                metadata = fh.metadata()
            tensors = load_file(str(tmp / f))
            tensors.update(
                {
                    n: t.to(tensors[n].dtype).contiguous()
                    for n, t in overrides.items()
                    if index[n].name == f
                }
            )
            save_file(tensors, str(tmp / f), metadata=metadata)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- the whole conversion ------------------------------------------------------------------------
@dataclass
class ImportedCheckpoint:
    """A converted reference checkpoint, ready for `publish_checkpoint(registry, tensors,
    manifest)`.

    Attributes:
        tensors: `{canonical_layer}.{tensor}` -> float32 tensor.
        manifest: format-v1 manifest (adapter config with `vu_routing="per_step"`).
        reference: the parsed `adapter_config.json`.
        patched_base: the patched base folder written, or None when the base fits as is.
        instruction_similarity: per `ins_emb` row, cosine of the supplied text's embedding
            to the row (None when no encoder was given).
    """

    tensors: dict[str, Tensor]
    manifest: CheckpointManifest
    reference: ReferenceConfig
    patched_base: Path | None = None
    instruction_similarity: list[float] | None = field(default=None)


def convert_reference_checkpoint(
    src: str | Path,
    base_dir: str | Path,
    *,
    instructions: Sequence[InstructionSpec] | None = None,
    tasks: Sequence[str] | None = None,
    encoder: Callable[[list[str]], Tensor] | None = None,
    patched_base_dir: str | Path | None = None,
) -> ImportedCheckpoint:
    """Read, check and convert a reference checkpoint folder for the base `base_dir`.

    Args:
        src: the reference folder (`adapter_model.bin` or `.safetensors`, `adapter_config.json`,
            optional `non_lora_trainables.bin`).
        base_dir: the HF LLaVA base it was trained on.
        instructions: one per `ins_emb` row; None takes the paper's CVIT list.
        tasks: task names of the rows (override the instructions' own).
        encoder: texts -> `[n, 384]` embeddings; when given, each text's cosine to its
            `ins_emb` row is recorded and a low one is logged as a warning (wrong texts or
            order would snap requests to the wrong rows).
        patched_base_dir: where to write a base copy carrying the trained projector of
            `non_lora_trainables.bin` when it differs from the base's; without it such a
            checkpoint is refused.

    Returns:
        The converted checkpoint (not yet published).

    Raises:
        ReferenceCheckpointError: see `read_reference_config`, `map_reference_tensors`,
            `instruction_table`, `projector_overrides`.
    """
    root, base = Path(src), Path(base_dir)
    if not root.is_dir():
        raise ReferenceCheckpointError(
            f"{root}: not a folder; pass the folder the reference code saved the adapter into"
        )
    cfg = read_reference_config(root)
    weights = (
        root / ADAPTER_SAFETENSORS if (root / ADAPTER_SAFETENSORS).is_file() else root / ADAPTER_BIN
    )
    if not weights.is_file():
        raise ReferenceCheckpointError(f"{root}: no {ADAPTER_BIN} (or {ADAPTER_SAFETENSORS})")
    shapes = BaseShapes.from_model_dir(base)
    tensors = map_reference_tensors(read_state_dict(weights), cfg, shapes)
    table = instruction_table(cfg, instructions, tasks)

    similarity = None
    if encoder is not None:
        got = encoder([t.text for t in table.types]).to(torch.float32)
        similarity = [
            float(x) for x in torch.nn.functional.cosine_similarity(got, cfg.ins_emb, dim=-1)
        ]
        for t, s in zip(table.types, similarity):
            if not s >= 0.95:
                logger.warning(
                    "instruction of %r embeds at cosine %.3f to its ins_emb row: the texts or "
                    "their order may not be the ones the checkpoint was trained with (requests "
                    "snapped to this type still route with the row)",
                    t.name,
                    s,
                )

    non_lora = root / NON_LORA
    patched: Path | None = None
    non_lora_state = "absent"
    if non_lora.is_file():
        overrides = projector_overrides(non_lora, base)
        if overrides and patched_base_dir is None:
            raise ReferenceCheckpointError(
                f"{non_lora}: the checkpoint was trained with its own projector weights "
                f"({first_items(sorted(overrides))} differ from {base}'s); pass a new folder for "
                "a patched copy of the base (--patch-base DIR) and serve that folder"
            )
        if overrides:
            patched = write_patched_base(base, patched_base_dir, overrides)  # type: ignore[arg-type]
            non_lora_state = f"differs from the base: patched into {patched}"
        else:
            non_lora_state = "equal to the base"
    serve_base = patched or base

    layers = adapted_layers(tensors)
    adapter = SMoLoRAConfig(
        num_experts=cfg.expert_num,
        rank=cfg.r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        instruction_dim=EMBED_DIM,
        target_modules=target_modules_of(layers),
        vu_routing="per_step",
        router_training="frozen_random",
    )
    names = [t.name for t in table.types]
    base_info: dict[str, Any] = {
        "fingerprint": base_model_fingerprint(serve_base),
        "name": serve_base.name,
    }
    if patched is not None:
        base_info["patched_from"] = {"name": base.name, "fingerprint": base_model_fingerprint(base)}
    files = {
        f.name: sha256_file(f)
        for f in sorted(root.iterdir())
        if f.is_file() and f.name in (ADAPTER_BIN, ADAPTER_SAFETENSORS, ADAPTER_CONFIG, NON_LORA)
    }
    manifest = CheckpointManifest(
        adapter_kind="smolora",
        adapter_config=adapter.to_dict(),
        base_model=base_info,
        layers=layers,
        tasks=names[: cfg.ins_type + 1],
        instruction_types=table.to_list(),
        training={
            "source": "smolora-reference",
            "imported_from": {
                "path": str(root.resolve()),
                "files": files,
                "adapter_config": cfg.summary(),
                "non_lora_trainables": non_lora_state,
            },
            "reference_semantics": dict(REFERENCE_SEMANTICS),
            "instruction_similarity": similarity,
        },
    )
    return ImportedCheckpoint(tensors, manifest, cfg, patched, similarity)
