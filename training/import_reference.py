"""`python -m smolora.training import-reference`: publish a paper checkpoint into a registry.

Converts a folder written by the SMoLoRA reference code (`adapter_model.bin`,
`adapter_config.json`, optional `non_lora_trainables.bin`) for an HF LLaVA base with
`smolora.adapters.reference_checkpoint`, then publishes it atomically as the registry's next
version (`publish_checkpoint`). The server picks it up like any trained version and serves it
with the reference's per-step VU routing unless a request or the server says otherwise.

This module parses arguments and prints; the conversion is in `adapters/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolora.adapters.checkpoint import CheckpointError, publish_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class ImportConfig:
    """One `import-reference` run.

    Attributes:
        src: the reference checkpoint folder.
        base: the HF LLaVA base-model folder it was trained on.
        registry: the registry to publish into.
        instructions: file with one instruction per `ins_emb` row (None: the paper's CVIT list).
        tasks: task names of the `ins_emb` rows, in row order (None: the instructions' own).
        patch_base: where to write a copy of the base carrying the projector weights of
            `non_lora_trainables.bin` when they differ from the base's (serve that folder).
        check_instructions: embed the instruction texts with MiniLM and warn when one is far
            from its `ins_emb` row.
    """

    src: Path
    base: Path
    registry: Path
    instructions: Path | None = None
    tasks: tuple[str, ...] | None = None
    patch_base: Path | None = None
    check_instructions: bool = True


def import_reference(cfg: ImportConfig) -> dict[str, Any]:
    """Convert and publish; returns a JSON-ready summary (version, folder, base to serve).

    Raises:
        ReferenceCheckpointError: the checkpoint cannot be imported (message says why).
    """
    from smolora.adapters.reference_checkpoint import (
        convert_reference_checkpoint,
        read_instruction_file,
    )

    specs = read_instruction_file(cfg.instructions) if cfg.instructions is not None else None
    encoder = None
    if cfg.check_instructions:
        from smolora.adapters.instructions import InstructionEncoder

        encoder = InstructionEncoder().encode
    converted = convert_reference_checkpoint(
        cfg.src,
        cfg.base,
        instructions=specs,
        tasks=cfg.tasks,
        encoder=encoder,
        patched_base_dir=cfg.patch_base,
    )
    entry = publish_checkpoint(cfg.registry, converted.tensors, converted.manifest)
    m = converted.manifest
    return {
        "version": entry.version,
        "path": str(entry.path),
        "serve_base": str(converted.patched_base or cfg.base),
        "tasks": m.tasks,
        "instruction_types": [t["name"] for t in m.instruction_types],
        "experts": m.adapter_config["num_experts"],
        "rank": m.adapter_config["rank"],
        "alpha": m.adapter_config["alpha"],
        "layers": len(m.layers),
        "vu_routing": m.adapter_config["vu_routing"],
        "instruction_similarity": converted.instruction_similarity,
    }


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `import-reference` subcommand."""
    p = sub.add_parser(
        "import-reference",
        help="publish a checkpoint of the SMoLoRA reference code into a registry",
    )
    p.add_argument(
        "src",
        type=Path,
        help="folder with adapter_model.bin, adapter_config.json [, non_lora_trainables.bin]",
    )
    p.add_argument(
        "--base", required=True, type=Path, help="the HF LLaVA base-model folder it was trained on"
    )
    p.add_argument(
        "--registry", required=True, type=Path, help="checkpoint registry to publish into"
    )
    p.add_argument(
        "--instructions",
        type=Path,
        default=None,
        help="one instruction per ins_emb row: .json list (strings or {task, text}) or a text "
        "file, one per line (default: the paper's CVIT single-type list)",
    )
    p.add_argument(
        "--tasks",
        type=_tasks,
        default=None,
        help="comma-separated task names of the ins_emb rows, in row order",
    )
    p.add_argument(
        "--patch-base",
        type=Path,
        default=None,
        help="new folder for a copy of the base with the projector weights of "
        "non_lora_trainables.bin (needed when they differ from the base's; serve that folder)",
    )
    p.add_argument(
        "--no-instruction-check",
        action="store_true",
        help="skip embedding the instruction texts to compare them with the ins_emb rows",
    )


def run(args: argparse.Namespace) -> int:
    """Run a parsed `import-reference` command; prints the summary or the refusal."""
    cfg = ImportConfig(
        src=args.src,
        base=args.base,
        registry=args.registry,
        instructions=args.instructions,
        tasks=args.tasks,
        patch_base=args.patch_base,
        check_instructions=not args.no_instruction_check,
    )
    try:
        summary = import_reference(cfg)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0
