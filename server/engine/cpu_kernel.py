"""The routed layer's CPU kernel (`kernels/routed_delta.c`): built once per machine with the
system C compiler, loaded with ctypes, called with the tensors' data pointers.

Why a kernel: on a CPU, a small decode batch spreads its tokens over many experts, so the
grouped-matmul path runs one tiny matmul per (slot, sublayer, expert) group and its cost is
the per-call overhead, not the arithmetic. The kernel buckets the (token, sublayer, kind)
rows by expert itself and reads each routed expert's A and B once per call. It serves
float32 and bfloat16 models (bfloat16: experts widened exactly as they are read, float32
arithmetic, one rounding per output element). It needs no
torch headers (plain C, built in well under a second), so a missing compiler only means the
torch path is used (`load_kernel` returns None and says why once).

Calls with enough work run on OpenMP threads. The library is linked with `-fopenmp`, and
its `libgomp.so.1` resolves to the copy torch has already loaded (same soname), so these
are torch's own intra-op threads (`torch.set_num_threads` applies), not a second pool. If
the compiler cannot build with OpenMP, the kernel is built single-threaded.

`OverlapHelper` is a thread of the same library that runs a layer's delta on a spare CPU
while the caller runs the layer's base matmul (`AdapterLayout.cpu_overlap`).

How it is built and run comes from a `KernelConfig` passed in (`kernel_config.py`): the
instruction set (`-march=native`, or without AVX-512 for the AVX2 path), the OpenMP
threshold, the compiler and the cache folder. The shared object is cached there (default
`~/.cache/smolora/kernels`), keyed by the source, the flags, the compiler and this CPU's
feature flags, and written atomically, so concurrent workers and test processes share one
build.
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
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from smolora.server.engine.kernel_config import KernelConfig

#: The kernel settings used where none are passed in.
DEFAULT_KERNEL = KernelConfig()

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "routed_delta.c"
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
        cmd = [compiler, *build_flags(config), str(SOURCE), "-o", str(out), "-lm"]
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


def _check(rc: int) -> None:
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
        key = hashlib.sha256(
            "\0".join((SOURCE.read_text(), flags, version, _cpu_signature())).encode()
        ).hexdigest()[:20]
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


class RoutedKernel:
    """The kernel bound to one routed linear's resident tensors (their storage never moves:
    slots are loaded in place), so a call passes only the step's pointers.

    Args:
        sub_row: `[n_sub]` int64, each sublayer's output row within a token's output row.
        lora_a: `[S, n_sub, E, d_in, rp]`; lora_b: `[S, n_sub, E, rp, d_out]`: in the model
            dtype (`DTYPES`), which calls' `x` and `y` must have too;
            fuse_r: `[S, n_sub, E, rp]` float32; all contiguous.
        max_scratch_bytes: bfloat16 only: the kernel sums a call's delta in a float32 buffer
            of `tokens x (max(sub_row) + 1) x d_out`; calls with more tokens than fit in this
            many bytes run in token chunks that do (tokens are independent, so the results
            are the same bit for bit). A 2,048-token prefill of a 7B model's gate/up would
            otherwise allocate and zero ~180 MB per call.

    Raises:
        RuntimeError: if the kernel is not available.
        ValueError: tensors that are not contiguous CPU tensors, a dtype it does not serve,
            or a rank above `MAX_RANK`.
    """

    def __init__(
        self,
        sub_row: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        fuse_r: Tensor,
        max_scratch_bytes: int = 16 << 20,
        helper: OverlapHelper | None = None,
        config: KernelConfig = DEFAULT_KERNEL,
    ) -> None:
        lib = load_kernel(config)
        if lib is None:
            raise RuntimeError("routed CPU kernel is not available")
        for t in (sub_row, lora_a, lora_b, fuse_r):
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("routed kernel tensors must be contiguous CPU tensors")
        n_slot, n_sub, n_exp, d_in, rp = lora_a.shape
        if rp > MAX_RANK:
            raise ValueError(f"rank {rp} exceeds the kernel's maximum {MAX_RANK}")
        if (
            lora_a.dtype not in DTYPES
            or lora_b.dtype != lora_a.dtype
            or fuse_r.dtype != torch.float32
        ):
            raise ValueError(
                f"routed kernel needs lora_a/lora_b in one of {sorted(map(str, DTYPES))} and float32 "
                f"fuse_r, got {lora_a.dtype}, {lora_b.dtype}, {fuse_r.dtype}"
            )
        self.dtype = lora_a.dtype
        self.min_parallel_work = config.min_parallel_work
        self._fn = (
            lib.smolora_routed_delta_f32
            if self.dtype == torch.float32
            else lib.smolora_routed_delta_bf16
        )
        self._sums = lib.smolora_row_sums_f32
        self._tensors = (sub_row, lora_a, lora_b, fuse_r)  # keep the storage alive
        self._head = (
            n_slot,
            n_sub,
            n_exp,
            rp,
            d_in,
            lora_b.shape[-1],
            sub_row.data_ptr(),
            lora_a.data_ptr(),
            lora_b.data_ptr(),
            fuse_r.data_ptr(),
        )
        y_cols = (int(sub_row.max()) + 1) * lora_b.shape[-1] if sub_row.numel() else 1
        scratch_tokens = max_scratch_bytes // (
            4 * y_cols
        )  # tokens whose float32 delta fits the budget
        #: Most tokens per kernel call (None: no limit); see `max_scratch_bytes`.
        self.chunk_tokens = None if self.dtype == torch.float32 else max(1, scratch_tokens)
        #: The overlap helper steps may run on, and the most tokens it takes per step (its
        #: float32 delta buffer is bounded like the bfloat16 scratch).
        self.helper = helper
        self.helper_max_tokens = scratch_tokens

    def bind(
        self,
        tok_slot: Tensor,
        tok_scale: Tensor,
        tok_vu: Tensor,
        tok_if: Tensor,
        fusion: Tensor,
        fusion_stride: int,
    ) -> BoundStep:
        """The kernel bound to one step's routes: the returned callable takes only `(x, y)`, so
        a step that is reused (steady decoding) pays no per-call argument packing.

        Args:
            tok_slot: `[N]` int64 slot of each token; tok_scale: `[N]` float32 (0: no adapter).
            tok_vu, tok_if: `[N, n_sub]` int64 expert ids (IF ids are global, >= E/2); contiguous.
            fusion: float32; token t's (w_vu, w_if) of sublayer j go to flat element
                `t * fusion_stride + 2 j` and `+ 1` from `fusion`'s first element.
            fusion_stride: elements between consecutive tokens' fusion weights.
        """
        return BoundStep(self, tok_slot, tok_scale, tok_vu, tok_if, fusion, fusion_stride)

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        tok_slot: Tensor,
        tok_scale: Tensor,
        tok_vu: Tensor,
        tok_if: Tensor,
        fusion: Tensor,
        fusion_stride: int,
    ) -> None:
        """Add the routed delta of every token to `y` in place and write the fusion weights
        (see `bind` for the step arguments).

        Args:
            x: `[N, d_in]` in the kernel's dtype, unit stride along d_in.
            y: `[N, rows_per_token * d_out]` in the kernel's dtype, unit stride along the row.
        """
        if x.dtype != self.dtype or y.dtype != self.dtype:
            raise ValueError(f"kernel built for {self.dtype} got x {x.dtype}, y {y.dtype}")
        self.bind(tok_slot, tok_scale, tok_vu, tok_if, fusion, fusion_stride)(x, y)

    def row_sums(self, x: Tensor, row: Tensor, weight: Tensor, n_rows: int) -> Tensor:
        """`[n_rows, d]` float32: `sums[row[t]] += weight[t] * x[t]` over the tokens (those with
        weight 0 are skipped), in one pass without temporaries.

        Args:
            x: `[N, d]` float32, unit stride along d; row: `[N]` int64 in `[0, n_rows)`;
            weight: `[N]` float32.
        """
        out = torch.empty(n_rows, x.shape[1], dtype=torch.float32)
        row, weight = row.contiguous(), weight.contiguous()
        rc = self._sums(
            x.shape[0],
            x.shape[1],
            x.data_ptr(),
            x.stride(0),
            row.data_ptr(),
            weight.data_ptr(),
            n_rows,
            out.data_ptr(),
        )
        _check(rc)
        return out


class BoundStep:
    """`RoutedKernel.bind`'s result: call it with `(x, y)`; it holds the step's tensors alive.
    A step with more tokens than the kernel's `chunk_tokens` is bound as one call per chunk."""

    __slots__ = ("_call", "_chunks", "_n_tok", "_keep", "_helper", "_helper_args")

    def __init__(
        self,
        kernel: RoutedKernel,
        tok_slot: Tensor,
        tok_scale: Tensor,
        tok_vu: Tensor,
        tok_if: Tensor,
        fusion: Tensor,
        fusion_stride: int,
    ) -> None:
        n = self._n_tok = tok_slot.shape[0]
        self._keep = (kernel, tok_slot, tok_scale, tok_vu, tok_if, fusion)
        step = kernel.chunk_tokens or n or 1
        step_tensors = (tok_slot, tok_scale, tok_vu, tok_if)
        pointers = (*(t.data_ptr() for t in step_tensors), fusion.data_ptr())
        per_token = (
            *(t.stride(0) * t.element_size() for t in step_tensors),
            fusion_stride * fusion.element_size(),
        )  # bytes
        self._chunks = [
            (
                t0,
                partial(
                    kernel._fn,
                    min(step, n - t0),
                    *kernel._head,
                    *(p + t0 * b for p, b in zip(pointers, per_token)),
                    fusion_stride,
                    kernel.min_parallel_work,
                ),
            )
            for t0 in range(0, max(n, 1), step)
        ]
        self._call = self._chunks[0][1] if len(self._chunks) == 1 else None
        self._helper = (
            kernel.helper if kernel.helper is not None and n <= kernel.helper_max_tokens else None
        )
        self._helper_args = (
            int(kernel.dtype == torch.bfloat16),
            n,
            *kernel._head,
            *pointers,
            fusion_stride,
            kernel.min_parallel_work,
        )

    @property
    def overlaps(self) -> bool:
        """True when `submit` / `finish` run this step on the overlap helper."""
        return self._helper is not None

    def submit(self, x: Tensor) -> None:
        """Start the step's delta on the overlap helper (`overlaps` must be True); `finish`
        adds it to the layer's output. x must stay unchanged until then."""
        if x.shape[0] != self._n_tok:
            raise ValueError(f"bound to {self._n_tok} tokens, called with {x.shape[0]}")
        assert self._helper is not None, "this step does not overlap"
        self._helper.submit(self._helper_args, x, self)

    def finish(self, y: Tensor) -> None:
        """Wait for the submitted delta and add it to `y` (the same result as calling the step
        with `(x, y)`, up to the order of one addition in float32; bit-identical in bfloat16)."""
        assert self._helper is not None, "this step does not overlap"
        kernel = self._keep[0]
        if y.dtype != kernel.dtype or y.shape[0] != self._n_tok or y.stride(-1) != 1:
            self._helper.drain()
            raise ValueError(
                f"kernel built for {kernel.dtype} and {self._n_tok} tokens got y {y.dtype} "
                f"{tuple(y.shape)} with strides {y.stride()}"
            )
        self._helper.finish(y)

    def __call__(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != self._n_tok:
            raise ValueError(f"bound to {self._n_tok} tokens, called with {x.shape[0]}")
        if self._call is not None:
            _check(self._call(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0)))
            return
        xs, ys = x.stride(0), y.stride(0)
        xp, yp, x_row, y_row = (
            x.data_ptr(),
            y.data_ptr(),
            xs * x.element_size(),
            ys * y.element_size(),
        )
        for t0, call in self._chunks:
            _check(call(xp + t0 * x_row, xs, yp + t0 * y_row, ys))


