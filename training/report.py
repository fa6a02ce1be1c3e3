"""Results tables (Markdown + JSON) and plots from the run folders of several methods.

Reads `<runs>/<method>/results.json` (written by the trainer) and writes, in the layout of
the paper's table: the final score per upstream task with AP, MAP, BWT and MIF per method;
the unseen tasks (zero-shot, few-shot) and instruction robustness (held-out paraphrases);
a heatmap of the accuracy matrix a_{t,i} per method; and AP over stages for all methods.
Tables use the paper's scale (captions CIDEr-D x 100; `AP`, `MAP`, `BWT`) with `AP_balanced`
beside it; the plots use the balanced scale (every task 0-100). `write_seeded_report` does
the same over several seeds (mean +- std per cell), with training / evaluation examples/s
and the section that checks the paper's claims (`claims.py`). It computes no metrics of its
own beyond AP_t per stage (see `metrics.py`, `seeds.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smolora.training.claims import CLAIMS, check_claims
from smolora.training.data.tasks import TASKS
from smolora.training.seeds import aggregate, run_cells

logger = logging.getLogger(__name__)

#: Row order and display names, as in the paper's table.
METHOD_ORDER = (
    "zeroshot",
    "multitask",
    "dirlora",
    "seqlora",
    "moelora",
    "ewc",
    "replay",
    "dora",
    "smolora",
    "smolora_learned",
)
DISPLAY = {
    "zeroshot": "Zero-shot",
    "multitask": "Multitask",
    "dirlora": "DirLoRA",
    "seqlora": "SeqLoRA",
    "moelora": "MoELoRA",
    "ewc": "EWC",
    "replay": "Replay",
    "dora": "DoRA",
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


def _task_name(t: str) -> str:
    return TASKS[t].analogue if t in TASKS else t


def _unseen_name(k: str) -> str:
    if k in TASKS:
        return TASKS[k].analogue
    return k.replace("places_", "Places365 ").replace("shot", "-shot")


SCALE_NOTE = (
    "Scores on the paper's scale: accuracy %, captions CIDEr-D x 100; AP / MAP / BWT are the "
    "paper's (mean of these), AP_bal the same mean with captions CIDEr-D x 10 (every task "
    "0-100). The plots use the balanced scale."
)


def markdown_table(results: dict[str, dict[str, Any]], title: str = "mini-CVIT") -> str:
    """The upstream and unseen tables of one run per method as Markdown."""
    if not results:
        return f"# {title}\n\n(no results)\n"
    any_res = next(iter(results.values()))
    tasks = any_res["tasks"]
    cells = {m: run_cells(r) for m, r in results.items()}
    lines = [f"# {title} ({any_res.get('setting', '?')}-type instructions)", ""]
    lines += ["Final score per upstream task, AP / AP_bal / MAP / BWT / MIF. " + SCALE_NOTE, ""]
    heads = [_task_name(t) for t in tasks] + ["AP", "AP_bal", "MAP", "BWT", "MIF"]
    lines.append("| Method | " + " | ".join(heads) + " |")
    lines.append("|---" * (len(heads) + 1) + "|")
    for m, c in cells.items():
        keys = [f"task_paper.{t}" for t in tasks] + ["AP", "AP_balanced", "MAP", "BWT", "MIF"]
        lines.append(f"| {DISPLAY.get(m, m)} | " + " | ".join(_fmt(c.get(k)) for k in keys) + " |")
    unseen_keys: list[str] = []
    for r in results.values():
        unseen_keys += [k for k in r.get("unseen", {}) if k not in unseen_keys]
    if unseen_keys:
        lines += [
            "",
            "Unseen tasks (zero-shot; few-shot fine-tuned from the final model) and "
            "instruction robustness (AP over held-out paraphrases).",
            "",
        ]
        heads = [_unseen_name(k) for k in unseen_keys]
        lines.append("| Method | " + " | ".join(heads) + " | AP (held-out instr.) |")
        lines.append("|---" * (len(heads) + 2) + "|")
        for m, c in cells.items():
            vals = [_fmt(c.get(f"unseen_paper.{k}")) for k in unseen_keys]
            held = _fmt(c.get("AP_heldout"))
            lines.append(f"| {DISPLAY.get(m, m)} | " + " | ".join(vals) + f" | {held} |")
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
    """Per method: AP, MAP, BWT (paper scale) and their *_balanced, MIF, unseen scores,
    robustness, the matrix and throughput."""
    out = {}
    for m, r in results.items():
        c = run_cells(r)
        out[m] = {
            **{k: c.get(k) for k in ("AP", "MAP", "BWT", "AP_balanced", "MAP_balanced")},
            "BWT_balanced": c.get("BWT_balanced"),
            "MIF": r.get("MIF"),
            "unseen": {k: v["score"] for k, v in r.get("unseen", {}).items()},
            "robustness": {
                "AP_heldout": c.get("AP_heldout"),
                "AP_heldout_balanced": c.get("AP_heldout_balanced"),
                "AP_seen": c.get("AP"),
            },
            "matrix": r["matrix"],
            "format_matrix": r.get("format_matrix"),
            "runtime_s": r.get("runtime_s"),
            "train_examples_per_s": c.get("train_examples_per_s"),
            "eval_examples_per_s": c.get("eval_examples_per_s"),
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


# --------------------------------------------------------------------------------------
# Several seeds
# --------------------------------------------------------------------------------------
def _pm(cell: dict[str, Any] | None, digits: int = 1) -> str:
    if cell is None:
        return "–"
    if cell["n"] < 2:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


LEARNED_NOTE = (
    "SMoLoRA (learned) departs from the contract's training rule: each task trains only the "
    "experts it owns (assigned to no earlier task), with its VU routes teacher-forced, the "
    "fusion vectors train in task 1 only, and the gates are refit after each task on a "
    "memory of every task's routes. Nothing an earlier task routes through changes later, "
    "so its BWT of 0 is by construction, not a finding. SMoLoRA (frozen random) keeps the "
    "reference's rule (gates frozen after task 1, every expert and the fusion vectors "
    "training in every task) and is the one comparable with the paper on equal terms."
)


def seeded_markdown(
    aggregated: dict[str, dict[str, Any]],
    claims: dict[str, dict[str, str]],
    detail: dict[str, dict[str, Any]],
    title: str = "mini-CVIT",
    setting: str = "?",
    meta: dict[str, Any] | None = None,
) -> str:
    """Mean ± std tables, throughput, and the claims section, as Markdown."""
    if not aggregated:
        return f"# {title}\n\n(no results)\n"
    meta = meta or {}
    seeds = sorted({s for a in aggregated.values() for s in a["seeds"]})
    tasks = next(iter(aggregated.values()))["tasks"]
    lines = [f"# {title} ({setting}-type instructions), seeds {', '.join(map(str, seeds))}", ""]
    lines += [
        "Mean ± sample std over seeds (a cell with one seed shows the value). " + SCALE_NOTE,
        "",
    ]
    heads = [_task_name(t) for t in tasks] + ["AP", "AP_bal", "MAP", "BWT", "MIF"]
    lines.append("| Method | " + " | ".join(heads) + " |")
    lines.append("|---" * (len(heads) + 1) + "|")
    for m, a in aggregated.items():
        keys = [f"task_paper.{t}" for t in tasks] + ["AP", "AP_balanced", "MAP", "BWT", "MIF"]
        row = " | ".join(_pm(a["cells"].get(k)) for k in keys)
        lines.append(f"| {DISPLAY.get(m, m)} | {row} |")
    unseen = []
    for a in aggregated.values():
        unseen += [
            k.split(".", 1)[1]
            for k in a["cells"]
            if k.startswith("unseen_paper.") and k.split(".", 1)[1] not in unseen
        ]
    if unseen:
        lines += ["", "Unseen tasks and held-out instructions (paper's scale).", ""]
        heads = [_unseen_name(k) for k in unseen] + ["unseen mean", "AP (held-out instr.)"]
        lines.append("| Method | " + " | ".join(heads) + " |")
        lines.append("|---" * (len(heads) + 1) + "|")
        for m, a in aggregated.items():
            keys = [f"unseen_paper.{k}" for k in unseen] + ["unseen_mean", "AP_heldout"]
            lines.append(
                f"| {DISPLAY.get(m, m)} | "
                + " | ".join(_pm(a["cells"].get(k)) for k in keys)
                + " |"
            )
    facts = meta.get("base_facts")
    if facts:
        lines += [
            "",
            "## The base",
            "",
            "What the frozen base states correctly about held-out pictures (teacher-forced "
            "descriptions, `training/base_probe.py`; % of facts, n).",
            "",
            "| " + " | ".join(facts) + " |",
            "|---" * len(facts) + "|",
            "| " + " | ".join(f"{v['accuracy']:.1f} ({v['n']})" for v in facts.values()) + " |",
        ]
        if meta.get("base_heldout_loss") is not None:
            lines += ["", f"Held-out description loss {meta['base_heldout_loss']:.4f}."]
    lines += ["", "## Compute", ""]
    if "compute_s" in meta:
        lines.append(
            f"Total compute {meta['compute_s'] / 3600:.2f} h (base alignment "
            f"{meta.get('base_alignment_s') or 0:.0f} s + every (method, seed) unit's wall "
            f"time, whenever it ran); this invocation {meta.get('runtime_s', 0):.0f} s on "
            f"{meta.get('device', 'cpu')}. Examples/s: training examples per second of "
            "optimizer stages; evaluation: generated answers per second."
        )
        lines.append("")
    lines.append("| Method | train examples/s | eval examples/s | trainer s per seed |")
    lines.append("|---|---|---|---|")
    for m, a in aggregated.items():
        c = a["cells"]
        lines.append(
            f"| {DISPLAY.get(m, m)} | {_pm(c.get('train_examples_per_s'), 2)} | "
            f"{_pm(c.get('eval_examples_per_s'), 2)} | {_pm(c.get('runtime_s'), 0)} |"
        )
    lines += ["", claims_markdown(aggregated, claims, detail)]
    return "\n".join(lines)


def claims_markdown(
    aggregated: dict[str, dict[str, Any]],
    claims: dict[str, dict[str, str]],
    detail: dict[str, dict[str, Any]],
) -> str:
    """The section that checks the paper's claims one by one (see `claims.py`)."""
    lines = ["## The paper's claims, one by one", ""]
    lines.append(
        "Each claim compares a SMoLoRA variant with every baseline the paper compares it with: "
        "holds if the difference of means exceeds 2 standard errors of the difference "
        "(sample std over seeds), does not hold if it is below minus that, within noise "
        "otherwise; a claim holds only if it holds against every baseline that was run."
    )
    lines += ["", LEARNED_NOTE, ""]
    if not claims:
        lines.append("(no SMoLoRA run)")
        return "\n".join(lines) + "\n"
    variants = list(claims)
    lines.append("| claim | " + " | ".join(DISPLAY.get(v, v) for v in variants) + " |")
    lines.append("|---" * (len(variants) + 1) + "|")
    for claim, (_, _, text) in CLAIMS.items():
        lines.append(
            f"| {claim}: {text} | " + " | ".join(claims[v].get(claim, "–") for v in variants) + " |"
        )
    for v in variants:
        lines += ["", f"### {DISPLAY.get(v, v)}", ""]
        for claim, d in detail[v].items():
            comps = "; ".join(
                f"{DISPLAY.get(r['baseline'], r['baseline'])} {_pm(r['baseline_cell'])} "
                f"(diff {r['diff']:+.1f}"
                + (f", noise {r['noise']:.1f}" if r["noise"] is not None else "")
                + f": {r['verdict']})"
                for r in d["comparisons"]
            )
            lines.append(
                f"- **{claim}** ({d['cell']} {_pm(d['smolora'])}): {d['verdict']}. "
                + (comps or "no baseline run.")
            )
        c = aggregated[v]["cells"]
        if "routing.vu_share" in c:
            lines.append(
                "- routing: two tasks share their majority VU expert in "
                f"{100 * c['routing.vu_share']['mean']:.0f}% of layers, their IF expert in "
                f"{100 * c['routing.if_share']['mean']:.0f}%, both in "
                f"{100 * c['routing.both_share']['mean']:.0f}% (mean over task pairs and "
                "seeds). A shared expert keeps training on every task routed to it, so a "
                "high share predicts forgetting; tasks with one instruction template "
                "(TextVQA, GQA, VQAv2 in single-type) share their IF expert by design."
            )
    lines.append("")
    return "\n".join(lines)


def write_seeded_report(
    per_seed: dict[int, dict[str, dict[str, Any]]],
    out_dir: str | Path,
    prefix: str = "mini_cvit",
    setting: str = "?",
    meta: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[Path]]:
    """Aggregate `seed -> method -> results`, check the claims, write
    `<prefix>.md`, `<prefix>_table.json` and the plots (mean matrices, balanced scale).

    Returns:
        ({"aggregated", "claims", "claims_detail"}, written paths).
    """
    aggregated = aggregate(per_seed)
    order = [m for m in METHOD_ORDER if m in aggregated] + sorted(
        set(aggregated) - set(METHOD_ORDER)
    )
    aggregated = {m: aggregated[m] for m in order}
    claims, detail = check_claims(aggregated)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{prefix}.md"
    md.write_text(seeded_markdown(aggregated, claims, detail, setting=setting, meta=meta))
    js = out / f"{prefix}_table.json"
    summary = {"aggregated": aggregated, "claims": claims, "claims_detail": detail}
    js.write_text(json.dumps(summary, indent=1))
    paths = [md, js]
    if aggregated:
        paths += plot_matrices(aggregated, out, prefix)
        paths.append(plot_ap_over_stages(aggregated, out, prefix))
    return summary, paths
