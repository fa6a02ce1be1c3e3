"""bench/mini_cvit.py's bookkeeping without training: cached (method, setting, seed) units
are skipped, and the report of cached units has today's keys plus seeds, cells with mean and
std, and the claims per SMoLoRA variant. (The training path is the trainer's, tested in
test_continual_smoke.py / test_ewc_dora.py.)"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "mini_cvit.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_mini_cvit", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _result(method: str, seed: int, forget: float) -> dict:
    return {
        "method": method,
        "setting": "single",
        "tasks": ["sqa", "caption"],
        "matrix": [[50.0 + forget, None], [50.0 + seed, 8.0]],
        "final": {"sqa": {"metric": "accuracy"}, "caption": {"metric": "cider"}},
        "MIF": 95.0,
        "unseen": {"vizwiz": {"score": 10.0 + seed, "metric": "accuracy"}},
        "robustness": {"per_task": {"sqa": {"score": 40.0, "metric": "accuracy"}}},
        "throughput": {"train_examples_per_s": 3.0, "eval_examples_per_s": 9.0},
        "runtime_s": 60.0,
    }


def test_cached_units_are_skipped_and_reported(bench, tmp_path: Path) -> None:
    argv = [
        "--preset",
        "tiny",
        "--settings",
        "single",
        "--methods",
        "seqlora,smolora",
        "--tasks",
        "sqa,caption",
        "--seeds",
        "2",
        "--cache",
        str(tmp_path / "cache"),
        "--archive",
        str(tmp_path / "archive"),
        "--out",
        str(tmp_path / "out"),
        "--name",
        "mc",
    ]
    args = bench.parse_args(argv)
    base = tmp_path / "base"
    units = [("single", s, m) for s in (0, 1) for m in ("seqlora", "smolora")]
    assert bench.pending_units(args, base, units) == units
    forget = {"seqlora": 30.0, "smolora": 2.0}
    for setting, seed, m in units[:3]:  # smolora seed 1 is not done yet
        run = bench.unit_dir(args, base, setting, seed, m)
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(_result(m, seed, forget[m] + seed)))
        (run / "unit.json").write_text(json.dumps({"wall_s": 100.0}))
    assert bench.pending_units(args, base, units) == [("single", 1, "smolora")]
    # A change of a training knob is a different unit.
    other = bench.parse_args([*argv, "--steps-per-task", "7"])
    assert bench.unit_dir(other, base, "single", 0, "seqlora") != bench.unit_dir(
        args, base, "single", 0, "seqlora"
    )
    assert bench.main([*argv, "--base", str(base), "--report-only"]) == 0
    out = json.loads((tmp_path / "out" / "mc.json").read_text())
    assert out["seeds"] == [0, 1] and out["seeds_requested"] == [0, 1]
    assert out["compute_s"] == pytest.approx(300.0)  # three cached units, no alignment
    seq = out["methods"]["seqlora"]
    for key in ("AP", "MAP", "BWT", "MIF", "unseen", "robustness", "matrix"):
        assert key in seq  # today's keys
    # AP (paper scale): (50 + s + 80) / 2 over seeds 0, 1.
    assert seq["cells"]["AP"] == {"mean": 65.25, "std": pytest.approx(0.125**0.5), "n": 2}
    assert seq["AP"] == 65.25 and seq["AP_balanced"] == pytest.approx((50.5 + 8.0) / 2)
    assert seq["cells"]["BWT"]["mean"] == pytest.approx(-30.0)
    assert out["methods"]["smolora"]["seeds"] == [0]
    assert set(out["claims"]) == {"smolora"}
    assert set(out["claims"]["smolora"]) == {"bwt", "mif", "unseen", "robustness"}
    assert out["claims"]["smolora"]["bwt"].endswith("(1 seed: no spread)")
    md = (tmp_path / "out" / "mc.md").read_text()
    assert "seeds 0, 1" in md and "## The paper's claims, one by one" in md


def test_cache_names_follow_the_alignment_knobs(bench, tmp_path: Path) -> None:
    old = ["--preset", "small", "--pretrain-steps", "3500", "--pretrain-size", "24000"]
    old += ["--pretrain-heldout", "0", "--pretrain-tower-steps", "0", "--pretrain-modules", "all"]
    plain = bench.parse_args(["--cache", str(tmp_path), "--dtype", "float32", *old])
    assert bench.data_path(plain).name == "mini_cvit-seed0"
    assert bench.base_path(plain).name == "base-small-seed0-steps3500-fp32"  # the old base
    knobs = [*old, "--pretrain-size", "100000", "--pretrain-heldout", "500"]
    bigger = bench.parse_args(["--cache", str(tmp_path), "--dtype", "float32", *knobs])
    assert bench.data_path(bigger).name == "mini_cvit-seed0-n100000"
    assert bench.base_path(bigger).name == "base-small-seed0-steps3500-fp32-n100000-heldout500"
    # Threads and checkpoint interval change neither (a resumed alignment may use others).
    resumed = bench.parse_args(
        ["--cache", str(tmp_path), "--dtype", "float32", *knobs, "--pretrain-threads", "2"]
    )
    assert bench.base_path(resumed) == bench.base_path(bigger)
    default = bench.parse_args(["--cache", str(tmp_path), "--dtype", "bfloat16"])
    assert bench.base_path(default).name == (
        "base-cvit-seed0-steps3000-bf16-n100000-heldout500-tower1500-language"
    )
    # Units are keyed by the dtype they train in, "auto" by what it resolves to here.
    from smolora.adapters.precision import resolve_dtype

    keys = {
        d: bench.training_key(bench.parse_args(["--dtype", d])) for d in ("float32", "bfloat16")
    }
    assert keys["float32"] != keys["bfloat16"]
    auto = bench.training_key(bench.parse_args(["--dtype", "auto"]))
    assert auto == keys[resolve_dtype("auto", "cpu")]
    given = bench.parse_args(["--base", str(tmp_path / "mine")])
    assert bench.base_path(given) == tmp_path / "mine"


def test_archived_units_count_as_done(bench, tmp_path: Path) -> None:
    """A unit finished in another session (only its archived results here) is not rerun and
    is reported; an archived base record gives the report its provenance."""
    argv = [
        "--preset", "tiny", "--settings", "single", "--methods", "seqlora", "--tasks",
        "sqa,caption", "--seeds", "1", "--cache", str(tmp_path / "cache"), "--archive",
        str(tmp_path / "archive"), "--out", str(tmp_path / "out"), "--name", "mc",
    ]  # fmt: skip
    args = bench.parse_args(argv)
    base = tmp_path / "cache" / "base-x"
    run = bench.unit_dir(args, base, "single", 0, "seqlora")
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(_result("seqlora", 0, 30.0)))
    (run / "unit.json").write_text(json.dumps({"wall_s": 50.0}))
    bench.archive_unit(args, run)
    shutil.rmtree(tmp_path / "cache")  # a new machine: nothing cached
    assert bench.pending_units(args, base, [("single", 0, "seqlora")]) == []
    record = tmp_path / "archive" / "base-x" / "alignment.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"config": {"preset": "cvit"}, "seconds": 10.0}))
    assert bench.main([*argv, "--base", str(base), "--report-only"]) == 0
    out = json.loads((tmp_path / "out" / "mc.json").read_text())
    assert out["methods"]["seqlora"]["seeds"] == [0]
    assert out["compute_s"] == pytest.approx(60.0)  # 10 s alignment + the 50 s unit
    assert out["base_alignment"]["config"] == {"preset": "cvit"}
