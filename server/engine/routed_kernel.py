"""`RoutedKernel`: the routed CPU kernel (`kernel_build.py`) bound to one routed linear's
resident expert tensors; `BoundStep`: that kernel bound to one step's routes, called with
only `(x, y)` (and, when an overlap helper is attached, submitted to it and finished after
the base matmul)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from smolora.server.engine.kernel_build import (
    DEFAULT_KERNEL,
    DTYPES,
    MAX_RANK,
    check_rc,
    load_kernel,
)
from smolora.server.engine.kernel_config import KernelConfig

if TYPE_CHECKING:
    from smolora.server.engine.overlap_helper import OverlapHelper


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
                f"routed kernel needs lora_a/lora_b in one of {sorted(map(str, DTYPES))} "
                f"and float32 fuse_r, got {lora_a.dtype}, {lora_b.dtype}, {fuse_r.dtype}"
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
        check_rc(rc)
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
            check_rc(self._call(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0)))
            return
        xs, ys = x.stride(0), y.stride(0)
        xp, yp, x_row, y_row = (
            x.data_ptr(),
            y.data_ptr(),
            xs * x.element_size(),
            ys * y.element_size(),
        )
        for t0, call in self._chunks:
            check_rc(call(xp + t0 * x_row, xs, yp + t0 * y_row, ys))
