"""Building, caching and refusing the routed CPU kernel (`cpu_kernel.py`). Its numerics are
tested against the dense reference in `test_routed_dense_reference.py`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from smolora.server.engine import cpu_kernel


@pytest.fixture(autouse=True)
def _fresh_kernel_cache() -> Iterator[None]:
    cpu_kernel.load_kernel.cache_clear()
    yield
    cpu_kernel.load_kernel.cache_clear()  # later tests load the kernel from their own environment


def test_builds_once_into_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if cpu_kernel.find_compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("SMOLORA_KERNEL_CACHE", str(tmp_path))
    assert cpu_kernel.load_kernel() is not None
    built = list(tmp_path.glob("routed_delta-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_kernel.load_kernel.cache_clear()  # a new process: finds the build, does not rebuild
    assert cpu_kernel.load_kernel() is not None
    assert built[0].stat().st_mtime_ns == stamp and list(tmp_path.glob("*")) == built


def test_no_compiler_means_the_torch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SMOLORA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        assert cpu_kernel.load_kernel() is None
    assert "no C compiler" in caplog.text
    assert not cpu_kernel.kernel_available()
    with pytest.raises(RuntimeError, match="not available"):
        cpu_kernel.RoutedKernel(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 2, 4, 8), torch.zeros(1, 1, 2, 8, 4), torch.zeros(1, 1, 2, 8))


def test_a_failing_build_is_reported_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SMOLORA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that prints a version of nothing and fails
    with caplog.at_level(logging.WARNING, logger=cpu_kernel.__name__):
        assert cpu_kernel.load_kernel() is None
    assert "routed CPU kernel unavailable" in caplog.text
    assert not list(tmp_path.glob("*.so"))


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOLORA_CPU_KERNEL", "0")
    assert cpu_kernel.load_kernel() is None


def test_rank_above_the_stack_buffer_is_refused() -> None:
    if cpu_kernel.find_compiler() is None:
        pytest.skip("no C compiler here")
    rp = cpu_kernel.MAX_RANK + 4
    with pytest.raises(ValueError, match="exceeds"):
        cpu_kernel.RoutedKernel(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 2, 4, rp), torch.zeros(1, 1, 2, rp, 4), torch.zeros(1, 1, 2, rp))


def test_row_sums_match_index_add() -> None:
    """The prompt-mean sums skip zero-weight tokens and equal torch's index_add_, including
    a strided input (a column slice) and rows that get no token."""
    if cpu_kernel.find_compiler() is None:
        pytest.skip("no C compiler here")
    gen = torch.Generator().manual_seed(0)
    kernel = cpu_kernel.RoutedKernel(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 2, 24, 8),
                                     torch.zeros(1, 1, 2, 8, 4), torch.zeros(1, 1, 2, 8))
    x = torch.randn(50, 40, generator=gen)[:, 3:27]                       # [50, 24], row stride 40
    row = torch.sort(torch.randint(0, 5, (50,), generator=gen)).values   # rows 0..4 of 7
    weight = (torch.rand(50, generator=gen) < 0.7).float() * 2.0
    expected = torch.zeros(7, 24).index_add_(0, row, x * weight[:, None])
    got = kernel.row_sums(x, row, weight, 7)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[5:], torch.zeros(2, 24))
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.row_sums(x, torch.full((50,), 9), weight, 7)
