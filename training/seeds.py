"""Results of several seeds: one flat set of cells per run, and their mean and spread.

`run_cells` flattens one method's `results.json` (as the trainer writes it) into named
numbers: the final score per task on the balanced and the paper's scale, AP / MAP / BWT on
both scales (recomputed from the matrix with `metrics.continual_metrics`, so results written
before the paper's scale existed read the same), MIF, every unseen task, their means,
held-out-instruction AP, examples/s of training and evaluation, wall time, and for SMoLoRA
the share of layers whose majority expert two tasks have in common. `aggregate` turns
`seed -> method -> results` into `method -> cell -> {"mean", "std", "n"}` (sample standard
deviation; 0.0 with one seed). It computes no new metric and reads no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from smolora.training import metrics
from smolora.training.data.tasks import TASKS

Results = Mapping[str, Any]


def _is_caption(task: str, results: Results) -> bool:
    summary = results.get("final", {}).get(task)
    if summary and "metric" in summary:
        return summary["metric"] == "cider"
    spec = TASKS.get(task.split("_")[0])
    return spec is not None and spec.metric == "cider"


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _off_diagonal_mean(mat: Sequence[Sequence[float]]) -> float | None:
    vals = [x for i, row in enumerate(mat) for j, x in enumerate(row) if i != j]
    return _mean(vals)


def _throughput(results: Results) -> dict[str, float | None]:
    tp = results.get("throughput")
    if tp:
        return {k: tp.get(k) for k in ("train_examples_per_s", "eval_examples_per_s")}
    # Results written before throughput was recorded: training from the stage logs.
    batch = results.get("config", {}).get("optim", {})
    per_step = batch.get("batch_size", 0) * batch.get("grad_accum", 1)
    stages = results.get("stages", [])
    secs = sum(s.get("seconds", 0.0) for s in stages)
    ex = sum(s.get("steps", 0) * per_step for s in stages)
    return {"train_examples_per_s": ex / secs if secs > 0 and ex else None}


def run_cells(results: Results) -> dict[str, float | None]:
    """Named numbers of one run (see the module doc); missing ones are absent or None."""
    tasks = list(results["tasks"])
    captions = [_is_caption(t, results) for t in tasks]
    matrix = results["matrix"]
    cells: dict[str, float | None] = dict(metrics.continual_metrics(matrix, captions))
    final = matrix[-1]
    for t, x, cap in zip(tasks, final, captions):
        cells[f"task.{t}"] = x
        cells[f"task_paper.{t}"] = (
            None if x is None else metrics.paper_scale_score(x, "cider" if cap else "accuracy")
        )
    cells["MIF"] = results.get("MIF")
    unseen = results.get("unseen", {})
    paper, balanced = [], []
    for k, v in unseen.items():
        cap = _is_caption(k, results) if "metric" not in v else v["metric"] == "cider"
        cells[f"unseen.{k}"] = v["score"]
        cells[f"unseen_paper.{k}"] = metrics.paper_scale_score(
            v["score"], "cider" if cap else "accuracy"
        )
        balanced.append(v["score"])
        paper.append(cells[f"unseen_paper.{k}"])  # type: ignore[arg-type]
    cells["unseen_mean"] = _mean(paper)
    cells["unseen_mean_balanced"] = _mean(balanced)
    per = results.get("robustness", {}).get("per_task", {})
    if per:
        cells["AP_heldout"] = _mean(
            [
                metrics.paper_scale_score(r["score"], r.get("metric", "accuracy"))
                for r in per.values()
            ]
        )
        cells["AP_heldout_balanced"] = _mean([r["score"] for r in per.values()])
    cells.update(_throughput(results))
    cells["runtime_s"] = results.get("runtime_s")
    sharing = results.get("routing", {}).get("sharing")
    if sharing:
        for kind in ("vu", "if", "both"):
            cells[f"routing.{kind}_share"] = _off_diagonal_mean(sharing[kind])
    return cells


def mean_std(values: Sequence[float]) -> dict[str, float | int]:
    """`{"mean", "std", "n"}` of the values (sample std, ddof 1; 0.0 for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def mean_matrix(matrices: Sequence[Sequence[Sequence[float | None]]]) -> list[list[float | None]]:
    """Entry-wise mean of same-shaped accuracy matrices (None stays None)."""
    first = matrices[0]
    return [
        [
            None if first[r][c] is None else sum(float(m[r][c]) for m in matrices) / len(matrices)  # type: ignore[arg-type]
            for c in range(len(first[r]))
        ]
        for r in range(len(first))
    ]


def aggregate(per_seed: Mapping[int, Mapping[str, Results]]) -> dict[str, dict[str, Any]]:
    """`seed -> method -> results` to `method -> {"seeds", "cells", "matrix"}`.

    `cells` maps each cell name to `{"mean", "std", "n"}` over the seeds that have it;
    `matrix` is the entry-wise mean accuracy matrix (balanced scale).
    """
    methods: list[str] = []
    for by_method in per_seed.values():
        for m in by_method:
            if m not in methods:
                methods.append(m)
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        seeds = [s for s in sorted(per_seed) if m in per_seed[s]]
        cells_by_seed = {s: run_cells(per_seed[s][m]) for s in seeds}
        names: list[str] = []
        for c in cells_by_seed.values():
            names += [k for k in c if k not in names]
        cells = {}
        for name in names:
            vals = [float(c[name]) for c in cells_by_seed.values() if c.get(name) is not None]
            if vals:
                cells[name] = mean_std(vals)
        out[m] = {
            "seeds": seeds,
            "cells": cells,
            "per_seed": cells_by_seed,
            "matrix": mean_matrix([per_seed[s][m]["matrix"] for s in seeds]),
            "tasks": list(per_seed[seeds[0]][m]["tasks"]),
        }
    return out
