"""Results tables (Markdown + JSON) and plots from the run folders of several methods.

Reads `<runs>/<method>/results.json` (written by the trainer) and writes, in the layout of
the paper's table: the final score per upstream task with AP, MAP, BWT and MIF per method;
the unseen tasks (zero-shot, few-shot) and instruction robustness (held-out paraphrases);
a heatmap of the accuracy matrix a_{t,i} per method; and AP over stages for all methods.
It computes no metrics of its own beyond AP_t per stage (see `metrics.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smolora.training.data.tasks import TASKS

logger = logging.getLogger(__name__)

#: Row order and display names, as in the paper's table.
METHOD_ORDER = (
    "zeroshot",
    "multitask",
    "dirlora",
    "seqlora",
    "moelora",
    "replay",
    "smolora",
    "smolora_learned",
)
DISPLAY = {
    "zeroshot": "Zero-shot",
    "multitask": "Multitask",
    "dirlora": "DirLoRA",
    "seqlora": "SeqLoRA",
    "moelora": "MoELoRA",
    "replay": "Replay",
    "smolora": "SMoLoRA (frozen random)",
    "smolora_learned": "SMoLoRA (learned)",
}


def load_results(runs: str | Path) -> dict[str, dict[str, Any]]:
    """`method -> results` for every `<runs>/<method>/results.json`, in table order."""
    found = {}
    for path in sorted(Path(runs).glob("*/results.json")):
        res = json.loads(path.read_text())
        found[res.get("method", path.parent.name)] = res
    order = [m for m in METHOD_ORDER if m in found] + sorted(set(found) - set(METHOD_ORDER))
    return {m: found[m] for m in order}


def stage_ap(matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """AP_t: mean score over the tasks scored at each stage."""
    return [
        sum(x for x in row if x is not None) / max(1, sum(x is not None for x in row))
        for row in matrix
    ]


def _fmt(x: Any, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown_table(results: dict[str, dict[str, Any]], title: str = "mini-CVIT") -> str:
    """The upstream and unseen tables as Markdown."""
    if not results:
        return f"# {title}\n\n(no results)\n"
    any_res = next(iter(results.values()))
    tasks = any_res["tasks"]
    names = [TASKS[t].analogue if t in TASKS else t for t in tasks]
    lines = [f"# {title} ({any_res.get('setting', '?')}-type instructions)", ""]
    lines.append(
        "Final score per upstream task (accuracy %, captions CIDEr-D x 10), and AP / MAP / BWT / MIF."
    )
    lines.append("")
    lines.append("| Method | " + " | ".join(names) + " | AP | MAP | BWT | MIF |")
    lines.append("|---" * (len(names) + 5) + "|")
    for m, r in results.items():
        last = r["matrix"][-1]
        cells = [_fmt(x) for x in last] + [
            _fmt(r.get("AP")),
            _fmt(r.get("MAP")),
            _fmt(r.get("BWT")),
            _fmt(r.get("MIF")),
        ]
        lines.append(f"| {DISPLAY.get(m, m)} | " + " | ".join(cells) + " |")
    unseen_keys: list[str] = []
    for r in results.values():
        for k in r.get("unseen", {}):
            if k not in unseen_keys:
                unseen_keys.append(k)
    if unseen_keys:
        lines += [
            "",
            "Unseen tasks (zero-shot; few-shot fine-tuned from the final model) and instruction robustness.",
            "",
        ]
        heads = [
            TASKS[k].analogue
            if k in TASKS
            else k.replace("places_", "Places365 ").replace("shot", "-shot")
            for k in unseen_keys
        ]
        lines.append("| Method | " + " | ".join(heads) + " | AP (held-out instr.) |")
        lines.append("|---" * (len(heads) + 2) + "|")
        for m, r in results.items():
            u = r.get("unseen", {})
            cells = [_fmt(u[k]["score"]) if k in u else "–" for k in unseen_keys]
            held = r.get("robustness", {}).get("AP_heldout")
            lines.append(f"| {DISPLAY.get(m, m)} | " + " | ".join(cells) + f" | {_fmt(held)} |")
    lines.append("")
    return "\n".join(lines)


def plot_matrices(results: dict[str, dict[str, Any]], out_dir: Path, prefix: str) -> list[Path]:
    """One heatmap PNG of a_{t,i} per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    for m, r in results.items():
        mat = np.array(
            [[np.nan if x is None else x for x in row] for row in r["matrix"]], dtype=float
        )
        fig, ax = plt.subplots(figsize=(1.0 + 0.9 * mat.shape[1], 1.0 + 0.6 * mat.shape[0]))
        im = ax.imshow(mat, vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(
            range(mat.shape[1]),
            [TASKS[t].analogue if t in TASKS else t for t in r["tasks"]],
            rotation=30,
            ha="right",
        )
        ylabels = (
            ["joint"]
            if mat.shape[0] == 1 and m == "multitask"
            else [f"after {i + 1}" for i in range(mat.shape[0])]
        )
        ax.set_yticks(range(mat.shape[0]), ylabels)
        for (i, j), v in np.ndenumerate(mat):
            if not np.isnan(v):
                ax.text(
                    j,
                    i,
                    f"{v:.0f}",
                    ha="center",
                    va="center",
                    color="white" if v < 60 else "black",
                    fontsize=8,
                )
        ax.set_title(f"{DISPLAY.get(m, m)}: a(t, i)")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"{prefix}_matrix_{m}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_ap_over_stages(results: dict[str, dict[str, Any]], out_dir: Path, prefix: str) -> Path:
    """AP_t after every stage, one line per method (joint training: one point at the end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    n_tasks = max(len(r["tasks"]) for r in results.values())
    for m, r in results.items():
        ap = stage_ap(r["matrix"])
        xs = [n_tasks] if len(ap) == 1 else list(range(1, len(ap) + 1))
        ax.plot(xs, ap, marker="o", label=DISPLAY.get(m, m))
    ax.set_xlabel("tasks trained")
    ax.set_ylabel("AP over tasks seen (%)")
    ax.set_xticks(range(1, n_tasks + 1))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("mini-CVIT: AP after each stage")
    fig.tight_layout()
    path = out_dir / f"{prefix}_ap_over_stages.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_json(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per method: AP, MAP, BWT, MIF, unseen scores, robustness and the matrix."""
    out = {}
    for m, r in results.items():
        out[m] = {
            "AP": r.get("AP"),
            "MAP": r.get("MAP"),
            "BWT": r.get("BWT"),
            "MIF": r.get("MIF"),
            "unseen": {k: v["score"] for k, v in r.get("unseen", {}).items()},
            "robustness": {k: r.get("robustness", {}).get(k) for k in ("AP_heldout", "AP_seen")},
            "matrix": r["matrix"],
            "format_matrix": r.get("format_matrix"),
            "runtime_s": r.get("runtime_s"),
        }
    return out


def write_report(runs: str | Path, out_dir: str | Path, prefix: str = "mini_cvit") -> list[Path]:
    """Write `<prefix>.md`, `<prefix>_table.json` and the PNG plots; returns their paths."""
    results = load_results(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{prefix}.md"
    md.write_text(markdown_table(results))
    js = out / f"{prefix}_table.json"
    js.write_text(json.dumps(summary_json(results), indent=1))
    paths = [md, js]
    if results:
        paths += plot_matrices(results, out, prefix)
        paths.append(plot_ap_over_stages(results, out, prefix))
    return paths
