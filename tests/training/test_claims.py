"""The claim logic (`training/claims.py`) on synthetic seed statistics."""

from __future__ import annotations

import math

import pytest

from smolora.training.claims import CLAIMS, FAILS, HOLDS, NOISE, check_claims, combine, compare


def cell(mean: float, std: float = 1.0, n: int = 3) -> dict:
    return {"mean": mean, "std": std, "n": n}


def test_compare_uses_two_standard_errors_of_the_difference() -> None:
    noise = 2 * math.sqrt(1 / 3 + 1 / 3)  # ~1.63
    assert compare(cell(10.0), cell(8.0)) == {"verdict": HOLDS, "diff": 2.0, "noise": noise}
    assert compare(cell(10.0), cell(9.0))["verdict"] == NOISE
    assert compare(cell(8.0), cell(10.0))["verdict"] == FAILS
    # A larger spread turns the same difference into noise.
    assert compare(cell(10.0, std=3.0), cell(8.0, std=3.0))["verdict"] == NOISE
    # More seeds shrink the standard error.
    assert compare(cell(10.0, n=12), cell(9.0, n=12))["verdict"] == HOLDS


def test_one_seed_has_no_spread_and_says_so() -> None:
    got = compare(cell(10.0, std=0.0, n=1), cell(9.9, std=0.0, n=1))
    assert got["verdict"] == HOLDS + " (1 seed: no spread)" and got["noise"] is None
    assert combine([got["verdict"], HOLDS]) == HOLDS + " (1 seed: no spread)"


@pytest.mark.parametrize(
    "verdicts,want",
    [
        ([HOLDS, HOLDS], HOLDS),
        ([HOLDS, NOISE], NOISE),
        ([HOLDS, NOISE, FAILS], FAILS),
        ([], "not measured"),
    ],
)
def test_combine(verdicts: list[str], want: str) -> None:
    assert combine(verdicts) == want


def _method(**cells: float) -> dict:
    return {"cells": {k: cell(v) for k, v in cells.items()}}


def test_check_claims_per_variant_against_the_papers_baselines() -> None:
    base = dict(BWT=-30.0, MIF=70.0, unseen_mean=20.0, AP_heldout=30.0)
    agg = {
        "seqlora": _method(**base),
        "moelora": _method(**base),
        "ewc": _method(**{**base, "BWT": -4.0}),  # EWC forgets as little as frozen SMoLoRA
        "dora": _method(**base),
        "replay": _method(**{**base, "MIF": 95.0}),  # replay keeps the format better
        "smolora": _method(BWT=-3.0, MIF=90.0, unseen_mean=10.0, AP_heldout=31.0),
        "smolora_learned": _method(BWT=0.0, MIF=99.0, unseen_mean=25.0, AP_heldout=40.0),
    }
    claims, detail = check_claims(agg)
    assert claims["smolora"] == {
        "bwt": NOISE,  # holds against three baselines, within noise against EWC
        "mif": FAILS,  # Replay is better
        "unseen": FAILS,
        "robustness": NOISE,
    }
    assert claims["smolora_learned"] == {
        "bwt": HOLDS,
        "mif": HOLDS,
        "unseen": HOLDS,
        "robustness": HOLDS,
    }
    bwt = detail["smolora"]["bwt"]
    assert bwt["cell"] == "BWT" and [r["baseline"] for r in bwt["comparisons"]] == list(
        CLAIMS["bwt"][1]
    )
    assert "replay" not in CLAIMS["bwt"][1] and "replay" in CLAIMS["mif"][1]


def test_missing_baselines_and_variants() -> None:
    claims, _ = check_claims({"smolora": _method(BWT=-1.0), "seqlora": _method(BWT=-20.0)})
    assert set(claims) == {"smolora"}
    assert claims["smolora"]["bwt"] == HOLDS  # only SeqLoRA was run
    assert claims["smolora"]["mif"] == "not measured"
