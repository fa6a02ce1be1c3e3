"""SMoLoRA experts beside one vLLM linear, for every resident checkpoint slot, and their
batched routed forward.

A vLLM linear may fuse several adapted layers (`gate_up_proj` = `gate_proj` + `up_proj`);
`RoutedAdapter` holds, per slot and per fused sublayer, all E experts (A, B), the VU gate
and the fusion vectors folded into rank space. Its forward adds the SMoLoRA delta of every
token, each token with its own request's slot, VU expert and IF expert:

  h_vu = s B_v A_v x ; h_if = s B_f A_f x ; (w_vu, w_if) = softmax(f_vu . h_vu, f_if . h_if)
  delta = w_vu h_vu + w_if h_if

Only the two routed experts per token and sublayer are computed, on one of two paths:
- on a CPU in float32 or bfloat16 (steps of at most `AdapterLayout.cpu_kernel_max_tokens`
  tokens): the compiled kernel (`routed_kernel.py`), which buckets the rows by expert itself
  and reads each routed expert once per call. Grouped matmuls would run one tiny matmul per
  expert group there, and in decode their per-call overhead, not the arithmetic, would set
  the cost;
- otherwise (GPU, other dtypes, larger steps): the (token, sublayer, expert kind) rows are
  sorted by (slot, sublayer, expert) group and run through two grouped matmuls
  (`torch.nn.functional.grouped_mm`: one for A, one for B).
Both read the fusion logit in rank space, `f . (B z) = (B^T f) . z`, before B, and scale z
by the fusion weights, so one B product gives the fused delta. No Python loop over requests
or experts. With an overlap helper (`overlap_helper.OverlapHelper`), a text-side kernel step can
start before the base matmul and be added after it (`begin_delta` / `end_delta`).

Under tensor parallelism each rank holds its slice of the experts (`sharding.py`); an
input-split layer sums its partial VU-gate logits and `A x` across ranks.

It does not decide rows or prompt tokens (`row_state.py`) or read checkpoints
(`worker_extension.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from smolora.server.engine.config import AdapterLayout
from smolora.server.engine.kernel_build import DEFAULT_KERNEL, DTYPES, MAX_RANK, kernel_available
from smolora.server.engine.kernel_config import KernelConfig
from smolora.server.engine.overlap_helper import OverlapHelper
from smolora.server.engine.routed_kernel import BoundStep, RoutedKernel
from smolora.server.engine.row_state import RowRoutingState, StepRouting
from smolora.server.engine.sharding import NO_SHARD, Shard


class RoutedAdapter(nn.Module):
    """Resident SMoLoRA tensors for one (possibly fused) vLLM linear.

    Args:
        layout: experts, rank and number of slots.
        names: canonical names of the adapted sublayers, in output order.
        out_offsets: where each sublayer's output starts in the linear's output.
        d_in: input width; d_out: output width of one sublayer.
        d_total: the linear's full output width.
        state: the row state; the adapter registers its columns there.
        image_side: True for projector linears (they read image patches).
        dtype: dtype of the expert weights (the model dtype).
        overlap: the process's overlap helper, if any: text-side kernel steps may then run on
            it while the base matmul runs (`begin_delta` / `end_delta`).
        kernel: how the CPU kernel is built and run (`KernelConfig`).
        shard: this tensor-parallel rank's part of the linear (`sharding.py`); `d_in`,
            `d_out` and `d_total` are always the full widths (the checkpoint's), and the
            resident tensors hold this rank's slices. An input-split (row-parallel) layer
            runs the grouped-matmul path, which can sum its partial `A x` across ranks
            before the fusion; the compiled kernel fuses both products in one call.
    """

    def __init__(
        self,
        layout: AdapterLayout,
        names: Sequence[str],
        out_offsets: Sequence[int],
        d_in: int,
        d_out: int,
        d_total: int,
        state: RowRoutingState,
        image_side: bool,
        dtype: torch.dtype,
        overlap: OverlapHelper | None = None,
        kernel: KernelConfig = DEFAULT_KERNEL,
        shard: Shard = NO_SHARD,
    ) -> None:
        super().__init__()
        if len(names) != len(out_offsets) or not names:
            raise ValueError("names and out_offsets must be non-empty and of equal length")
        self.names = list(names)
        self.n_sub = len(names)
        self.shard = shard
        #: The checkpoint's widths; `d_in` / `d_out` / `d_total` are this rank's.
        self.d_in_full, self.d_out_full = d_in, d_out
        if shard.splits_input:
            d_in = shard.local(d_in, f"{names[0]}: input")
        if shard.splits_output:
            d_out = shard.local(d_out, f"{names[0]}: output")
            d_total = shard.local(d_total, f"{names[0]}: output")
            out_offsets = [off // shard.size for off in out_offsets]
        self.d_in, self.d_out, self.d_total = d_in, d_out, d_total
        self.num_experts = layout.num_experts
        self.half = layout.experts_per_group
        self.rank = layout.expert_rank
        # grouped_mm needs 16-byte aligned strides: pad each expert's rank with zeros.
        align = max(1, 16 // torch.empty(0, dtype=dtype).element_size())
        self.rank_padded = -(-self.rank // align) * align
        for width, what in ((d_in, "input"), (d_out, "output")):
            if width % align:
                raise ValueError(
                    f"{names[0]}: {what} width {width} must be a multiple of {align} "
                    "for grouped matmuls"
                )
        self.num_slots = layout.num_slots
        self.out_offsets = list(out_offsets)
        if d_total % d_out or any(off % d_out for off in self.out_offsets):
            raise ValueError(
                f"{names[0]}: sublayer outputs must be d_out-aligned slices of the linear's output"
            )
        # The linear's output viewed as [N * (d_total / d_out), d_out]: row of (token, sublayer).
        self.rows_per_token = d_total // d_out
        self.image_side = image_side
        self.columns = state.register(self.names, image_side)
        s, n, e, r = self.num_slots, self.n_sub, self.num_experts, self.rank_padded
        # Kernel layouts (transposed w.r.t. the checkpoint's [E, r, d_in] / [E, d_out, r]).
        self.register_buffer("lora_a", torch.zeros(s, n, e, d_in, r, dtype=dtype), persistent=False)
        self.register_buffer(
            "lora_b", torch.zeros(s, n, e, r, d_out, dtype=dtype), persistent=False
        )
        self.register_buffer(
            "gate_vu", torch.zeros(s, n, self.half, d_in, dtype=torch.float32), persistent=False
        )
        # B_e^T f_vu for VU experts, B_e^T f_if for IF experts: fusion logits in rank space.
        self.register_buffer(
            "fuse_r", torch.zeros(s, n, e, r, dtype=torch.float32), persistent=False
        )
        self.register_buffer("sub_index", torch.arange(n), persistent=False)
        self.register_buffer(
            "sub_row", torch.tensor([off // d_out for off in self.out_offsets]), persistent=False
        )
        self.kernel_max_tokens = layout.cpu_kernel_max_tokens
        # None: not decided yet; False: not usable (an input split sums A x across ranks
        # between the kernel's two products)
        self._kernel: RoutedKernel | bool | None = False if shard.splits_input else None
        self._cached: tuple[tuple[int, int], _Plan] | None = None
        self._cached_routes: tuple[tuple[int, int], _Routes] | None = None
        self._bound: tuple[StepRouting, BoundStep] | None = (
            None  # the kernel bound to a reused step
        )
        self._overlap = None if image_side else overlap
        self.kernel_config = kernel

    # -- loading ------------------------------------------------------------------------------
    def expected_shapes(self, instruction_dim: int) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensor suffix -> shape, for one sublayer."""
        e, r, h = self.num_experts, self.rank, self.half
        d_in, d_out = self.d_in_full, self.d_out_full
        return {
            "lora_A": (e, r, d_in),
            "lora_B": (e, d_out, r),
            "gate_vu": (h, d_in),
            "gate_if": (h, instruction_dim),
            "fuse_vu": (d_out,),
            "fuse_if": (d_out,),
        }

    @torch.no_grad()
    def load_slot(
        self,
        slot: int,
        tensors: dict[str, Tensor],
        state: RowRoutingState,
        sublayers: Sequence[int] | None = None,
    ) -> None:
        """Copy one checkpoint's tensors for these sublayers into `slot`, in place.

        Args:
            slot: the slot to overwrite.
            tensors: `{canonical}.{lora_A|lora_B|gate_vu|gate_if|fuse_vu|fuse_if}` -> tensor,
                shapes already validated (see `expected_shapes`).
            state: the row state, whose stacked IF gates this writes too.
            sublayers: which of the linear's sublayers to copy (indices into `names`); None:
                all. A hot-load copies a large linear one sublayer per engine step.
        """
        h, shard, r = self.half, self.shard, self.rank
        cols = shard.bounds(self.d_in_full, "input") if shard.splits_input else None
        rows = shard.bounds(self.d_out_full, "output") if shard.splits_output else None
        for j in range(self.n_sub) if sublayers is None else sublayers:
            name = self.names[j]
            a = tensors[f"{name}.lora_A"]  # [E, r, d_in]
            b = tensors[f"{name}.lora_B"]  # [E, d_out, r]
            gate = tensors[f"{name}.gate_vu"]  # [E/2, d_in]
            if cols is not None:
                a, gate = a[:, :, cols[0] : cols[1]], gate[:, cols[0] : cols[1]]
            self.lora_a[slot, j, :, :, :r].copy_(a.transpose(1, 2))
            b_local = b[:, rows[0] : rows[1]] if rows is not None else b
            self.lora_b[slot, j, :, :r, :].copy_(b_local.transpose(1, 2))
            self.gate_vu[slot, j].copy_(gate)
            # Fusion logits in rank space, B_e^T f, from the full B the layer multiplies with
            # (a bf16 model's rounded B): this rank's own copy unless it holds a slice.
            bt = (
                self.lora_b[slot, j, :, :r, :]
                if rows is None
                else b.to(self.lora_b.dtype).transpose(1, 2)
            ).to(torch.float32)  # [E, r, d_out]
            fvu = tensors[f"{name}.fuse_vu"].to(torch.float32)
            fif = tensors[f"{name}.fuse_if"].to(torch.float32)
            self.fuse_r[slot, j, :h, :r].copy_(torch.matmul(bt[:h], fvu))
            self.fuse_r[slot, j, h:, :r].copy_(torch.matmul(bt[h:], fif))
            state.gate_if[slot, self.columns.start + j].copy_(tensors[f"{name}.gate_if"])
        self._cached = None  # a cached plan holds copies of slot-derived values (fuse_sorted)
        self._cached_routes = None
        self._bound = None

    # -- forward ------------------------------------------------------------------------------
    def vu_routes(self, xf: Tensor, step: StepRouting) -> Tensor:
        """VU expert per token and sublayer, `[N, n_sub]`; pins prefill routes on the rows.

        Args:
            xf: the layer input in float32, `[N, d_in]`.
            step: this forward's token layout.
        """
        st = step.state
        cols = self.columns
        n, h = self.n_sub, self.half
        gates = self.gate_vu.view(-1, self.d_in)  # [S*n*h, d_in]
        if step.has_prompt:
            r1 = st.max_rows + 1
            kernel = self._kernel
            if isinstance(kernel, RoutedKernel) and xf.device.type == "cpu" and xf.stride(-1) == 1:
                sums = kernel.row_sums(xf, step.token_row, step.is_prompt_f, r1)
            else:
                sums = torch.zeros(r1, self.d_in, dtype=torch.float32, device=xf.device)
                sums.index_add_(0, step.token_row, xf * step.is_prompt_f[:, None])
            mean = sums / step.prompt_count[:, None]  # [R+1, d_in]
            logits = self.shard.reduce(mean @ gates.t()).view(r1, self.num_slots, n, h)
            logits = logits.gather(1, st.row_slot.view(r1, 1, 1, 1).expand(r1, 1, n, h)).squeeze(1)
            decided = torch.argmax(logits, dim=-1)  # [R+1, n]
            st.row_vu[:, cols] = torch.where(step.row_decide[:, None], decided, st.row_vu[:, cols])
        tok_vu = st.row_vu[step.token_row, cols]  # [N, n]
        if step.per_step_decode is not None:
            ntok = xf.shape[0]
            logits = self.shard.reduce(xf @ gates.t()).view(ntok, self.num_slots, n, h)
            logits = logits.gather(
                1, step.token_slot.view(ntok, 1, 1, 1).expand(ntok, 1, n, h)
            ).squeeze(1)
            now = torch.argmax(logits, dim=-1)  # [N, n]
            tok_vu = torch.where(step.per_step_decode[:, None], now, tok_vu)
            if st.row_steps is not None and not self.image_side:
                self._record_steps(now, step)
        return tok_vu

    def _record_steps(self, now: Tensor, step: StepRouting) -> None:
        st = step.state
        assert (
            st.row_steps is not None
            and step.per_step_decode is not None
            and step.step_index is not None
        )
        keep = (
            step.per_step_decode
            & (step.step_index < st.row_steps.shape[1])
            & (step.step_index >= 0)
        )
        idx = keep.nonzero().flatten()
        if idx.numel():
            st.row_steps[step.token_row[idx], step.step_index[idx], self.columns] = now[idx].to(
                torch.int16
            )

    def _plan(self, x: Tensor, step: StepRouting) -> _Plan:
        """Sort this step's (kind, token, sublayer) rows by (slot, sublayer, expert) group.

        Routes only change when the batch changes or a prompt is prefilled, so in steady
        pinned decoding the previous step's plan is reused (`step.plan_key`).
        """
        key = step.plan_key
        if key is not None and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        n, e = self.n_sub, self.num_experts
        routes = self._routes(x, step)
        tok_vu, tok_if = routes.vu, routes.if_  # [N, n] global ids
        slot_lo, slot_hi = step.slot_range
        group0 = ((step.token_slot_rel[:, None] * n) + self.sub_index[None]) * e  # [N, n]
        keys = torch.cat((group0 + tok_vu, group0 + tok_if)).view(-1)  # [M] kind-major
        order = torch.argsort(keys, stable=True)
        keys_sorted = keys[order]
        groups = (slot_hi - slot_lo + 1) * n * e
        offs = torch.cumsum(torch.bincount(keys, minlength=groups), 0).to(torch.int32)
        pair_tok, pair_sub = step.pair_index(n)
        tok_sorted = pair_tok[order]
        dest_sorted = tok_sorted * self.rows_per_token + self.sub_row[pair_sub[order]]
        rp = self.rank_padded
        fuse = self.fuse_r[slot_lo : slot_hi + 1].reshape(groups, rp)[keys_sorted]  # [M, r]
        s_sorted = step.token_scale[tok_sorted]  # [M] scaling (0: no adapter)
        plan = _Plan(
            order=order,
            offs=offs,
            tok_sorted=tok_sorted,
            dest_sorted=dest_sorted,
            fuse_sorted=fuse * s_sorted[:, None],
            s_sorted=s_sorted,
            lora_a=self.lora_a[slot_lo : slot_hi + 1].view(groups, self.d_in, rp),
            lora_b=self.lora_b[slot_lo : slot_hi + 1].view(groups, rp, self.d_out),
        )
        self._cached = (key, plan) if key is not None else None
        return plan

    def add_delta(self, x: Tensor, y: Tensor, step: StepRouting) -> Tensor:
        """Add the SMoLoRA delta of every token to the linear's output, in place.

        Args:
            x: the linear's input, `[N, d_in]`.
            y: the linear's output, `[N, d_total]` (contiguous; modified and returned).
            step: this forward's token layout.
        """
        bound = self._bound
        if (
            bound is not None and bound[0] is step and x.stride(-1) == 1
        ):  # a reused (steady decode) step
            bound[1](x, y)
            return y
        ntok, n = x.shape[0], self.n_sub
        kernel = self._kernel_for(x, y) if ntok <= self.kernel_max_tokens else None
        if kernel is not None:
            return self._add_delta_kernel(kernel, x, y, step)
        plan = self._plan(x, step)
        z = F.grouped_mm(x.index_select(0, plan.tok_sorted), plan.lora_a, offs=plan.offs)  # [M, r]
        if self.shard.splits_input:  # partial A x of this rank's input slice: sum the ranks'
            z = self.shard.reduce(z.to(torch.float32)).to(z.dtype)
        logit_sorted = torch.linalg.vecdot(z.to(torch.float32), plan.fuse_sorted)  # [M] = s f.(B z)
        logits = torch.empty_like(logit_sorted).index_copy_(0, plan.order, logit_sorted)
        w = torch.softmax(logits.view(2, ntok, n), dim=0)  # [2, N, n] (w_vu, w_if)
        coef = w.view(-1)[plan.order] * plan.s_sorted
        out = F.grouped_mm(z * coef[:, None].to(z.dtype), plan.lora_b, offs=plan.offs)  # [M, d_out]
        y.view(ntok * self.rows_per_token, self.d_out).index_add_(
            0, plan.dest_sorted, out.to(y.dtype)
        )
        self._record_fusion(w.permute(1, 2, 0), step)
        return y

    def begin_delta(self, x: Tensor, step: StepRouting) -> _Pending | None:
        """Start this step's delta before the base matmul (call `end_delta` after it): on the
        overlap helper when the layer has one and its CPU kernel takes the step. None: nothing
        started (`end_delta` then runs `add_delta`)."""
        if self._overlap is None or x.stride(-1) != 1:
            return None
        bound = self._bound
        if bound is not None and bound[0] is step:
            call = bound[1]
        else:
            kernel = self._kernel_for(x) if x.shape[0] <= self.kernel_max_tokens else None
            if kernel is None:
                return None
            call = self._bind_step(kernel, x, step)
        if not call.overlaps:
            return _Pending(call, submitted=False)
        call.submit(x)
        return _Pending(call, submitted=True)

    def end_delta(
        self, pending: _Pending | None, x: Tensor, y: Tensor, step: StepRouting
    ) -> Tensor:
        """Add the delta `begin_delta` started (or, for None, `add_delta`) to the linear's
        output `y` (contiguous, the model dtype) in place."""
        if pending is None:
            return self.add_delta(x, y, step)
        if pending.submitted:
            pending.call.finish(y)
        else:
            pending.call(x, y)
        return y

    @property
    def uses_cpu_kernel(self) -> bool:
        """True once this layer has run a step through the compiled CPU kernel (diagnostics)."""
        return isinstance(self._kernel, RoutedKernel)

    def _kernel_for(self, x: Tensor, y: Tensor | None = None) -> RoutedKernel | None:
        """The CPU kernel bound to this layer's tensors, if it can take this call (y None:
        the output is the linear's own, contiguous in the model dtype)."""
        kernel = self._kernel
        if kernel is None:
            usable = (
                self.lora_a.device.type == "cpu"
                and self.lora_a.dtype in DTYPES
                and self.rank_padded <= MAX_RANK
                and kernel_available(self.kernel_config)
            )
            kernel = self._kernel = (
                RoutedKernel(
                    self.sub_row,
                    self.lora_a,
                    self.lora_b,
                    self.fuse_r,
                    helper=self._overlap,
                    config=self.kernel_config,
                )
                if usable
                else False
            )
        dtype = self.lora_a.dtype
        if kernel is False or x.dtype != dtype or x.stride(-1) != 1:
            return None
        if y is not None and (y.dtype != dtype or not y.is_contiguous()):
            return None
        assert isinstance(kernel, RoutedKernel)
        return kernel

    def _add_delta_kernel(
        self, kernel: RoutedKernel, x: Tensor, y: Tensor, step: StepRouting
    ) -> Tensor:
        """`add_delta` through the compiled CPU kernel (float32 or bfloat16 on CPU)."""
        if not self.image_side:
            self._bind_step(kernel, x, step)(x, y)
            return y
        r = self._routes(x, step)
        fusion = torch.empty(x.shape[0], self.n_sub, 2, dtype=torch.float32)
        kernel(x, y, r.slot, r.scale, r.vu, r.if_, fusion, fusion.stride(0))
        self._record_fusion(fusion, step)
        return y

    def _bind_step(self, kernel: RoutedKernel, x: Tensor, step: StepRouting) -> BoundStep:
        """A text-side layer's kernel bound to this step's routes; it writes the layer's
        columns of the step's fusion buffer."""
        r = self._routes(x, step)
        call = kernel.bind(
            r.slot, r.scale, r.vu, r.if_, step.fusion[:, self.columns], step.fusion.stride(0)
        )
        # A step with a plan key is reused while the batch is unchanged: keep the bound call.
        self._bound = (step, call) if step.plan_key is not None else None
        return call

    def _routes(self, x: Tensor, step: StepRouting) -> _Routes:
        """Every token's slot, scaling, VU and IF expert; reused like the plan (`_plan`)."""
        key = step.plan_key
        if key is not None and self._cached_routes is not None and self._cached_routes[0] == key:
            return self._cached_routes[1]
        xf = x if x.dtype == torch.float32 else x.to(torch.float32)
        routes = _Routes(
            vu=self.vu_routes(xf, step).contiguous(),  # [N, n]
            if_=step.state.row_if[step.token_row, self.columns].contiguous(),  # [N, n] global ids
            slot=step.token_slot.contiguous(),
            scale=step.token_scale.to(torch.float32).contiguous(),
        )
        self._cached_routes = (key, routes) if key is not None else None
        return routes

    def delta(self, x: Tensor, step: StepRouting) -> Tensor:
        """The SMoLoRA delta alone, `[N, d_total]` (zeros outside adapted sublayers)."""
        y = torch.zeros(x.shape[0], self.d_total, dtype=x.dtype, device=x.device)
        return self.add_delta(x, y, step)

    def _record_fusion(self, wt: Tensor, step: StepRouting) -> None:
        """Fusion weights `[N, n_sub, 2]` for the trace: text layers write the step's buffer
        (summed once per step); the projector, which runs once per image, assigns its rows'
        means."""
        if not self.image_side:
            step.fusion[:, self.columns] = wt
            return
        st = step.state
        act = step.token_active
        r1 = st.max_rows + 1
        fsum = torch.zeros(r1, self.n_sub, 2, device=wt.device).index_add_(
            0, step.token_row, wt * act[:, None, None]
        )
        cnt = torch.zeros(r1, device=wt.device).index_add_(0, step.token_row, act)
        rows = step.row_has_prompt
        st.row_fsum[:, self.columns] = torch.where(
            rows[:, None, None], fsum, st.row_fsum[:, self.columns]
        )
        st.row_count[:, self.columns] = torch.where(
            rows[:, None], cnt[:, None].expand(r1, self.n_sub), st.row_count[:, self.columns]
        )


@dataclass
class _Pending:
    """A delta `RoutedAdapter.begin_delta` started (submitted: running on the overlap helper)."""

    call: BoundStep
    submitted: bool


@dataclass
class _Routes:
    """Every token's routing for one step (see `RoutedAdapter._routes`)."""

    vu: Tensor  # [N, n_sub] int64 VU expert
    if_: Tensor  # [N, n_sub] int64 IF expert (global id)
    slot: Tensor  # [N] int64 checkpoint slot
    scale: Tensor  # [N] float32 scaling (0: no adapter)


@dataclass
class _Plan:
    """A routed layer's row layout for one step (see `RoutedAdapter._plan`)."""

    order: Tensor  # [M] sorted position -> flat (kind, token, sub) row
    offs: Tensor  # [G] int32 group ends
    tok_sorted: Tensor  # [M] token read by each sorted row
    dest_sorted: Tensor  # [M] output row (token * n_sub + sub) each sorted row adds to
    fuse_sorted: Tensor  # [M, r] s * B^T f of each sorted row's expert
    s_sorted: Tensor  # [M] scaling of each sorted row (0 for tokens without adapter)
    lora_a: Tensor  # [G, d_in, r] the present slots' A
    lora_b: Tensor  # [G, r, d_out] the present slots' B
