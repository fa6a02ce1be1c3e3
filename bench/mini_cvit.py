"""mini-CVIT benchmark: every continual-learning method, both instruction settings, N seeds.

Builds mini-CVIT, aligns (or reuses) the frozen base, then trains each unit
(method, setting, seed) in its own process (`python -m smolora.training train`, several in
parallel, one torch thread each so runs are deterministic and do not oversubscribe the
cores), and writes per setting

    bench/results/<name>.json           {"command", "seeds", "methods": {m: {AP, ..., "cells":
                                          {cell: {"mean", "std", "n"}}}}, "claims", ...}
    bench/results/<name>.md             mean +- std tables (paper's scale), compute time,
                                        examples/s per method, the paper's claims checked
    bench/results/<name>_*.png          mean accuracy matrices and AP over stages (balanced)

with <name> = `--name` for single-type and `<name>_multi` for multi-type instructions
(a `--name` that already ends in `_multi` is kept).

Usage (the full table: 10 methods x 2 settings x 3 seeds; the base: the `cvit` preset, its
vision tower pretrained on the descriptions' facts for 1500 steps, then 3000 alignment
steps of projector and language model on 100k descriptions, 500 held out):

    python bench/mini_cvit.py
    python bench/mini_cvit.py --device cuda --workers 4          # a GPU machine
    python bench/mini_cvit.py --preset tiny --tasks sqa,textvqa --steps-per-task 5 \\
        --seeds 2 --out /tmp/mc --cache /tmp/mc-cache                    # quick

Resumable: the data, the aligned base and every unit are cached under --cache; a unit whose
`results.json` exists is not run again (an interrupted unit resumes after its last
published task), so the full table can be accumulated over several invocations, and
`--report-only` rewrites the results from whatever units are done. Machine sessions do not
share a cache, so every finished unit's results (and the base's alignment record; with
`--archive-base` its weights too) are also copied to `--archive`
(`bench/results/mini_cvit_units/`, committed): a unit found there counts as done, and an
archived base is used instead of aligning again. The training seed varies
per unit; the data and the base come from `--data-seed` (shared by all seeds), so the
spread is that of training. `compute_s` is the total compute of the table: base alignment
plus every unit's wall time, whenever it ran; `runtime_s` is this invocation's wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from smolora.adapters.precision import resolve_dtype
from smolora.training.config import METHOD_NAMES
from smolora.training.data.mini_cvit import MiniCVITConfig, build_mini_cvit
from smolora.training.data.tasks import UPSTREAM_ORDER
from smolora.training.pretrain import PretrainConfig, pretrain_base
from smolora.training.report import write_seeded_report

warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
ROOT = Path(__file__).resolve().parent
#: Slowest first, so parallel workers finish together.
SCHEDULE = (
    "smolora_learned",
    "smolora",
    "moelora",
    "ewc",
    "replay",
    "dora",
    "multitask",
    "dirlora",
    "seqlora",
    "zeroshot",
)
#: Per-method numbers copied to the top level of each method's JSON entry (seed means).
TOP_KEYS = ("AP", "MAP", "BWT", "AP_balanced", "MAP_balanced", "BWT_balanced", "MIF")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cvit", help="embedded model preset of the base")
    p.add_argument("--settings", default="single,multi", help="instruction settings to run")
    p.add_argument(
        "--setting",
        choices=("single", "multi"),
        default=None,
        help="run only this setting (same as --settings SETTING)",
    )
    p.add_argument("--methods", default=",".join(METHOD_NAMES))
    p.add_argument("--tasks", default=",".join(UPSTREAM_ORDER))
    p.add_argument("--seeds", type=int, default=3, help="training seeds per (method, setting)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument(
        "--data-seed", type=int, default=0, help="seed of the data and the base alignment"
    )
    p.add_argument("--workers", type=int, default=2, help="units trained in parallel")
    p.add_argument("--device", default="cpu", help="torch device of training (cpu, cuda)")
    p.add_argument("--steps-per-task", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test-limit", type=int, default=100)
    p.add_argument("--few-shot-steps", type=int, default=30)
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--pretrain-batch-size", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=2e-3, help="peak lr of the base alignment")
    p.add_argument(
        "--image-size", type=int, default=64, help="rendered picture side (the processor resizes)"
    )
    p.add_argument(
        "--pretrain-size", type=int, default=100000, help="generic descriptions for base alignment"
    )
    p.add_argument(
        "--pretrain-threads",
        type=int,
        default=1,
        help="torch threads of the base alignment (2 is ~1.7x faster on an idle 2-core machine)",
    )
    p.add_argument(
        "--pretrain-heldout",
        type=int,
        default=500,
        help="descriptions held out of the alignment; their loss is recorded every checkpoint",
    )
    p.add_argument(
        "--pretrain-tower-steps",
        type=int,
        default=1500,
        help="vision-tower pretraining steps on the descriptions' facts before the alignment",
    )
    p.add_argument(
        "--pretrain-language-steps",
        type=int,
        default=0,
        help="language-model pretraining steps on text-only skill exercises before the alignment",
    )
    p.add_argument("--pretrain-language-lr", type=float, default=5e-4)
    p.add_argument(
        "--pretrain-reading-share",
        type=float,
        default=0.0,
        help="share of each alignment batch turned into text-skill exercises (data/reading.py)",
    )
    p.add_argument(
        "--pretrain-modules",
        choices=("all", "language"),
        default="language",
        help="what the alignment trains (language: projector and LLM, the tower stays)",
    )
    p.add_argument(
        "--pretrain-checkpoint-every",
        type=int,
        default=250,
        help="alignment steps between resumable states (an interrupted alignment continues)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="compute dtype (bfloat16: autocast, float32 weights); auto: bfloat16 where native",
    )
    p.add_argument(
        "--fp32",
        dest="dtype",
        action="store_const",
        const="float32",
        help="same as --dtype float32",
    )
    p.add_argument(
        "--base",
        type=Path,
        default=None,
        help="an aligned base folder to reuse instead of aligning one",
    )
    p.add_argument("--train-per-task", type=int, default=2000)
    p.add_argument(
        "--ewc-lambda", type=float, default=100.0, help="EWC penalty weight (its own unit key)"
    )
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument(
        "--archive",
        type=Path,
        default=ROOT / "results" / "mini_cvit_units",
        help="where finished units' results (and the base's alignment record) are copied, "
        "to be committed: a later session on another machine counts them as done",
    )
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--name", default="mini_cvit")
    p.add_argument(
        "--archive-base",
        action="store_true",
        help="also copy the aligned base's weights into the archive (not only its record)",
    )
    p.add_argument(
        "--report-only", action="store_true", help="train nothing; report the cached units"
    )
    args = p.parse_args(argv)
    if args.setting is not None:
        args.settings = args.setting
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not args.settings or set(args.settings) - {"single", "multi"}:
        p.error("--settings takes single and/or multi")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    return args


def training_key(args: argparse.Namespace) -> str:
    """A short hash of every knob that changes a unit's result besides method, setting, seed
    (the compute dtype as resolved on this machine: "auto" trains in bfloat16 where it is
    native and in float32 elsewhere, and those are different units)."""
    knobs = {
        k: getattr(args, k)
        for k in (
            "tasks",
            "steps_per_task",
            "batch_size",
            "lr",
            "test_limit",
            "few_shot_steps",
            "train_per_task",
        )
    }
    knobs["dtype"] = resolve_dtype(args.dtype, args.device)
    return hashlib.sha256(json.dumps(knobs, sort_keys=True).encode()).hexdigest()[:8]


def _data_suffix(args: argparse.Namespace) -> str:
    """What sets a build apart from the default one: image size, description count."""
    size = "" if args.image_size == 64 else f"-px{args.image_size}"
    return size + ("" if args.pretrain_size == 24000 else f"-n{args.pretrain_size}")


def data_path(args: argparse.Namespace) -> Path:
    """The cached mini-CVIT build (named by what changes its content)."""
    return args.cache / f"mini_cvit-seed{args.data_seed}{_data_suffix(args)}"


def base_path(args: argparse.Namespace) -> Path:
    """`--base`, else the cached aligned base (named by every knob of its alignment)."""
    if args.base is not None:
        return args.base
    precision = {"float32": "fp32", "bfloat16": "bf16"}[resolve_dtype(args.dtype, args.device)]
    return args.cache / (
        f"base-{args.preset}-seed{args.data_seed}-steps{args.pretrain_steps}-{precision}"
        + _data_suffix(args)
        + ("" if args.pretrain_batch_size == 32 else f"-bs{args.pretrain_batch_size}")
        + ("" if args.pretrain_lr == 2e-3 else f"-lr{args.pretrain_lr:g}")
        + (f"-heldout{args.pretrain_heldout}" if args.pretrain_heldout else "")
        + (f"-tower{args.pretrain_tower_steps}" if args.pretrain_tower_steps else "")
        + (
            f"-lm{args.pretrain_language_steps}-lr{args.pretrain_language_lr:g}"
            if args.pretrain_language_steps
            else ""
        )
        + ("" if args.pretrain_modules == "all" else f"-{args.pretrain_modules}")
        + (f"-reading{args.pretrain_reading_share:g}" if args.pretrain_reading_share else "")
    )


def unit_dir(args: argparse.Namespace, base: Path, setting: str, seed: int, method: str) -> Path:
    """The run folder of one (method, setting, seed) unit."""
    runs = args.cache / f"runs-{setting}-{base.name}-{training_key(args)}-seed{seed}"
    return runs / (f"ewc-lambda{args.ewc_lambda:g}" if method == "ewc" else method)


def archived_dir(args: argparse.Namespace, run: Path) -> Path:
    """A unit's folder in the committed archive (same relative name as in the cache)."""
    return args.archive / run.parent.name / run.name


