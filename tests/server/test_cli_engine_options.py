"""`serve`'s engine options: `--dtype` resolved for this machine, kernel settings from the
command line's environment (`server/cli.py`)."""

from __future__ import annotations

import pytest

from smolora.adapters.precision import resolve_dtype


def test_server_cli_resolves_dtype_and_kernel_settings() -> None:
    from smolora.server.cli import _engine_options, build_parser

    args = build_parser().parse_args(
        ["serve", "--model", "m", "--no-adapters", "--dtype", "float32"]
    )
    assert _engine_options(args, {}) == {
        "dtype": "float32"
    }  # default kernel settings are not spelled out
    options = _engine_options(args, {"SMOLORA_KERNEL_ISA": "avx2"})
    assert options["dtype"] == "float32" and options["kernel"]["isa"] == "avx2"
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "m",
            "--no-adapters",
            "--engine-option",
            'dtype="auto"',
            "--engine-option",
            'kernel={"isa": "native"}',
        ]
    )
    options = _engine_options(
        args, {"SMOLORA_KERNEL_ISA": "avx2", "SMOLORA_KERNEL_PARALLEL_WORK": "5"}
    )
    assert options["dtype"] == resolve_dtype("auto") and options["kernel"]["isa"] == "native"
    assert options["kernel"]["min_parallel_work"] == 5
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "m",
            "--no-adapters",
            "--dtype",
            "float32",
            "--engine-option",
            'dtype="bfloat16"',
        ]
    )
    with pytest.raises(SystemExit, match="once"):
        _engine_options(args, {})