class OverlapHelper:
    """A thread of the kernel library (`routed_delta.c`, "Overlap helper") that runs a routed
    layer's delta on another CPU while the calling thread runs the layer's base matmul; the
    caller then adds the delta. If the helper has not started a job by the time the caller
    wants it, the caller runs it itself, so a busy or sleeping helper costs no more than
    not overlapping. One job at a time; owned by the process that started it.

    Between jobs the helper sleeps (it uses a CPU only while it computes).

    Args:
        cpus: CPUs the helper may run on (empty: not pinned).
        config: the kernel build whose helper this is (the layers' kernels must be the same).

    Raises:
        RuntimeError: the kernel library is unavailable or the thread could not start.
    """

    def __init__(self, cpus: tuple[int, ...], config: KernelConfig = DEFAULT_KERNEL) -> None:
        lib = load_kernel(config)
        if lib is None:
            raise RuntimeError("routed CPU kernel is not available")
        self._lib = lib
        arr = (ctypes.c_int64 * max(1, len(cpus)))(*cpus)
        handle = lib.smolora_helper_start(arr, len(cpus))
        if not handle:
            raise RuntimeError(f"could not start the overlap helper on CPUs {list(cpus)}")
        self.cpus = tuple(cpus)
        self._handle = handle
        self._submit = partial(lib.smolora_helper_submit, handle)
        self._finish = partial(lib.smolora_helper_finish, handle)
        self._pending: tuple[object, Tensor] | None = None  # keeps a posted job's tensors alive
        self._pid = os.getpid()

    def submit(self, args: tuple, x: Tensor, owner: object) -> None:
        """Post a job (`BoundStep.submit`); a job still pending (its caller failed before
        finishing it) is waited for and dropped first."""
        if self._pending is not None:
            self.drain()
        _check(self._submit(*args, x.data_ptr(), x.stride(0)))
        self._pending = (owner, x)

    def finish(self, y: Tensor) -> None:
        """Wait for the pending job and add its delta to `y` (see `BoundStep.finish`)."""
        rc = self._finish(y.data_ptr(), y.stride(0))
        self._pending = None
        _check(rc)

    def drain(self) -> None:
        """Wait for a pending job, if any, and drop its result."""
        if self._pending is not None:
            self._finish(None, 0)
            self._pending = None

    def counts(self) -> tuple[int, int]:
        """(jobs run by the helper, jobs the caller ran itself because the helper had not
        started them)."""
        stats = self.stats()
        return stats["helper_jobs"], stats["caller_jobs"]

    def stats(self) -> dict[str, Any]:
        """Job counts (`counts`), and the caller's seconds spent waiting in `finish` for the
        helper (`wait_s`: what overlapping did not hide) and running jobs itself (`caller_s`)."""
        out = (ctypes.c_int64 * 4)()
        self._lib.smolora_helper_counts(self._handle, out)
        return {
            "cpus": list(self.cpus),
            "helper_jobs": int(out[0]),
            "caller_jobs": int(out[1]),
            "wait_s": out[2] / 1e9,
            "caller_s": out[3] / 1e9,
        }

    def close(self) -> None:
        """Stop the thread (after the pending job, if any)."""
        if self._handle:
            self.drain()
            self._lib.smolora_helper_stop(self._handle)
            self._handle = None

    def __del__(self) -> None:
        if getattr(self, "_handle", None) and os.getpid() == self._pid:
            self.close()


def spare_cpus() -> tuple[int, ...]:
    """Online CPUs this thread is not bound to (vLLM binds its CPU worker's compute threads
    and leaves the rest to the engine core and the API server)."""
    return tuple(sorted(set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)))


def start_overlap_helper(mode: str, config: KernelConfig = DEFAULT_KERNEL) -> OverlapHelper | None:
    """The overlap helper `AdapterLayout.cpu_overlap` asks for in this process, or None.

    "auto" starts one when the kernel is available, torch computes on one thread, and a CPU
    outside this thread's binding exists (it is pinned there); "on" starts one whenever the
    kernel is available (pinned to those CPUs if any); "off" never does.
    """
    if mode == "off" or not kernel_available(config):
        return None
    cpus = spare_cpus()
    if mode == "auto" and (torch.get_num_threads() != 1 or not cpus):
        logger.info(
            "routed-adapter overlap off: %d torch threads, spare CPUs %s",
            torch.get_num_threads(),
            list(cpus),
        )
        return None
    try:
        helper = OverlapHelper(cpus, config)
    except RuntimeError as exc:
        logger.warning("routed-adapter overlap off: %s", exc)
        return None
    logger.info("routed-adapter overlap helper on CPUs %s", list(cpus) or "any")
    return helper
