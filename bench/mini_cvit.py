"""mini-CVIT benchmark: every continual-learning method over the six upstream tasks.

Builds mini-CVIT, aligns (or reuses) the frozen base, trains each method in its own process
(`python -m smolora.training train`, several in parallel, one torch thread each so runs are
deterministic and do not oversubscribe the cores), then writes

    bench/results/mini_cvit.json      {"command", "runtime_s", "setting", "methods": {...}}
    bench/results/mini_cvit.md        the table, in the paper's layout
    bench/results/mini_cvit_*.png     accuracy-matrix heatmaps and AP over stages

Usage (the full table, single-type instructions, small preset):

    python bench/mini_cvit.py
    python bench/mini_cvit.py --preset tiny --tasks sqa,textvqa --steps-per-task 5   # quick

Data, the aligned base and per-method run folders are cached under --cache; a re-run
resumes from the last published task of each method. `runtime_s` is the wall time of this
command; `pretrain_s` says how much of it was base alignment (0 when the base was cached).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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
from smolora.training.report import load_results, write_report

warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
ROOT = Path(__file__).resolve().parent
#: Slowest first, so parallel workers finish together.
SCHEDULE = (
    "smolora_learned",
    "smolora",
    "moelora",
    "replay",
    "multitask",
    "dirlora",
    "seqlora",
    "zeroshot",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--setting", choices=("single", "multi"), default="single")
    p.add_argument("--methods", default=",".join(METHOD_NAMES))
    p.add_argument("--tasks", default=",".join(UPSTREAM_ORDER))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps-per-task", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test-limit", type=int, default=100)
    p.add_argument("--few-shot-steps", type=int, default=30)
    p.add_argument("--pretrain-steps", type=int, default=3500)
    p.add_argument(
        "--pretrain-size", type=int, default=24000, help="generic descriptions for base alignment"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="training compute dtype (bfloat16: autocast, float32 weights); auto: bfloat16 where native",
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
    p.add_argument("--cache", type=Path, default=ROOT / ".cache")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--name", default="mini_cvit")
    return p.parse_args(argv)


def method_command(
    args: argparse.Namespace, method: str, data: Path, base: Path, runs: Path
) -> list[str]:
    cmd = [
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
        str(runs / method),
        "--setting",
        args.setting,
        "--tasks",
        args.tasks,
        "--seed",
        str(args.seed),
        "--threads",
        "1",
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
    ]
    return cmd


def _alignment(base: Path) -> dict | None:
    """The base's alignment provenance (config, final loss, seconds), if it has one."""
    path = base / "alignment.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return {k: info.get(k) for k in ("config", "final_loss", "seconds")}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHOD_NAMES)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {list(METHOD_NAMES)}")
    data_cfg = MiniCVITConfig(
        seed=args.seed, train_per_task=args.train_per_task, pretrain_size=args.pretrain_size
    )
    data = build_mini_cvit(args.cache / f"mini_cvit-seed{args.seed}", data_cfg)
    precision = {"float32": "fp32", "bfloat16": "bf16"}[resolve_dtype(args.dtype)]
    base = (
        args.base
        or args.cache / f"base-{args.preset}-seed{args.seed}-steps{args.pretrain_steps}-{precision}"
    )
    pretrain_s = 0.0
    if args.base is None and not (base / "alignment.json").is_file():
        t0 = time.perf_counter()
        # One thread: two are ~1.5x faster on an idle 2-core machine but several times
        # slower as soon as anything else runs (spinning OpenMP threads).
        pretrain_base(
            PretrainConfig(
                data_root=data,
                out_dir=base,
                preset=args.preset,
                steps=args.pretrain_steps,
                seed=args.seed,
                num_threads=1,
                dtype=args.dtype,
            )
        )
        pretrain_s = time.perf_counter() - t0
    runs = args.cache / f"runs-{args.name}-{args.setting}-{base.name}-seed{args.seed}"
    runs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def run_one(method: str) -> tuple[str, float, int]:
        t0 = time.perf_counter()
        cmd = method_command(args, method, data, base, runs)
        log = runs / f"{method}.log"
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        print(
            f"[{time.perf_counter() - start:7.0f}s] {method}: rc={rc} ({time.perf_counter() - t0:.0f}s), log {log}",
            flush=True,
        )
        return method, time.perf_counter() - t0, rc

    ordered = [m for m in SCHEDULE if m in methods] + [m for m in methods if m not in SCHEDULE]
    out_json = args.out / f"{args.name}.json"
    command = " ".join(
        shlex.quote(a)
        for a in ["python", "bench/mini_cvit.py", *(argv if argv is not None else sys.argv[1:])]
    )
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        outcomes = list(pool.map(run_one, ordered))
    timing: dict[str, Any] = {
        "command": command,
        "runtime_s": time.perf_counter() - start,
        "pretrain_s": pretrain_s,
        "base_cached": pretrain_s == 0.0,
        "method_wall_s": {m: round(s, 1) for m, s, _ in outcomes},
        "failed": [m for m, _, rc in outcomes if rc != 0],
    }
    results = load_results(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    report_paths = write_report(runs, args.out, args.name)
    payload = {
        **timing,
        "setting": args.setting,
        "preset": args.preset,
        "base": str(base),
        "base_alignment": _alignment(base),
        "cpu_count": os.cpu_count(),
        "methods": {
            m: {
                "AP": r.get("AP"),
                "MAP": r.get("MAP"),
                "BWT": r.get("BWT"),
                "MIF": r.get("MIF"),
                "unseen": {k: v["score"] for k, v in r.get("unseen", {}).items()},
                "robustness": r.get("robustness", {}).get("AP_heldout"),
                "matrix": r["matrix"],
            }
            for m, r in results.items()
            if m in methods
        },
    }
    out_json.write_text(json.dumps(payload, indent=1))
    print(out_json)
    for p in report_paths:
        print(p)
    return 1 if timing["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
