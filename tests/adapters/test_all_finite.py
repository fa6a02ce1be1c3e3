"""`checkpoint.all_finite`: the NaN/inf check of checkpoint tensors (the hot-load's fit
check, the paper-format import) by a sum, against the elementwise check, including sums
that overflow from finite elements."""

from __future__ import annotations

import pytest
import torch

from smolora.adapters.checkpoint import all_finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_the_elementwise_check(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    cases = [
        torch.randn(4, 1000),
        torch.zeros(0),
        torch.full((8,), big),  # finite elements whose sum overflows
        torch.tensor([big, -big, big]),
    ]
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.randn(3, 500)
        t[2, 417] = bad
        cases.append(t)
    both = torch.randn(100)
    both[3], both[70] = float("inf"), float("-inf")  # their sum is NaN: still caught
    cases.append(both)
    for t in cases:
        t = t.to(dtype)
        assert all_finite(t) == bool(t.isfinite().all()), t
