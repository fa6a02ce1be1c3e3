"""`KernelConfig`: how the routed CPU kernel (`kernel_build.py`) is built and run.

A typed setting passed in (engine config -> vLLM hf_overrides -> the worker's model), never
read from the environment by the library: the CLI maps its flags and environment onto it
(`KernelConfig.from_environ`).

`isa` chooses the instruction set the kernel is compiled for:
- "native": `-march=native`, everything this CPU has (AVX-512 where present);
- "avx2": `-march=native -mno-avx512f`, the code an AVX2-only CPU runs, on any x86 machine
  (used to test and measure that path where the CPU has AVX-512).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

KernelIsa = Literal["native", "avx2"]
KERNEL_ISAS: tuple[str, ...] = get_args(KernelIsa)
_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "native": ("-march=native",),
    "avx2": ("-march=native", "-mno-avx512f"),
}


class KernelConfigError(ValueError):
    """A kernel setting that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class KernelConfig:
    """How the routed CPU kernel is built and run.

    Attributes:
        enabled: False never builds it (routed layers use grouped matmuls).
        isa: "native" or "avx2" (see the module docstring).
        min_parallel_work: calls with at least this many multiply-adds
            (rows x (d_in + d_out) x rank) run on torch's OpenMP threads.
        cache_dir: where builds are cached (None: `~/.cache/smolora/kernels`).
        compiler: the C compiler (None: `cc`, else `gcc`, from PATH).
    """

    enabled: bool = True
    isa: KernelIsa = "native"
    min_parallel_work: int = 1 << 18
    cache_dir: str | None = None
    compiler: str | None = None

    def __post_init__(self) -> None:
        if self.isa not in KERNEL_ISAS:
            raise KernelConfigError(f"kernel isa must be one of {KERNEL_ISAS}, got {self.isa!r}")
        if self.min_parallel_work < 0:
            raise KernelConfigError(f"min_parallel_work must be >= 0, got {self.min_parallel_work}")

    @property
    def isa_flags(self) -> tuple[str, ...]:
        """Compiler flags that select the instruction set."""
        return _ISA_FLAGS[self.isa]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise KernelConfigError(f"unknown kernel config keys {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> KernelConfig:
        """The config the command line's environment asks for (for CLIs, not library code):
        `SMOLORA_CPU_KERNEL=0` (disable), `SMOLORA_KERNEL_ISA`, `SMOLORA_KERNEL_PARALLEL_WORK`,
        `SMOLORA_KERNEL_CACHE`, `CC`; `overrides` win."""
        values: dict[str, Any] = {}
        if environ.get("SMOLORA_CPU_KERNEL") == "0":
            values["enabled"] = False
        if environ.get("SMOLORA_KERNEL_ISA"):
            values["isa"] = environ["SMOLORA_KERNEL_ISA"]
        if environ.get("SMOLORA_KERNEL_PARALLEL_WORK"):
            try:
                values["min_parallel_work"] = int(environ["SMOLORA_KERNEL_PARALLEL_WORK"])
            except ValueError:
                raise KernelConfigError("SMOLORA_KERNEL_PARALLEL_WORK must be an integer") from None
        if environ.get("SMOLORA_KERNEL_CACHE"):
            values["cache_dir"] = environ["SMOLORA_KERNEL_CACHE"]
        if environ.get("CC"):
            values["compiler"] = environ["CC"]
        return cls(**{**values, **overrides})
