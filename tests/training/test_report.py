"""The results table and plots from method result files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smolora.training.report import (
    load_results,
    markdown_table,
    stage_ap,
    write_report,
    write_seeded_report,
)


def _fake(method: str, matrix: list, ap: float, bwt: float | None) -> dict:
    return {
        "method": method,
        "setting": "single",
        "tasks": ["sqa", "textvqa"],
        "AP": ap,
        "MAP": ap,
        "BWT": bwt,
        "MIF": 90.0,
        "matrix": matrix,
        "unseen": {"vizwiz": {"score": 10.0}, "places_5shot": {"score": 30.0}},
        "robustness": {"AP_heldout": 40.0},
    }


def test_stage_ap_ignores_unseen_entries() -> None:
    assert stage_ap([[80.0, None], [60.0, 90.0]]) == [80.0, 75.0]


def test_report_writes_table_json_and_pngs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for m, mat, ap, bwt in [
        ("seqlora", [[80.0, None], [20.0, 90.0]], 55.0, -60.0),
        ("smolora", [[80.0, None], [78.0, 88.0]], 83.0, -2.0),
        ("multitask", [[85.0, 90.0]], 87.5, None),
    ]:
        (runs / m).mkdir(parents=True)
        (runs / m / "results.json").write_text(json.dumps(_fake(m, mat, ap, bwt)))
    paths = write_report(runs, tmp_path / "out", "t")
    names = {p.name for p in paths}
    assert {"t.md", "t_table.json", "t_ap_over_stages.png", "t_matrix_smolora.png"} <= names
    md = (tmp_path / "out" / "t.md").read_text()
    # AP / AP_bal / MAP / BWT recomputed from the matrix (no caption task: scales agree).
    assert "| SeqLoRA | 20.0 | 90.0 | 55.0 | 55.0 | 67.5 | -60.0 | 90.0 |" in md
    assert "| Multitask | 85.0 | 90.0 | 87.5 | 87.5 | – | – | 90.0 |" in md
    assert md.index("Multitask") < md.index("SeqLoRA") < md.index("SMoLoRA")
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_of_nothing() -> None:
    assert "no results" in markdown_table({})


def _caption_result(method: str, seed: int, sqa: float, caption: float, bwt_drop: float) -> dict:
    """A two-task result with a caption task (balanced score = CIDEr-D x 10)."""
    return {
        "method": method,
        "setting": "single",
        "tasks": ["sqa", "caption"],
        "matrix": [[sqa + bwt_drop, None], [sqa, caption]],
        "final": {"sqa": {"metric": "accuracy"}, "caption": {"metric": "cider"}},
        "MIF": 90.0 + seed,
        "unseen": {"vizwiz": {"score": 10.0 + seed, "metric": "accuracy"}},
        "robustness": {
            "per_task": {
                "sqa": {"score": sqa - 5, "metric": "accuracy"},
                "caption": {"score": caption, "metric": "cider"},
            }
        },
        "throughput": {"train_examples_per_s": 4.0 + seed, "eval_examples_per_s": 20.0},
        "runtime_s": 100.0,
    }


def test_captions_are_on_the_papers_scale_in_tables(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "seqlora").mkdir(parents=True)
    res = _caption_result("seqlora", 0, 60.0, 12.0, 10.0)
    (runs / "seqlora" / "results.json").write_text(json.dumps(res))
    md = markdown_table(load_results(runs))
    # Caption 12.0 balanced = CIDEr-D 1.2 = 120 on the paper's scale; AP (60+120)/2,
    # AP_bal (60+12)/2, MAP (70 + 90)/2, BWT -10.
    assert "| SeqLoRA | 60.0 | 120.0 | 90.0 | 36.0 | 80.0 | -10.0 | 90.0 |" in md
    assert "CIDEr-D x 100" in md


def test_seeded_report_means_stds_claims_and_files(tmp_path: Path) -> None:
    per_seed = {
        s: {
            "seqlora": _caption_result("seqlora", s, 40.0 + s, 5.0, 30.0 + s),
            "smolora": _caption_result("smolora", s, 60.0 + 2 * s, 9.0, 2.0 + s),
        }
        for s in (0, 1, 2)
    }
    summary, paths = write_seeded_report(
        per_seed, tmp_path, "t", setting="single", meta={"compute_s": 7200.0, "runtime_s": 5.0}
    )
    agg = summary["aggregated"]
    assert list(agg) == ["seqlora", "smolora"]
    ap = agg["smolora"]["cells"]["AP"]  # (60+2s + 90) / 2 for s = 0, 1, 2
    assert ap["mean"] == pytest.approx(76.0) and ap["std"] == pytest.approx(1.0) and ap["n"] == 3
    assert agg["seqlora"]["cells"]["BWT"]["mean"] == pytest.approx(-31.0)
    assert agg["smolora"]["matrix"][1] == [pytest.approx(62.0), pytest.approx(9.0)]
    assert summary["claims"]["smolora"]["bwt"] == "holds"  # -3 +- 1 vs -31 +- 1
    assert summary["claims"]["smolora"]["mif"] == "within noise"  # identical MIF
    assert summary["claims"]["smolora"]["robustness"] == "holds"
    md = (tmp_path / "t.md").read_text()
    assert "| SMoLoRA (frozen random) | 62.0 ± 2.0 | 90.0 ± 0.0 | 76.0 ± 1.0 |" in md
    assert "## The paper's claims, one by one" in md and "by construction" in md
    assert "Total compute 2.00 h" in md
    assert "| SeqLoRA | 5.00 ± 1.00 | 20.00 ± 0.00 | 100 ± 0 |" in md  # trainer s
    assert {p.name for p in paths} >= {"t.md", "t_table.json", "t_ap_over_stages.png"}
    assert (
        json.loads((tmp_path / "t_table.json").read_text())["claims"]["smolora"]["bwt"] == "holds"
    )


def test_seeded_report_shows_what_the_base_knows(tmp_path: Path) -> None:
    per_seed = {0: {"seqlora": _caption_result("seqlora", 0, 40.0, 5.0, 30.0)}}
    facts = {"scene": {"accuracy": 99.5, "n": 400}, "shape": {"accuracy": 12.25, "n": 800}}
    meta = {"base_facts": facts, "base_heldout_loss": 0.31234}
    write_seeded_report(per_seed, tmp_path, "b", setting="single", meta=meta)
    md = (tmp_path / "b.md").read_text()
    assert "## The base" in md
    assert "| scene | shape |" in md and "| 99.5 (400) | 12.2 (800) |" in md
    assert "Held-out description loss 0.3123." in md