def finished_dir(
    args: argparse.Namespace, base: Path, setting: str, seed: int, method: str
) -> Path | None:
    """The folder holding a finished unit's `results.json`: the cache, else the archive."""
    run = unit_dir(args, base, setting, seed, method)
    for folder in (run, archived_dir(args, run)):
        if (folder / "results.json").is_file():
            return folder
    return None


def archive_unit(args: argparse.Namespace, run: Path) -> None:
    """Copy a finished unit's results and wall time into the archive."""
    out = archived_dir(args, run)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "unit.json"):
        if (run / name).is_file():
            shutil.copyfile(run / name, out / name)


def pending_units(
    args: argparse.Namespace, base: Path, units: list[tuple[str, int, str]]
) -> list[tuple[str, int, str]]:
    """The (setting, seed, method) units not finished in the cache or the archive."""
    return [u for u in units if finished_dir(args, base, *u) is None]


def method_command(
    args: argparse.Namespace, method: str, setting: str, seed: int, data: Path, base: Path
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "smolora.training",
        "--no-progress",
        "-v",
        "train",
        "--method",
        method,
        "--data",
        str(data),
        "--base",
        str(base),
        "--out",
        str(unit_dir(args, base, setting, seed, method)),
        "--setting",
        setting,
        "--tasks",
        args.tasks,
        "--seed",
        str(seed),
        "--threads",
        "1",
        "--device",
        args.device,
        "--steps-per-task",
        str(args.steps_per_task),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--test-limit",
        str(args.test_limit),
        "--few-shot-steps",
        str(args.few_shot_steps),
        "--dtype",
        args.dtype,
        *(["--ewc-lambda", str(args.ewc_lambda)] if method == "ewc" else []),
    ]


