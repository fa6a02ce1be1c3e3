"""Per-request routing state inside the vLLM worker, kept per persistent-batch row.

What it does:
- `RowRoutingState` mirrors vLLM's persistent batch: for each row it holds the request's
  key, checkpoint slot, VU-routing mode, prompt length, IF routes (decided once from the
  instruction embedding when the request joins), VU routes (decided at prefill from the
  prompt mean; pinned for decoding) and running sums of fusion weights for the trace. It is
  updated from vLLM's `BatchUpdate` (added / removed / moved rows), which our no-op logits
  processor (`row_tracker.py`) forwards before every forward pass.
- `StepRouting` lays out one forward's flat token stream: which row (request) each token
  belongs to (from the attention metadata's `query_start_loc`), whether it is a prompt
  token (position < prompt length), and the per-row prompt counts for segment means. It is
  built once per step and shared by every routed layer, so the hot path has no Python loop
  over requests.
- Keeps what a request's trace is built from while it is in the batch, and parks a copy
  (`traces.TraceSnapshot`) in a bounded store when it leaves unfetched; `traces(keys)` hands
  them out. Building and rendering a trace is `traces.py`'s job.

What it does not do: expert math (`routed_linear.py`), loading checkpoints
(`worker_extension.py`), or deciding versions (the front end assigns slots).

Row index `max_rows` is a "null row" that padding tokens point at; it is never active.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from smolora.adapters.smolora.config import VU_ROUTINGS
from smolora.server.engine.config import EXTRA_ARGS_KEY, AdapterLayout
from smolora.server.engine.traces import TraceSnapshot, render_trace, snapshot_row

logger = logging.getLogger(__name__)

_MAX_PARKED = 4096


@dataclass
class Column:
    """One adapted (sub)layer: its canonical name and whether it reads image patches."""

    name: str
    image_side: bool


@dataclass
class RequestMeta:
    """Host-side facts about one request in the batch."""

    key: int
    slot: int
    per_step: bool
    prompt_len: int
    exact: bool = True


@dataclass
class RequestArgs:
    """What a request carries in `SamplingParams.extra_args["smolora"]`."""

    key: int
    slot: int
    instruction: list[float]
    vu_routing: str = "pinned"

    @classmethod
    def parse(cls, extra_args: dict[str, Any] | None) -> RequestArgs | None:
        """The request's SMoLoRA arguments, None when it has none (a base request).

        Raises:
            ValueError: malformed arguments (vLLM turns this into a 400 at the API boundary).
        """
        if not extra_args or EXTRA_ARGS_KEY not in extra_args:
            return None
        raw = extra_args[EXTRA_ARGS_KEY]
        if not isinstance(raw, dict):
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a dict")
        try:
            key, slot = int(raw["key"]), int(raw["slot"])
            instruction = [float(v) for v in raw["instruction"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"extra_args[{EXTRA_ARGS_KEY!r}] needs int 'key', int 'slot', float list "
                f"'instruction' ({e})"
            ) from None
        mode = str(raw.get("vu_routing", "pinned"))
        if mode not in VU_ROUTINGS:
            raise ValueError(f"vu_routing must be 'pinned' or 'per_step', got {mode!r}")
        if key < 0 or slot < 0:
            raise ValueError("key and slot must be non-negative")
        return cls(key, slot, instruction, mode)


class RowRoutingState:
    """Routing buffers per persistent-batch row, plus the columns (adapted layers) they cover.

    Args:
        layout: the adapter layout (experts, slots, trace options).
        max_rows: vLLM's `max_num_seqs` (persistent-batch capacity).
        device: where the buffers live (the model's device).
    """

    def __init__(self, layout: AdapterLayout, max_rows: int, device: torch.device) -> None:
        self.layout = layout
        self.max_rows = max_rows
        self.null_row = max_rows
        self.device = device
        self.columns: list[Column] = []
        self._finalized = False
        self.keys: list[int | None] = [None] * max_rows
        self.key_to_row: dict[int, int] = {}
        self.meta: dict[int, RequestMeta] = {}
        self.parked: OrderedDict[int, TraceSnapshot] = OrderedDict()
        self.fetched_live: set[int] = set()
        self.any_active = False
        self.any_per_step = False
        self.slot_range = (0, 0)
        self.epoch = 0  # bumped whenever rows or slots change: invalidates cached routing plans
        self._last_step: StepRouting | None = None
        self.partial_prefills = 0
        self.resumed = 0
        self.recomputed = 0
        self.steps_run = 0
        self.slot_versions: dict[int, dict[str, Any]] = {}

    # -- construction ----------------------------------------------------------------------
    def register(self, names: list[str], image_side: bool) -> slice:
        """Reserve columns for an adapted linear's sublayers; returns their slice."""
        if self._finalized:
            raise RuntimeError("columns must be registered before finalize()")
        start = len(self.columns)
        self.columns.extend(Column(n, image_side) for n in names)
        return slice(start, start + len(names))

    def finalize(self) -> None:
        """Allocate the row buffers once every adapted layer registered its columns."""
        rows_with_null = self.max_rows + 1  # the null row is last
        num_columns = len(self.columns)
        layout, device = self.layout, self.device
        on_device: dict[str, Any] = dict(device=device)
        self.row_slot = torch.zeros(rows_with_null, dtype=torch.long, **on_device)
        self.row_active = torch.zeros(rows_with_null, dtype=torch.bool, **on_device)
        self.row_per_step = torch.zeros(rows_with_null, dtype=torch.bool, **on_device)
        self.row_locked = torch.zeros(rows_with_null, dtype=torch.bool, **on_device)
        self.row_prompt_len = torch.zeros(rows_with_null, dtype=torch.long, **on_device)
        shape = (rows_with_null, num_columns)
        self.row_vu = torch.zeros(shape, dtype=torch.long, **on_device)
        self.row_if = torch.zeros(shape, dtype=torch.long, **on_device)
        #: running sum of (w_vu, w_if) per row and column, `[R+1, C, 2]`
        self.row_fsum = torch.zeros(*shape, 2, dtype=torch.float32, **on_device)
        self.row_count = torch.zeros(shape, dtype=torch.float32, **on_device)
        kept_steps = layout.trace_step_routes
        self.row_steps = (
            torch.full(
                (rows_with_null, kept_steps, num_columns), -1, dtype=torch.int16, **on_device
            )
            if kept_steps
            else None
        )
        # IF gates of every column, per slot: the IF route is decided when a request joins.
        self.gate_if = torch.zeros(
            layout.num_slots,
            num_columns,
            layout.experts_per_group,
            layout.instruction_dim,
            dtype=torch.float32,
            **on_device,
        )
        self.slot_scaling = torch.zeros(layout.num_slots, dtype=torch.float32, **on_device)
        self.image_columns = torch.tensor(
            [col.image_side for col in self.columns], dtype=torch.bool, device=device
        )
        self.text_columns_f = (~self.image_columns).to(torch.float32)
        self._finalized = True

    # -- batch updates (called from the logits processor, before each forward) --------------
    def apply_batch_update(self, batch_update: Any) -> None:
        """Apply vLLM's `BatchUpdate`: removed rows, then added, then moved (vLLM's order)."""
        # A removed row that vLLM refilled in the same update (by an add or a condensing move)
        # is not listed in `removed`: `_add` and `_move` release its previous request.
        for row in batch_update.removed:
            self._release(row)
        for row, params, prompt_ids, _out in batch_update.added:
            if self.keys[row] is not None:
                self._release(row)
            extra = getattr(params, "extra_args", None) if params is not None else None
            try:
                args = RequestArgs.parse(extra)
            except ValueError as e:  # validated in the front end; never fatal for the engine
                logger.error("ignoring malformed SMoLoRA args on row %d: %s", row, e)
                args = None
            self._add(row, args, len(prompt_ids) if prompt_ids is not None else 0)
        for a, b, direction in batch_update.moved:
            if getattr(direction, "name", str(direction)) == "SWAP":
                self._swap(a, b)
            else:
                self._move(a, b)
        self._refresh_flags()

    def _refresh_flags(self) -> None:
        live = [self.meta[k] for k in self.keys if k is not None]
        self.any_active = bool(live)
        self.any_per_step = any(meta.per_step for meta in live)
        slots = [meta.slot for meta in live]
        self.slot_range = (min(slots), max(slots)) if slots else (0, 0)
        self.epoch += 1

    def _add(self, row: int, args: RequestArgs | None, prompt_len: int) -> None:
        self.row_active[row] = False
        if args is None:
            self.keys[row] = None
            return
        layout = self.layout
        if args.slot >= layout.num_slots or args.slot not in self.slot_versions:
            logger.error(
                "request %d names slot %d, which holds no checkpoint; serving it without adapters",
                args.key,
                args.slot,
            )
            self.keys[row] = None
            return
        if len(args.instruction) != layout.instruction_dim:
            logger.error(
                "request %d: instruction has %d dims, expected %d",
                args.key,
                len(args.instruction),
                layout.instruction_dim,
            )
            self.keys[row] = None
            return
        instruction = torch.tensor(args.instruction, dtype=torch.float32, device=self.device)
        if_logits = torch.einsum("chi,i->ch", self.gate_if[args.slot], instruction)  # [C, E/2]
        self.row_if[row] = torch.argmax(if_logits, dim=-1) + layout.experts_per_group
        parked = self.parked.pop(args.key, None)
        self.row_slot[row] = args.slot
        self.row_per_step[row] = args.vu_routing == "per_step"
        self.row_prompt_len[row] = prompt_len
        self.row_fsum[row] = 0.0
        self.row_count[row] = 0.0
        if self.row_steps is not None:
            self.row_steps[row] = -1
        if parked is not None:
            # Back in the batch after leaving it without finishing: either vLLM skipped it for
            # a step (its KV cache intact: it continues where it was) or it was preempted (vLLM
            # recomputes its prompt and generated tokens). Restore everything and lock the
            # routes decided at the first prefill; `text_step` restarts the text sums if the
            # request's prompt shows up again (a recompute).
            self.row_vu[row] = parked.vu_expert.to(self.device)
            self.row_locked[row] = True
            self.row_fsum[row] = parked.fusion_sum.to(self.device)
            self.row_count[row] = parked.token_count.to(self.device)
            if self.row_steps is not None and parked.step_routes is not None:
                self.row_steps[row] = parked.step_routes.to(self.device)
            meta = parked.meta
            self.resumed += 1
        else:
            self.row_vu[row] = 0
            self.row_locked[row] = False
            meta = RequestMeta(args.key, args.slot, args.vu_routing == "per_step", prompt_len)
        self.row_active[row] = True
        self.keys[row] = args.key
        self.key_to_row[args.key] = row
        self.meta[args.key] = meta

    def _release(self, row: int) -> None:
        key = self.keys[row]
        self.row_active[row] = False
        if key is None:
            return
        self.keys[row] = None
        self.key_to_row.pop(key, None)
        meta = self.meta.pop(key)
        if key in self.fetched_live:  # its trace was already delivered
            self.fetched_live.discard(key)
            return
        self.parked[key] = snapshot_row(self, row, meta)
        while len(self.parked) > _MAX_PARKED:
            self.parked.popitem(last=False)

    def _row_tensors(self) -> list[Tensor]:
        buffers = [
            self.row_slot,
            self.row_active,
            self.row_per_step,
            self.row_locked,
            self.row_prompt_len,
            self.row_vu,
            self.row_if,
            self.row_fsum,
            self.row_count,
        ]
        return buffers + ([self.row_steps] if self.row_steps is not None else [])

    def _move(self, a: int, b: int) -> None:
        # vLLM lists a removed row only if nothing refilled it; a move into it means its
        # previous request left.
        if self.keys[b] is not None:
            self._release(b)
        for buffer in self._row_tensors():
            buffer[b] = buffer[a]
        self.row_active[a] = False
        key = self.keys[a]
        self.keys[b], self.keys[a] = key, None
        if key is not None:
            self.key_to_row[key] = b

    def _swap(self, a: int, b: int) -> None:
        rows = torch.tensor([a, b], device=self.device)
        swapped = torch.tensor([b, a], device=self.device)
        for buffer in self._row_tensors():
            buffer[rows] = buffer[swapped]
        self.keys[a], self.keys[b] = self.keys[b], self.keys[a]
        for r in (a, b):
            if self.keys[r] is not None:
                self.key_to_row[self.keys[r]] = r  # type: ignore[index]

    # -- per forward ------------------------------------------------------------------------
    def text_step(
        self,
        positions: Tensor,
        query_start_loc: Tensor,
        num_reqs: int,
        num_actual_tokens: int,
        decode_only: bool = False,
    ) -> StepRouting:
        """Token layout of one forward: `positions` `[N]`; rows from `query_start_loc` `[R+1]`.

        `decode_only` (every row has exactly one token, none of them a prompt token) lets a
        pinned batch that has not changed since the last step reuse that step's layout.
        """
        n = positions.shape[0]
        last = self._last_step
        if (
            decode_only
            and not self.any_per_step
            and last is not None
            and last.plan_key == (self.epoch, n)
        ):
            self.steps_run += 1
            return last
        counts = torch.diff(query_start_loc[: num_reqs + 1])
        token_row = torch.full((n,), self.null_row, dtype=torch.long, device=positions.device)
        token_row[:num_actual_tokens] = torch.repeat_interleave(
            torch.arange(num_reqs, device=positions.device), counts, output_size=num_actual_tokens
        )
        is_prompt = positions < self.row_prompt_len[token_row]
        step = StepRouting(self, token_row, is_prompt, positions=positions)
        self._last_step = step if step.plan_key is not None else None
        self.steps_run += 1
        self._check_whole_prompts(step)
        if step.has_prompt:
            self.epoch += 1  # routes are being decided
            # A resumed (locked) row whose prompt is back is being recomputed after
            # preemption: its text-layer sums restart (the projector's are assigned, not summed).
            rows = step.row_has_prompt & self.row_locked
            if bool(rows.any()):
                self.recomputed += int(rows.sum())
                recompute = rows[:, None] & ~self.image_columns[None, :]
                self.row_fsum.masked_fill_(recompute[:, :, None], 0.0)
                self.row_count.masked_fill_(recompute, 0.0)
        return step

    def finish_step(self, step: StepRouting) -> None:
        """After the forward: add the step's fusion weights and token counts to the rows.

        Tokens without an adapter (padding, base requests) add their placeholder weights to
        rows that are never rendered (the null row, or a base request's row, which counts no
        tokens and is cleared when reused), so no mask is applied here.
        """
        self.row_fsum.index_add_(0, step.token_row, step.fusion)
        self.row_count += step.count_delta()

    def image_step(self, keys: list[int], patches: int) -> StepRouting:
        """Token layout of a projector call: `len(keys)` images of `patches` tokens each."""
        rows = [self.key_to_row.get(k, self.null_row) if k >= 0 else self.null_row for k in keys]
        token_row = torch.tensor(rows, dtype=torch.long, device=self.device).repeat_interleave(
            patches
        )
        is_prompt = torch.ones(token_row.shape[0], dtype=torch.bool, device=self.device)
        return StepRouting(self, token_row, is_prompt, positions=None)

    def _check_whole_prompts(self, step: StepRouting) -> None:
        """Flag rows whose prompt arrived split across steps (never, with chunking off)."""
        if not step.has_prompt:
            return
        partial = (
            step.row_has_prompt
            & (step.prompt_count_raw != self.row_prompt_len.to(torch.float32))
            & ~self.row_locked
        )
        partial &= self.row_active
        if bool(partial.any()):
            rows = partial.nonzero().flatten().tolist()
            self.partial_prefills += len(rows)
            for r in rows:
                key = self.keys[r] if r < self.max_rows else None
                if key is not None:
                    self.meta[key].exact = False
            logger.error(
                "SMoLoRA saw %d split prompt(s): their routes cannot match unchunked serving",
                len(rows),
            )

    # -- traces -----------------------------------------------------------------------------
    def traces(self, keys: list[int]) -> dict[int, dict[str, Any] | None]:
        """Routing traces of requests (live or finished); a finished one is handed out once."""
        out: dict[int, dict[str, Any] | None] = {}
        for key in keys:
            row = self.key_to_row.get(key)
            if row is not None:
                snapshot: TraceSnapshot | None = snapshot_row(self, row, self.meta[key])
                self.fetched_live.add(key)
            else:
                snapshot = self.parked.pop(key, None)
            out[key] = None if snapshot is None else render_trace(snapshot, self.columns)
        return out

    def slots_in_use(self) -> set[int]:
        """Slots named by requests now in the persistent batch (diagnostics only: a finished
        request stays there until the next step, so the front end owns slot occupancy)."""
        return {meta.slot for meta in self.meta.values()}


@dataclass
class StepRouting:
    """One forward's flat token stream, tagged with rows (requests).

    Attributes:
        state: the row state the rows index into.
        token_row: row of each token, `[N]` long (padding -> null row).
        is_prompt: token is part of its request's prompt, `[N]` bool.
        positions: token positions `[N]` (None for projector calls).
    """

    state: RowRoutingState
    token_row: Tensor
    is_prompt: Tensor
    positions: Tensor | None = None
    _pairs: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    _count_delta: Tensor | None = None

    def __post_init__(self) -> None:
        state = self.state
        token_row = self.token_row
        rows_with_null = state.max_rows + 1
        self.n_tokens = token_row.shape[0]
        self.token_slot = state.row_slot[token_row]  # [N]
        active = state.row_active[token_row]
        self.token_active = active.to(torch.float32)  # [N]
        prompt = self.is_prompt & active
        self.is_prompt_f = prompt.to(torch.float32)  # [N]
        self.prompt_count_raw = torch.zeros(
            rows_with_null, dtype=torch.float32, device=token_row.device
        ).index_add_(0, token_row, self.is_prompt_f)
        self.prompt_count = self.prompt_count_raw.clamp_min(1.0)  # [R+1]
        self.row_has_prompt = self.prompt_count_raw > 0  # [R+1]
        # Routes are (re)decided for rows whose prompt is in this step, unless pinned by a resume.
        self.row_decide = self.row_has_prompt & ~state.row_locked  # [R+1]
        self.has_prompt = bool(self.row_has_prompt.any())
        self.per_step_decode: Tensor | None = None
        self.step_index: Tensor | None = None
        if state.any_per_step and self.positions is not None:
            per_step_decode = state.row_per_step[token_row] & ~self.is_prompt & active
            if bool(per_step_decode.any()):
                self.per_step_decode = per_step_decode  # [N]
                self.step_index = self.positions - state.row_prompt_len[token_row]
        # Only the slots of requests in the batch take part in the grouped matmuls.
        lowest_slot, highest_slot = state.slot_range
        self.slot_range = (lowest_slot, highest_slot)
        self.token_slot_rel = torch.where(active, self.token_slot - lowest_slot, 0)  # [N]
        # [N], 0: no adapter
        self.token_scale = state.slot_scaling[self.token_slot] * self.token_active
        self.fusion = torch.zeros(
            self.n_tokens, len(state.columns), 2, device=token_row.device
        )  # [N, C, 2]
        # Routes change only with the batch or a prefill: then layers may reuse last step's plan.
        reusable = (
            self.positions is not None and not self.has_prompt and self.per_step_decode is None
        )
        self.plan_key: tuple[int, int] | None = (state.epoch, self.n_tokens) if reusable else None

    def count_delta(self) -> Tensor:
        """`[R+1, C]`: this step's adapter tokens per row, in the text columns (computed once;
        a steady decode step is reused, see `RowRoutingState.text_step`)."""
        if self._count_delta is None:
            state = self.state
            tokens_per_row = torch.zeros(
                state.max_rows + 1, device=self.token_row.device
            ).index_add_(0, self.token_row, self.token_active)
            self._count_delta = tokens_per_row[:, None] * state.text_columns_f[None, :]
        return self._count_delta

    def pair_index(self, n_sub: int) -> tuple[Tensor, Tensor]:
        """For the 2*N*n_sub (expert kind, token, sublayer) rows of a routed layer, flattened
        kind-major: the token each reads and its sublayer index."""
        cached = self._pairs.get(n_sub)
        if cached is None:
            n = self.n_tokens
            pair = torch.arange(2 * n * n_sub, device=self.token_row.device)
            cached = ((pair // n_sub) % n, pair % n_sub)
            self._pairs[n_sub] = cached
        return cached


class StepScope:
    """Holds the `StepRouting` of the forward in progress; routed layers read it.

    The model enters `scope.active(step)` around its language-model forward (and around
    the projector in `embed_multimodal`); outside, `current` is None and routed layers
    compute the base output only.
    """

    def __init__(self) -> None:
        self.current: StepRouting | None = None

    @contextlib.contextmanager
    def active(self, step: StepRouting | None) -> Iterator[None]:
        previous = self.current
        self.current = step
        try:
            yield
        finally:
            self.current = previous
