"""Command line of the training package: `python -m smolora.training <command> ...`.

Commands:
  build-data  generate mini-CVIT into a folder
  pretrain    align a tiny LLaVA base on generic descriptions (the frozen base)
  train       train one method over the task sequence, publishing after every task
              (under `torchrun --nproc-per-node N`: data parallel, rank 0 publishes)
  evaluate    evaluate a published checkpoint (or the bare base) on tasks
  probe-base  teacher-forced accuracy of an aligned base per visual fact (held-out descriptions)
  report      collect method results into a table (Markdown + JSON) and plots
  import-reference  publish a checkpoint of the paper's reference code (import_reference.py)
  publish     verify a checkpoint folder and publish it into a registry folder (the
              server's watcher then picks it up)

This module parses arguments and prints; the work is in the library modules.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from smolora.adapters.precision import DTYPE_CHOICES
from smolora.training import import_reference
from smolora.training.config import METHOD_NAMES, AdapterSizes, EvalConfig, OptimConfig, RunConfig
from smolora.training.data.tasks import UPSTREAM_ORDER


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-data", help="generate mini-CVIT")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-per-task", type=int, default=2000)
    p.add_argument("--test-per-task", type=int, default=100)
    p.add_argument("--pretrain-size", type=int, default=24000)


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="align a base model on generic descriptions")
    p.add_argument("--data", required=True, type=Path, help="built mini-CVIT folder")
    p.add_argument("--out", required=True, type=Path, help="base model folder to write")
    p.add_argument("--preset", default="small")
    p.add_argument(
        "--init", type=Path, default=None, help="start from this LLaVA folder instead of a preset"
    )
    p.add_argument("--train-modules", choices=("all", "language", "projector"), default="all")
    p.add_argument(
        "--tower-steps",
        type=int,
        default=0,
        help="pretrain the vision tower on the descriptions' facts first (vision_pretrain.py)",
    )
    p.add_argument(
        "--language-steps",
        type=int,
        default=0,
        help="pretrain the language model on text-only skill exercises first "
        "(language_pretrain.py)",
    )
    p.add_argument("--language-lr", type=float, default=5e-4)
    p.add_argument("--language-batch-size", type=int, default=32)
    p.add_argument(
        "--reading-share",
        type=float,
        default=0.0,
        help="share of each batch turned into text-skill exercises (data/reading.py)",
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="write a resumable state every N steps; a rerun into --out continues from it",
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=0,
        help="hold out the last N descriptions and record their loss at each checkpoint",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="bfloat16 autocast (float32 weights) or float32; auto: bfloat16 only where native",
    )
    p.add_argument(
        "--bf16",
        dest="dtype",
        action="store_const",
        const="bfloat16",
        help="same as --dtype bfloat16",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, type=Path, help="built mini-CVIT (or CVIT-layout) folder"
    )
    p.add_argument("--base", required=True, type=Path, help="frozen base model folder")
    p.add_argument("--setting", choices=("single", "multi"), default="single")
    p.add_argument(
        "--tasks", type=_tasks, default=UPSTREAM_ORDER, help="comma-separated task order"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=32)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one method over the task sequence")
    p.add_argument("--method", choices=METHOD_NAMES, required=True)
    p.add_argument("--out", required=True, type=Path, help="run folder (results, matrix, registry)")
    p.add_argument(
        "--registry", type=Path, default=None, help="checkpoint registry (default OUT/registry)"
    )
    _add_run_args(p)
    p.add_argument(
        "--paper-defaults",
        action="store_true",
        help="the paper's hyper-parameters for real LLaVA models",
    )
    p.add_argument("--steps-per-task", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None)
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--dropout", type=float, default=None, help="adapter dropout (default 0.05)")
    p.add_argument(
        "--sharding",
        choices=("ddp", "fsdp2"),
        default="ddp",
        help="under torchrun: DDP (replicated weights) or FSDP2 fully_shard (sharded weights)",
    )
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--replay-size", type=int, default=100)
    p.add_argument("--replay-ratio", type=float, default=0.25)
    p.add_argument("--ewc-lambda", type=float, default=100.0, help="EWC penalty weight")
    p.add_argument("--ewc-decay", type=float, default=1.0, help="online EWC Fisher decay")
    p.add_argument("--few-shot", type=_tasks, default=("5", "10"))
    p.add_argument("--few-shot-steps", type=int, default=30)
    p.add_argument("--no-unseen", action="store_true")
    p.add_argument("--no-robustness", action="store_true")
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="bfloat16 autocast (float32 weights) or float32; auto: bfloat16 only where native",
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate a published SMoLoRA/LoRA/MoELoRA checkpoint or the base"
    )
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint folder or registry (uses latest)"
    )
    _add_run_args(p)
    p.add_argument("--split", default="test", choices=("test", "test_heldout"))


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="results table and plots from run folders")
    p.add_argument("--runs", required=True, type=Path, help="folder with one sub-folder per method")
    p.add_argument("--out", required=True, type=Path, help="output prefix folder")
    p.add_argument("--name", default="mini_cvit")


def _add_publish(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish a checkpoint folder into a registry folder")
    p.add_argument("checkpoint", type=Path, help="checkpoint folder (manifest + safetensors)")
    p.add_argument("--registry", type=Path, required=True, help="registry folder to publish into")


def publish(checkpoint: Path, registry: Path) -> int:
    """Verify `checkpoint` (format and hashes) and publish it into `registry`; print the entry.

    Returns:
        0 once published; 1 (with `error: ...` on stderr) when the folder fails verification
        or the registry cannot be written.
    """
    from smolora.adapters.checkpoint import load_checkpoint, publish_checkpoint

    try:
        ckpt = load_checkpoint(checkpoint)
        entry = publish_checkpoint(registry, ckpt.tensors, ckpt.manifest)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    published = {"published": entry.version, "name": entry.name, "path": str(entry.path)}
    print(json.dumps(published, indent=2))
    return 0


def _pick(value, default):
    return default if value is None else value


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The `RunConfig` of a `train` command line."""
    optim = OptimConfig.paper() if args.paper_defaults else OptimConfig()
    sizes = AdapterSizes.paper() if args.paper_defaults else AdapterSizes()
    if args.steps_per_task is not None or args.epochs is not None:
        optim.steps_per_task, optim.epochs = args.steps_per_task, args.epochs
    optim.batch_size = _pick(args.batch_size, optim.batch_size)
    optim.grad_accum = _pick(args.grad_accum, optim.grad_accum)
    optim.lr = _pick(args.lr, optim.lr)
    optim.__post_init__()
    sizes = AdapterSizes(
        rank=_pick(args.rank, sizes.rank),
        alpha=_pick(args.alpha, sizes.alpha),
        num_experts=_pick(args.num_experts, sizes.num_experts),
        lora_rank=_pick(args.lora_rank, sizes.lora_rank),
        lora_alpha=_pick(args.lora_alpha, sizes.lora_alpha),
        dropout=_pick(getattr(args, "dropout", None), sizes.dropout),
    )
    ev = EvalConfig(
        test_limit=args.test_limit,
        batch_size=args.eval_batch_size,
        unseen=not args.no_unseen,
        few_shot=tuple(int(k) for k in args.few_shot),
        few_shot_steps=args.few_shot_steps,
        robustness=not args.no_robustness,
    )
    return RunConfig(
        method=args.method,
        data_root=args.data,
        base_dir=args.base,
        out_dir=args.out,
        setting=args.setting,
        tasks=args.tasks,
        seed=args.seed,
        train_limit=args.train_limit,
        registry=args.registry,
        device=args.device,
        dtype=args.dtype,
        num_threads=args.threads,
        replay_size=args.replay_size,
        replay_ratio=args.replay_ratio,
        ewc_lambda=args.ewc_lambda,
        ewc_decay=args.ewc_decay,
        optim=optim,
        adapter=sizes,
        eval=ev,
    )


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe-base", help="which visual facts an aligned base states correctly")
    p.add_argument("--base", required=True, type=Path, help="aligned base folder")
    p.add_argument("--data", required=True, type=Path, help="the mini-CVIT folder it aligned on")
    p.add_argument(
        "--heldout",
        type=int,
        default=None,
        help="probe the last N descriptions (default: the base's own held-out set)",
    )
    p.add_argument("--threads", type=int, default=None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smolora.training", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_build,
        _add_pretrain,
        _add_train,
        _add_evaluate,
        _add_report,
        import_reference.add_parser,
        _add_publish,
        _add_probe,
    ):
        add(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    progress = not args.no_progress

    if args.command == "build-data":
        from smolora.training.data.mini_cvit import MiniCVITConfig, build_mini_cvit

        cfg = MiniCVITConfig(
            seed=args.seed,
            image_size=args.image_size,
            train_per_task=args.train_per_task,
            test_per_task=args.test_per_task,
            pretrain_size=args.pretrain_size,
        )
        print(build_mini_cvit(args.out, cfg, progress=progress))
    elif args.command == "pretrain":
        from smolora.training.pretrain import PretrainConfig, pretrain_base

        cfg = PretrainConfig(
            data_root=args.data,
            out_dir=args.out,
            preset=args.preset,
            init_dir=args.init,
            train_modules=args.train_modules,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            num_threads=args.threads,
            device=args.device,
            dtype=args.dtype,
            checkpoint_every=args.checkpoint_every,
            heldout=args.heldout,
            tower_steps=args.tower_steps,
            language_steps=args.language_steps,
            language_lr=args.language_lr,
            language_batch_size=args.language_batch_size,
            reading_share=args.reading_share,
        )
        print(pretrain_base(cfg, progress=progress))
    elif args.command == "train":
        import os

        from smolora.training.distributed import DataParallel, DistributedConfig
        from smolora.training.trainer import train_method

        run = run_config_from_args(args)
        dist_cfg = DistributedConfig.from_torchrun(os.environ, run.device, args.sharding)
        if dist_cfg is not None and run.optim.batch_size % dist_cfg.world_size:
            print(
                f"error: --batch-size {run.optim.batch_size} (the global batch) does not split "
                f"over {dist_cfg.world_size} processes; use a multiple of {dist_cfg.world_size}",
                file=sys.stderr,
            )
            return 2
        parallel = DataParallel(dist_cfg) if dist_cfg is not None else None
        if dist_cfg is not None:
            run.device = dist_cfg.device(run.device)
        try:
            res = train_method(run, progress=progress, parallel=parallel)
        finally:
            if parallel is not None:
                parallel.close()
        if parallel is not None and not parallel.is_main:
            return 0
        print(
            json.dumps(
                {k: res.get(k) for k in ("method", "AP", "MAP", "BWT", "MIF", "runtime_s")},
                indent=1,
            )
        )
    elif args.command == "evaluate":
        from smolora.training.checkpoint_eval import evaluate_checkpoint

        res = evaluate_checkpoint(
            args.checkpoint,
            args.base,
            args.data,
            args.setting,
            args.tasks,
            args.split,
            args.test_limit,
            args.eval_batch_size,
            args.device,
            progress,
        )
        print(json.dumps(res, indent=1))
    elif args.command == "probe-base":
        import torch

        from smolora.adapters.tiny_llava import load_llava
        from smolora.training.base_probe import probe_facts
        from smolora.training.data.collate import ExampleEncoder
        from smolora.training.data.mini_cvit import load_pretrain

        if args.threads:
            torch.set_num_threads(args.threads)
        alignment = args.base / "alignment.json"
        held = (
            json.loads(alignment.read_text())["config"].get("heldout", 0)
            if alignment.is_file()
            else 0
        )
        n = args.heldout if args.heldout is not None else held
        if n < 1:
            print(f"{args.base} has no held-out descriptions; pass --heldout N", file=sys.stderr)
            return 2
        model, processor = load_llava(args.base)
        data = load_pretrain(args.data)[-n:]
        result = probe_facts(model, ExampleEncoder(processor), data)
        print(json.dumps({"heldout": n, "trained_on": n > held, "facts": result}, indent=1))
    elif args.command == "import-reference":
        return import_reference.run(args)
    elif args.command == "publish":
        return publish(args.checkpoint, args.registry)
    elif args.command == "report":
        from smolora.training.report import write_report

        paths = write_report(args.runs, args.out, args.name)
        print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