def _alignment(args: argparse.Namespace, base: Path) -> dict | None:
    """The base's alignment provenance (config, final and held-out loss, the facts it states
    correctly, the tower pretraining, seconds), from the base or the archive."""
    for path in (base / "alignment.json", args.archive / base.name / "alignment.json"):
        if path.is_file():
            info = json.loads(path.read_text())
            keys = (
                "config",
                "final_loss",
                "heldout_loss",
                "heldout_curve",
                "heldout_facts",
                "tower",
                "seconds",
            )
            return {k: info.get(k) for k in keys}
    return None


def archive_base(args: argparse.Namespace, base: Path, weights: bool) -> None:
    """Copy the base's alignment record (and with `weights`, the whole base folder) into
    the archive, so units trained later elsewhere start from the same base."""
    out = args.archive / base.name
    if weights:
        shutil.copytree(base, out, dirs_exist_ok=True)
    else:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base / "alignment.json", out / "alignment.json")


def _unit_wall(run: Path) -> float:
    """Wall seconds a finished unit took (its unit.json, else the trainer's runtime)."""
    unit = run / "unit.json"
    if unit.is_file():
        return float(json.loads(unit.read_text())["wall_s"])
    res = run / "results.json"
    return float(json.loads(res.read_text()).get("runtime_s") or 0.0) if res.is_file() else 0.0


