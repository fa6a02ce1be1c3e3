"""The main job on the embedded default model: train it if absent, then serve it.

Steps, each skipped when its output already exists (so a second run goes straight to
serving, and an interrupted run resumes):
  1. build the mini-CVIT data (`python -m smolora.training build-data`);
  2. align the embedded base model on generic image descriptions (`... pretrain`);
  3. train SMoLoRA over the six upstream tasks, publishing a checkpoint version into the
     registry after each task (`... train --method smolora`; the trainer resumes after the
     last published task);
  4. serve the base + registry on the OpenAI-compatible endpoint
     (`python -m smolora.server serve`), which also hot-loads later versions.
Each step is its own process: this module only orchestrates, it imports neither the
trainer nor the server.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("smolora.quickstart")


def _run(argv: list[str]) -> None:
    log.info("running: %s", " ".join(argv))
    subprocess.run([sys.executable, "-m", *argv], check=True)


def run(args: argparse.Namespace) -> int:
    from smolora.adapters.checkpoint import list_versions
    from smolora.adapters.tiny_llava import get_preset

    preset = get_preset(args.preset)
    work = Path(args.workdir)
    data = work / "data" / f"mini_cvit-{preset.image_size}px-seed{args.seed}"
    base = work / "models" / f"base-{args.preset}-seed{args.seed}"
    run_dir = work / "runs" / f"smolora-{args.preset}-seed{args.seed}"
    registry = work / "registry" / f"{args.preset}-seed{args.seed}"

    if not (data / "single").is_dir():
        _run(
            [
                "smolora.training",
                "build-data",
                "--out",
                str(data),
                "--seed",
                str(args.seed),
                "--image-size",
                str(preset.image_size),
                "--train-per-task",
                str(args.train_per_task),
                "--test-per-task",
                str(args.test_per_task),
            ]
        )
    if not (base / "config.json").is_file():
        _run(
            [
                "smolora.training",
                "pretrain",
                "--data",
                str(data),
                "--out",
                str(base),
                "--preset",
                args.preset,
                "--steps",
                str(args.pretrain_steps),
                "--seed",
                str(args.seed),
                "--dtype",
                args.dtype,
            ]
        )
    if len(list_versions(registry)) < 6 or args.force_train:
        _run(
            [
                "smolora.training",
                "train",
                "--method",
                "smolora",
                "--data",
                str(data),
                "--base",
                str(base),
                "--out",
                str(run_dir),
                "--registry",
                str(registry),
                "--seed",
                str(args.seed),
                "--steps-per-task",
                str(args.steps_per_task),
                "--test-limit",
                str(args.test_per_task),
                "--dtype",
                args.dtype,
                "--no-unseen",
                "--no-robustness",
            ]
        )
    versions = list_versions(registry)
    log.info(
        "registry %s holds %d versions (latest %s)",
        registry,
        len(versions),
        versions[-1].name if versions else None,
    )
    if args.no_serve:
        return 0
    _run(
        [
            "smolora.server",
            "serve",
            "--model",
            str(base),
            "--registry",
            str(registry),
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--served-model-name",
            f"smolora-{args.preset}",
            "--dtype",
            args.dtype,
        ]
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart", help="train the embedded default model if absent, then serve it"
    )
    p.add_argument(
        "--workdir", default=".cache/smolora", help="where data, models, runs and the registry live"
    )
    p.add_argument("--preset", default="small", help="embedded model size: tiny, small or wide")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-task", type=int, default=1000, help="training examples per task")
    p.add_argument("--test-per-task", type=int, default=50, help="test examples per task")
    p.add_argument("--pretrain-steps", type=int, default=800, help="base alignment steps")
    p.add_argument(
        "--steps-per-task", type=int, default=120, help="SMoLoRA training steps per task"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="compute dtype of training and serving; auto: bfloat16 only where the CPU/GPU runs it "
        "natively (AVX512_BF16/AMX, CUDA), float32 elsewhere",
    )
    p.add_argument(
        "--force-train",
        action="store_true",
        help="run the trainer even if the registry is complete",
    )
    p.add_argument("--no-serve", action="store_true", help="stop after training")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=run)
