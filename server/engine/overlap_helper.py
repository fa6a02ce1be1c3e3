"""`OverlapHelper`: the Python side of the kernel library's helper thread
(`kernels/overlap_helper.c`), which runs a routed layer's delta on a spare CPU while the
calling thread runs the layer's base matmul (`AdapterLayout.cpu_overlap`), and
`start_overlap_helper`, which decides whether this process gets one."""

from __future__ import annotations

import ctypes
import logging
import os
from functools import partial
from typing import Any

import torch
from torch import Tensor

from smolora.server.engine.kernel_build import (
    DEFAULT_KERNEL,
    check_rc,
    kernel_available,
    load_kernel,
)
from smolora.server.engine.kernel_config import KernelConfig

logger = logging.getLogger(__name__)


class OverlapHelper:
    """A thread of the kernel library (`kernels/overlap_helper.c`) that runs a routed
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
        check_rc(self._submit(*args, x.data_ptr(), x.stride(0)))
        self._pending = (owner, x)

    def finish(self, y: Tensor) -> None:
        """Wait for the pending job and add its delta to `y` (see `BoundStep.finish`)."""
        rc = self._finish(y.data_ptr(), y.stride(0))
        self._pending = None
        check_rc(rc)

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
