"""Which floating-point dtype to compute in on this machine: `"auto"` and its checks.

bfloat16 halves memory traffic where the hardware computes it natively (CUDA GPUs; x86
CPUs with AVX512_BF16 or AMX that torch dispatches to its AVX-512 kernels). Elsewhere it is
emulated: on an AVX2-only CPU a bfloat16 matmul is tens of times slower than float32. So
`"auto"` resolves to bfloat16 only where it is native and to float32 everywhere else, and
an explicit bfloat16 request on a CPU without native support still works but warns.

Torch's dispatch level is part of the check (`torch.backends.cpu.get_cpu_capability()`):
with `ATEN_CPU_CAPABILITY=avx2` torch runs its AVX2 kernels even on an AVX-512 CPU, and
`"auto"` then picks float32, as it would on an AVX2-only machine.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal, get_args

import torch

log = logging.getLogger("smolora.adapters.precision")

DTypeChoice = Literal["auto", "float32", "bfloat16"]
DTYPE_CHOICES: tuple[str, ...] = get_args(DTypeChoice)
#: bfloat16 matmul time over float32 measured on an AVX2-only CPU (512x1024 @ 1024x1024,
#: one thread); quoted in the warning so the user knows what an emulated bfloat16 costs.
EMULATED_BF16_SLOWDOWN = 56


def cpu_isa() -> str:
    """The ISA torch's CPU kernels dispatch to here ("AVX512", "AVX2", "DEFAULT", ...)."""
    return str(torch.backends.cpu.get_cpu_capability())


def serving_device() -> str:
    """Where an engine on this machine computes: "cuda" when a GPU is visible, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bfloat16(device: str | torch.device = "cpu") -> bool:
    """True where bfloat16 matmuls run natively on `device`.

    CUDA: the device supports bfloat16. CPU: torch dispatches to AVX-512 (or AMX) and the
    CPU has AVX512_BF16 or AMX tiles.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type != "cpu":
        return False
    if not cpu_isa().startswith(("AVX512", "AMX")):
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(choice: str, device: str | torch.device = "cpu") -> str:
    """The concrete dtype name ("float32" or "bfloat16") for a user's choice on `device`.

    Args:
        choice: "auto", "float32" or "bfloat16".
        device: where the model computes.

    Returns:
        "bfloat16" for "auto" where it is native, else "float32"; an explicit choice as given.

    Raises:
        ValueError: an unknown choice.
    """
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {choice!r}")
    native = native_bfloat16(device)
    if choice == "auto":
        resolved = "bfloat16" if native else "float32"
        log.info(
            "dtype auto -> %s (device %s, CPU ISA %s)", resolved, torch.device(device), cpu_isa()
        )
        return resolved
    if choice == "bfloat16" and not native:
        warnings.warn(
            f"bfloat16 was requested but {torch.device(device)} has no native bfloat16 (CPU ISA "
            f"{cpu_isa()}): it is emulated, and a bfloat16 matmul can run "
            f"~{EMULATED_BF16_SLOWDOWN}x slower than float32 on such a CPU. Use dtype 'auto' or "
            "'float32' unless you need bfloat16 numerics.",
            RuntimeWarning,
            stacklevel=2,
        )
    return choice
