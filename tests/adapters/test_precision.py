"""`dtype="auto"` (`adapters/precision.py`): bfloat16 only where it is native.

The AVX2 path is tested on any machine by forcing torch's dispatch to AVX2 in a child
process (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`), as an AVX2-only CPU runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from smolora.adapters.precision import cpu_isa, native_bfloat16, resolve_dtype

FORCED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _child(code: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def test_forced_avx2_resolves_auto_to_float32_and_warns_on_explicit_bfloat16() -> None:
    code = (
        "import json, warnings; warnings.simplefilter('always')\n"
        "from smolora.adapters.precision import resolve_dtype, cpu_isa, native_bfloat16\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    explicit = resolve_dtype('bfloat16')\n"
        "print(json.dumps({'isa': cpu_isa(), 'native': native_bfloat16(),\n"
        "                  'auto': resolve_dtype('auto'), 'explicit': explicit,\n"
        "                  'warnings': [str(x.message) for x in w]}))"
    )
    got = _child(code, FORCED_AVX2)
    assert got["isa"] == "AVX2" and got["native"] is False and got["auto"] == "float32"
    assert got["explicit"] == "bfloat16"  # honoured, but with the expected cost spelled out
    assert (
        len(got["warnings"]) == 1
        and "56x slower" in got["warnings"][0]
        and "AVX2" in got["warnings"][0]
    )


def test_auto_on_this_cpu_follows_its_features() -> None:
    flags = _cpu_flags()
    native = cpu_isa().startswith(("AVX512", "AMX")) and bool(
        {"avx512_bf16", "amx_bf16", "amx_tile"} & flags
    )
    assert native_bfloat16("cpu") == native
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" never warns
        assert resolve_dtype("auto") == ("bfloat16" if native else "float32")
    assert resolve_dtype("float32") == "float32"


def test_cuda_choice_and_bad_values() -> None:
    if not torch.cuda.is_available():
        assert native_bfloat16("cuda") is False
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp16")
