"""The paper's claims about SMoLoRA, checked one by one against the seed spread.

Each claim compares one cell of a SMoLoRA variant with the same cell of every baseline the
paper compares it with (higher is better for all four cells):

| claim | cell (see `seeds.run_cells`) | baselines |
|---|---|---|
| `bwt`: forgets far less | `BWT` (paper scale) | SeqLoRA, MoELoRA, EWC, DoRA |
| `mif`: keeps instruction following | `MIF` | SeqLoRA, MoELoRA, EWC, Replay, DoRA |
| `unseen`: generalises to unseen tasks | `unseen_mean` (paper scale) | same |
| `robustness`: robust to unseen instruction paraphrases | `AP_heldout` (paper scale) | same |

One comparison: `diff = mean(SMoLoRA) - mean(baseline)` against
`noise = z * sqrt(s_a^2 / n_a + s_b^2 / n_b)` (z = 2: about a 95% interval of the difference
of two means, s the sample std over seeds): "holds" if diff > noise, "does not hold" if
diff < -noise, else "within noise". A claim holds if it holds against every baseline that
was run, does not hold if it fails against any, and is within noise otherwise. With fewer
than two seeds on either side there is no spread: the verdict is the plain comparison,
suffixed " (1 seed: no spread)". No baseline run: "not measured". Pure functions over
aggregated cells; nothing is read or trained here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

HOLDS, FAILS, NOISE = "holds", "does not hold", "within noise"
NOT_MEASURED = "not measured"
NO_SPREAD = " (1 seed: no spread)"
SEQUENTIAL = ("seqlora", "moelora", "ewc", "dora")
#: claim -> (cell, baselines, what the claim says).
CLAIMS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "bwt": ("BWT", SEQUENTIAL, "forgets less (higher BWT)"),
    "mif": ("MIF", (*SEQUENTIAL, "replay"), "keeps instruction following (higher MIF)"),
    "unseen": (
        "unseen_mean",
        (*SEQUENTIAL, "replay"),
        "generalises to unseen tasks (higher mean unseen score)",
    ),
    "robustness": (
        "AP_heldout",
        (*SEQUENTIAL, "replay"),
        "robust to held-out instruction paraphrases (higher held-out AP)",
    ),
}
VARIANTS = ("smolora", "smolora_learned")
Cell = Mapping[str, float]


def compare(a: Cell, b: Cell, z: float = 2.0) -> dict[str, Any]:
    """One comparison of cell `a` (SMoLoRA) against `b` (a baseline), higher is better.

    Args:
        a, b: `{"mean", "std", "n"}`.
        z: how many standard errors of the difference count as beyond noise.

    Returns:
        {"verdict", "diff", "noise"}.
    """
    diff = float(a["mean"]) - float(b["mean"])
    if min(int(a["n"]), int(b["n"])) < 2:
        verdict = HOLDS if diff > 0 else FAILS if diff < 0 else NOISE
        return {"verdict": verdict + NO_SPREAD, "diff": diff, "noise": None}
    noise = z * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    verdict = HOLDS if diff > noise else FAILS if diff < -noise else NOISE
    return {"verdict": verdict, "diff": diff, "noise": noise}


def combine(verdicts: list[str]) -> str:
    """A claim's verdict from its comparisons (see the module doc)."""
    if not verdicts:
        return NOT_MEASURED
    spread = "" if not any(v.endswith(NO_SPREAD) for v in verdicts) else NO_SPREAD
    base = [v.removesuffix(NO_SPREAD) for v in verdicts]
    if FAILS in base:
        return FAILS + spread
    if all(v == HOLDS for v in base):
        return HOLDS + spread
    return NOISE + spread


def check_claims(
    aggregated: Mapping[str, Mapping[str, Any]], z: float = 2.0
) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, Any]]]:
    """Every claim for every SMoLoRA variant present.

    Args:
        aggregated: `seeds.aggregate` output (method -> {"cells": {...}}).
        z: see `compare`.

    Returns:
        (claims, detail): `claims[variant][claim]` is the verdict string;
        `detail[variant][claim]` has the cell, the variant's {"mean", "std", "n"} and one
        comparison per baseline.
    """
    claims: dict[str, dict[str, str]] = {}
    detail: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        if variant not in aggregated:
            continue
        cells = aggregated[variant]["cells"]
        claims[variant], detail[variant] = {}, {}
        for claim, (cell, baselines, text) in CLAIMS.items():
            mine = cells.get(cell)
            rows = []
            for b in baselines:
                theirs = aggregated.get(b, {}).get("cells", {}).get(cell)
                if mine is None or theirs is None:
                    continue
                rows.append({"baseline": b, **compare(mine, theirs, z), "baseline_cell": theirs})
            verdict = combine([r["verdict"] for r in rows])
            claims[variant][claim] = verdict
            detail[variant][claim] = {
                "claim": text,
                "cell": cell,
                "smolora": mine,
                "comparisons": rows,
                "verdict": verdict,
            }
    return claims, detail