def method_entry(agg: dict[str, Any]) -> dict[str, Any]:
    """One method's JSON entry: today's keys (seed means) plus cells with mean and std."""
    cells = agg["cells"]

    def mean(key: str) -> float | None:
        return cells[key]["mean"] if key in cells else None

    entry: dict[str, Any] = {k: mean(k) for k in TOP_KEYS}
    entry["unseen"] = {
        k.split(".", 1)[1]: v["mean"] for k, v in cells.items() if k.startswith("unseen.")
    }
    entry["robustness"] = mean("AP_heldout")
    entry["robustness_balanced"] = mean("AP_heldout_balanced")
    entry["matrix"] = agg["matrix"]
    entry["train_examples_per_s"] = mean("train_examples_per_s")
    entry["eval_examples_per_s"] = mean("eval_examples_per_s")
    entry["seeds"] = agg["seeds"]
    entry["cells"] = {
        k: {"mean": v["mean"], "std": v["std"], "n": v["n"]} for k, v in cells.items()
    }
    entry["per_seed"] = {
        str(s): {k: c.get(k) for k in (*TOP_KEYS, "unseen_mean", "AP_heldout")}
        for s, c in agg["per_seed"].items()
    }
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHOD_NAMES)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHOD_NAMES)}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    data = data_path(args)
    if not args.report_only:
        data_cfg = MiniCVITConfig(
            seed=args.data_seed,
            train_per_task=args.train_per_task,
            pretrain_size=args.pretrain_size,
            image_size=args.image_size,
        )
        data = build_mini_cvit(data, data_cfg)
    base = base_path(args)
    archived = args.archive / base.name
    if (
        args.base is None
        and not (base / "alignment.json").is_file()
        and (archived / "model.safetensors").is_file()
    ):
        base = archived  # aligned in an earlier session, weights committed
    pretrain_s = 0.0
    if args.base is None and not (base / "alignment.json").is_file() and not args.report_only:
        t0 = time.perf_counter()
        # One thread by default: two are faster on an idle 2-core machine but several times
        # slower as soon as anything else runs (spinning OpenMP threads).
        pretrain_base(
            PretrainConfig(
                data_root=data,
                out_dir=base,
                preset=args.preset,
                steps=args.pretrain_steps,
                batch_size=args.pretrain_batch_size,
                lr=args.pretrain_lr,
                seed=args.data_seed,
                num_threads=args.pretrain_threads,
                device=args.device,
                dtype=args.dtype,
                checkpoint_every=args.pretrain_checkpoint_every,
                heldout=args.pretrain_heldout,
                tower_steps=args.pretrain_tower_steps,
                language_steps=args.pretrain_language_steps,
                language_lr=args.pretrain_language_lr,
                train_modules=args.pretrain_modules,
                reading_share=args.pretrain_reading_share,
            )
        )
        pretrain_s = time.perf_counter() - t0
    if (base / "alignment.json").is_file() and base.parent != args.archive:
        archive_base(args, base, weights=args.archive_base)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rank = {m: i for i, m in enumerate(SCHEDULE)}
    units = [
        (setting, seed, m)
        for seed in seeds
        for setting in args.settings
        for m in sorted(methods, key=lambda m: rank.get(m, len(rank)))
    ]
    pending = [] if args.report_only else pending_units(args, base, units)

    def run_one(unit: tuple[str, int, str]) -> tuple[tuple[str, int, str], float, int]:
        setting, seed, method = unit
        t0 = time.perf_counter()
        cmd = method_command(args, method, setting, seed, data, base)
        run = unit_dir(args, base, setting, seed, method)
        run.mkdir(parents=True, exist_ok=True)
        log = run.parent / f"{run.name}.log"
        with open(log, "a") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        wall = time.perf_counter() - t0
        previous = _unit_wall(run) if (run / "unit.json").is_file() else 0.0
        if rc == 0:  # a resumed unit adds to the time its interrupted part took
            (run / "unit.json").write_text(
                json.dumps({"wall_s": previous + wall, "device": args.device, "command": cmd})
            )
            archive_unit(args, run)
        print(
            f"[{time.perf_counter() - start:7.0f}s] {setting} seed {seed} {method}: rc={rc} "
            f"({wall:.0f}s), log {log}",
            flush=True,
        )
        return unit, wall, rc

    print(f"{len(units)} units, {len(units) - len(pending)} cached, {len(pending)} to run")
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        outcomes = list(pool.map(run_one, pending))
    command = " ".join(
        shlex.quote(a)
        for a in ["python", "bench/mini_cvit.py", *(argv if argv is not None else sys.argv[1:])]
    )
    alignment = _alignment(args, base)
    align_s = float((alignment or {}).get("seconds") or 0.0)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = [f"{s}/seed{seed}/{m}" for (s, seed, m), _, rc in outcomes if rc != 0]
    for setting in args.settings:
        multi = setting == "multi" and not args.name.endswith("_multi")
        name = f"{args.name}_multi" if multi else args.name
        per_seed: dict[int, dict[str, Any]] = {}
        unit_wall = 0.0
        method_wall: dict[str, float] = {}
        for seed in seeds:
            for m in methods:
                run = finished_dir(args, base, setting, seed, m)
                if run is not None and run == unit_dir(args, base, setting, seed, m):
                    archive_unit(args, run)  # e.g. finished before the archive existed
                if run is not None:
                    per_seed.setdefault(seed, {})[m] = json.loads(
                        (run / "results.json").read_text()
                    )
                    wall = _unit_wall(run)
                    unit_wall += wall
                    method_wall[m] = method_wall.get(m, 0.0) + wall
        meta = {
            "compute_s": align_s + unit_wall,
            "base_alignment_s": align_s,
            "base_facts": (alignment or {}).get("heldout_facts"),
            "base_heldout_loss": (alignment or {}).get("heldout_loss"),
            "runtime_s": time.perf_counter() - start,
            "device": args.device,
        }
        summary, paths = write_seeded_report(per_seed, args.out, name, setting, meta)
        payload = {
            "command": command,
            "runtime_s": meta["runtime_s"],
            "compute_s": meta["compute_s"],
            "pretrain_s": pretrain_s,
            "base_cached": pretrain_s == 0.0,
            "method_wall_s": {m: round(s, 1) for m, s in method_wall.items()},
            "failed": [f for f in failed if f.startswith(setting + "/")],
            "setting": setting,
            "preset": args.preset,
            "device": args.device,
            "base": str(base),
            "base_alignment": alignment,
            "cpu_count": os.cpu_count(),
            "seeds": sorted(per_seed),
            "seeds_requested": seeds,
            "scale": "AP/MAP/BWT: the paper's (captions CIDEr-D x 100); *_balanced: CIDEr-D x 10; "
            "plots: balanced",
            "methods": {m: method_entry(a) for m, a in summary["aggregated"].items()},
            "claims": summary["claims"],
            "claims_detail": summary["claims_detail"],
        }
        out_json = args.out / f"{name}.json"
        out_json.write_text(json.dumps(payload, indent=1))
        print(out_json)
        for p in paths:
            print(p)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
