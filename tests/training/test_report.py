"""The results table and plots from method result files."""

from __future__ import annotations

import json
from pathlib import Path

from smolora.training.report import markdown_table, stage_ap, write_report


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
    assert "| SeqLoRA | 20.0 | 90.0 | 55.0 | 55.0 | -60.0 | 90.0 |" in md
    assert "| Multitask | 85.0 | 90.0 | 87.5 | 87.5 | – | 90.0 |" in md
    assert md.index("Multitask") < md.index("SeqLoRA") < md.index("SMoLoRA")
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_of_nothing() -> None:
    assert "no results" in markdown_table({})
