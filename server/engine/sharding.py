"""Where one tensor-parallel rank's part of a routed linear lies, and how its partial results
are summed across ranks.

vLLM shards a Llama MLP as Megatron does: `gate_up_proj` (and the projector's `linear_1`) is
column-parallel, each rank computing a slice of the output from the full input;
`down_proj` (and `linear_2`) is row-parallel, each rank reading a slice of the input and
producing a partial output that vLLM sums across ranks. The SMoLoRA experts of a layer are
split the same way, so that no rank ever needs another rank's activations:

- output split (column-parallel): every rank holds the full `A` and VU gate (its input is
  the full input, so the VU route and `z = A x` are the same on every rank) and the rows of
  `B` for its output slice. The fusion logit `f . (B z)` needs the full output, but it equals
  `(B^T f) . z`, and `B^T f` is computed at load time from the full checkpoint tensors: no
  communication at all.
- input split (row-parallel): every rank holds the columns of `A` and of the VU gate for its
  input slice, and the full `B` and fusion vectors. The VU gate's logits (a dot product with
  the mean input) and `z = A x` are partial sums: one all-reduce each (E/2 logits per
  request while routes are decided, `2 x rank` values per token). Every rank then computes
  the same fused delta and adds it to the linear's output after vLLM's own all-reduce.

What it does not do: communicate by itself (the model passes vLLM's all-reduce in), or shard
the vision tower and base weights (vLLM does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

Split = Literal["none", "output", "input"]


@dataclass(frozen=True)
class Shard:
    """One rank's part of a routed linear.

    Attributes:
        rank: this process's tensor-parallel rank.
        size: the tensor-parallel world size (1: not sharded).
        split: "output" for a column-parallel linear, "input" for a row-parallel one,
            "none" when the layer is not sharded.
        all_reduce: sums a tensor across the ranks and returns the sum (same shape); needed
            for the input split with `size > 1`.
    """

    rank: int = 0
    size: int = 1
    split: Split = "none"
    all_reduce: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"bad tensor-parallel rank {self.rank} of {self.size}")
        if self.split not in ("none", "output", "input"):
            raise ValueError(f"split must be 'none', 'output' or 'input', got {self.split!r}")
        if self.size > 1 and self.split == "none":
            raise ValueError("a sharded layer (size > 1) needs split 'output' or 'input'")
        if self.size > 1 and self.split == "input" and self.all_reduce is None:
            raise ValueError("an input-split layer needs all_reduce to sum its partial results")

    @property
    def splits_input(self) -> bool:
        """True when this rank sees a slice of the input (partial sums need a reduce)."""
        return self.size > 1 and self.split == "input"

    @property
    def splits_output(self) -> bool:
        """True when this rank produces a slice of the output."""
        return self.size > 1 and self.split == "output"

    def local(self, width: int, what: str) -> int:
        """This rank's part of a split width."""
        if width % self.size:
            raise ValueError(
                f"{what} width {width} does not split into {self.size} tensor-parallel ranks"
            )
        return width // self.size

    def bounds(self, width: int, what: str) -> tuple[int, int]:
        """`[lo, hi)` of this rank's slice of a split width."""
        part = self.local(width, what)
        return self.rank * part, (self.rank + 1) * part

    def reduce(self, t: Tensor) -> Tensor:
        """The sum of `t` over the ranks for an input split; `t` itself otherwise."""
        if not self.splits_input:
            return t
        assert self.all_reduce is not None
        return self.all_reduce(t)


#: An unsharded layer (tensor_parallel_size 1).
NO_SHARD = Shard()
