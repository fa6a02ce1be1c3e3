"""Builds and loads the routed layer's CPU kernel (`kernels/routed_delta.c`, the math, and
`kernels/overlap_helper.c`, its helper thread) with the system C compiler, for ctypes.

Why a kernel: on a CPU, a small decode batch spreads its tokens over many experts, so the
grouped-matmul path runs one tiny matmul per (slot, sublayer, expert) group and its cost is
the per-call overhead, not the arithmetic. The kernel buckets the (token, sublayer, kind)
rows by expert itself and reads each routed expert's A and B once per call (see the C
source). It needs no torch headers (plain C, built in well under a second), so a missing
compiler only means the torch path is used (`load_kernel` returns None and says why once).

The library is linked with `-fopenmp`, and its `libgomp.so.1` resolves to the copy torch has
already loaded (same soname), so calls with enough work run on torch's own intra-op threads
(`torch.set_num_threads` applies), not a second pool. If the compiler cannot build with
OpenMP, the kernel is built single-threaded.

How it is built comes from a `KernelConfig` passed in (`kernel_config.py`): the instruction
set (`-march=native`, or without AVX-512 for the AVX2 path), the compiler and the cache
folder. The shared object is cached there (default `~/.cache/smolora/kernels`), keyed by the
sources, the flags, the compiler and this CPU's feature flags, and written atomically, so
concurrent workers and test processes share one build. The kernel bound to a layer's
tensors is `routed_kernel.py`; the helper thread's Python side is `overlap_helper.py`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from smolora.server.engine.kernel_config import KernelConfig

#: The kernel settings used where none are passed in.
DEFAULT_KERNEL = KernelConfig()

logger = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).with_name("kernels")
#: The kernel's C sources, compiled into one shared object (the header is part of its key).
SOURCES = (KERNEL_DIR / "routed_delta.c", KERNEL_DIR / "overlap_helper.c")
HEADERS = (KERNEL_DIR / "routed_delta.h",)
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c11")
OPENMP_FLAGS = ("-fopenmp",)
#: Ranks above this use the grouped torch path (the C side checks the same bound).
MAX_RANK = 256
#: Model dtypes the kernel serves.
DTYPES = frozenset({torch.float32, torch.bfloat16})
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_ERRORS = {
    1: "rank above the kernel's maximum",
    2: "expert or slot index out of range",
    3: "out of memory",
    4: "overlap helper already has a job",
    5: "overlap helper has no job",
}


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def _cache_dir(config: KernelConfig) -> Path:
    return (
        Path(config.cache_dir)
        if config.cache_dir
        else Path.home() / ".cache" / "smolora" / "kernels"
    )


def build_flags(config: KernelConfig) -> tuple[str, ...]:
    """The compiler flags of a build (OpenMP aside)."""
    return (*FLAGS, *config.isa_flags)


def _build(compiler: str, target: Path, config: KernelConfig) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *build_flags(config), *map(str, SOURCES), "-o", str(out), "-lm"]
        try:
            subprocess.run(
                [*cmd[:1], *OPENMP_FLAGS, *cmd[1:]], check=True, capture_output=True, text=True
            )
        except subprocess.CalledProcessError as exc:
            logger.warning(
                "routed CPU kernel: no OpenMP build (%s); building it single-threaded",
                exc.stderr.strip()[:300],
            )
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(out, target)  # atomic: a concurrent build of the same key writes the same bytes


def find_compiler(config: KernelConfig = DEFAULT_KERNEL) -> str | None:
    """The C compiler the kernel is built with: the config's, else `cc`, else `gcc` (None: none)."""
    return config.compiler or shutil.which("cc") or shutil.which("gcc")


def check_rc(rc: int) -> None:
    """Raise for a kernel call's nonzero return code."""
    if rc:
        raise RuntimeError(f"routed CPU kernel failed: {_ERRORS.get(rc, rc)}")


@lru_cache(maxsize=4)
def load_kernel(config: KernelConfig = DEFAULT_KERNEL) -> ctypes.CDLL | None:
    """The kernel compiled as `config` says, or None (disabled, no compiler, or the build
    failed; logged once per config)."""
    if not config.enabled:
        logger.info("routed CPU kernel disabled by its config; using the torch path")
        return None
    compiler = find_compiler(config)
    if compiler is None:
        logger.warning("no C compiler found: routed layers use the (slower) torch path on CPU")
        return None
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True
        ).stdout
        flags = " ".join(build_flags(config) + OPENMP_FLAGS)
        sources = (*(path.read_text() for path in SOURCES + HEADERS), flags, version)
        key = hashlib.sha256("\0".join((*sources, _cpu_signature())).encode()).hexdigest()[:20]
        target = _cache_dir(config) / f"routed_delta-{config.isa}-{key}.so"
        if not target.exists():
            _build(compiler, target, config)
        lib = ctypes.CDLL(str(target))
        logger.info("routed CPU kernel: %s build (%s)", config.isa, target.name)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        logger.warning(
            "routed CPU kernel unavailable (%s): using the torch path", detail.strip()[:500]
        )
        return None
    for fn in (lib.smolora_routed_delta_f32, lib.smolora_routed_delta_bf16):
        fn.restype = ctypes.c_int
        fn.argtypes = [_I64] * 7 + [_PTR] * 4 + [_PTR] * 5 + [_I64, _I64] + [_PTR, _I64, _PTR, _I64]
    sums = lib.smolora_row_sums_f32
    sums.restype = ctypes.c_int
    sums.argtypes = [_I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, _PTR]
    lib.smolora_helper_start.restype = _PTR
    lib.smolora_helper_start.argtypes = [_PTR, _I64]
    lib.smolora_helper_stop.restype = None
    lib.smolora_helper_stop.argtypes = [_PTR]
    lib.smolora_helper_counts.restype = None
    lib.smolora_helper_counts.argtypes = [_PTR, _PTR]
    lib.smolora_helper_submit.restype = ctypes.c_int
    lib.smolora_helper_submit.argtypes = (
        [_PTR] + [_I64] * 8 + [_PTR] * 4 + [_PTR] * 5 + [_I64, _I64] + [_PTR, _I64]
    )
    lib.smolora_helper_finish.restype = ctypes.c_int
    lib.smolora_helper_finish.argtypes = [_PTR, _PTR, _I64]
    return lib


def kernel_available(config: KernelConfig = DEFAULT_KERNEL) -> bool:
    """True when the routed CPU kernel `config` describes can be used in this process."""
    return load_kernel(config) is not None
