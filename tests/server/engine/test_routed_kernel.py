"""Building, caching and refusing the routed CPU kernel (`kernel_build.py`,
`routed_kernel.py`, `overlap_helper.py`). Its numerics are tested against the dense reference
in `test_routed_dense_reference.py`."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from smolora.server.engine import kernel_build, overlap_helper, routed_kernel
from smolora.server.engine.kernel_config import KernelConfig, KernelConfigError


@pytest.fixture(autouse=True)
def _fresh_kernel_cache() -> Iterator[None]:
    kernel_build.load_kernel.cache_clear()
    yield
    kernel_build.load_kernel.cache_clear()  # later tests load the kernel from their own environment


def test_builds_once_into_the_cache_dir(tmp_path: Path) -> None:
    if kernel_build.find_compiler() is None:
        pytest.skip("no C compiler here")
    config = KernelConfig(cache_dir=str(tmp_path))
    assert kernel_build.load_kernel(config) is not None
    built = list(tmp_path.glob("routed_delta-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernel_build.load_kernel.cache_clear()  # a new process: finds the build, does not rebuild
    assert kernel_build.load_kernel(config) is not None
    assert built[0].stat().st_mtime_ns == stamp and list(tmp_path.glob("*")) == built


def test_no_compiler_means_the_torch_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = KernelConfig(cache_dir=str(tmp_path))
    monkeypatch.setattr(kernel_build.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=kernel_build.__name__):
        assert kernel_build.load_kernel(config) is None
    assert "no C compiler" in caplog.text
    assert not kernel_build.kernel_available(config)
    with pytest.raises(RuntimeError, match="not available"):
        routed_kernel.RoutedKernel(
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, 1, 2, 4, 8),
            torch.zeros(1, 1, 2, 8, 4),
            torch.zeros(1, 1, 2, 8),
            config=config,
        )


def test_a_failing_build_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = KernelConfig(
        cache_dir=str(tmp_path), compiler="false"
    )  # prints a version of nothing and fails
    with caplog.at_level(logging.WARNING, logger=kernel_build.__name__):
        assert kernel_build.load_kernel(config) is None
    assert "routed CPU kernel unavailable" in caplog.text
    assert not list(tmp_path.glob("*.so"))


def test_disabled_by_config() -> None:
    assert kernel_build.load_kernel(KernelConfig(enabled=False)) is None


def test_config_from_the_command_line_environment() -> None:
    env = {
        "SMOLORA_CPU_KERNEL": "0",
        "SMOLORA_KERNEL_ISA": "avx2",
        "SMOLORA_KERNEL_PARALLEL_WORK": "7",
        "SMOLORA_KERNEL_CACHE": "/tmp/k",
        "CC": "gcc",
    }
    assert KernelConfig.from_environ(env) == KernelConfig(
        enabled=False, isa="avx2", min_parallel_work=7, cache_dir="/tmp/k", compiler="gcc"
    )
    assert KernelConfig.from_environ({"SMOLORA_KERNEL_ISA": "avx2"}, isa="native").isa == "native"
    assert KernelConfig.from_environ({}) == KernelConfig()
    with pytest.raises(KernelConfigError, match="isa"):
        KernelConfig.from_environ({"SMOLORA_KERNEL_ISA": "avx9"})
    with pytest.raises(KernelConfigError, match="unknown kernel config keys"):
        KernelConfig.from_dict({"isa": "avx2", "threads": 2})


def _zmm_instructions(lib_path: Path) -> int:
    text = subprocess.run(
        ["objdump", "-d", str(lib_path)], capture_output=True, text=True, check=True
    ).stdout
    return sum("%zmm" in line for line in text.splitlines())


@pytest.mark.skipif(
    shutil.which("objdump") is None, reason="objdump (binutils) is needed to read the build"
)
def test_avx2_build_has_no_avx512_instructions_and_native_uses_them_where_present(
    tmp_path: Path,
) -> None:
    """The AVX2 build is the code an AVX2-only CPU runs: not one AVX-512 (zmm) instruction."""
    if kernel_build.find_compiler() is None:
        pytest.skip("no C compiler here")
    avx2 = KernelConfig(isa="avx2", cache_dir=str(tmp_path / "avx2"))
    assert kernel_build.load_kernel(avx2) is not None
    (built,) = (tmp_path / "avx2").glob("routed_delta-avx2-*.so")
    assert _zmm_instructions(built) == 0
    assert "-mno-avx512f" in kernel_build.build_flags(avx2)
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX-512: the native build is the AVX2 build")
    native = KernelConfig(cache_dir=str(tmp_path / "native"))
    assert kernel_build.load_kernel(native) is not None
    (built_native,) = (tmp_path / "native").glob("routed_delta-native-*.so")
    assert _zmm_instructions(built_native) > 0


def test_rank_above_the_stack_buffer_is_refused() -> None:
    if kernel_build.find_compiler() is None:
        pytest.skip("no C compiler here")
    rp = kernel_build.MAX_RANK + 4
    with pytest.raises(ValueError, match="exceeds"):
        routed_kernel.RoutedKernel(
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, 1, 2, 4, rp),
            torch.zeros(1, 1, 2, rp, 4),
            torch.zeros(1, 1, 2, rp),
        )


def test_row_sums_match_index_add() -> None:
    """The prompt-mean sums skip zero-weight tokens and equal torch's index_add_, including
    a strided input (a column slice) and rows that get no token."""
    if kernel_build.find_compiler() is None:
        pytest.skip("no C compiler here")
    gen = torch.Generator().manual_seed(0)
    kernel = routed_kernel.RoutedKernel(
        torch.zeros(1, dtype=torch.long),
        torch.zeros(1, 1, 2, 24, 8),
        torch.zeros(1, 1, 2, 8, 4),
        torch.zeros(1, 1, 2, 8),
    )
    x = torch.randn(50, 40, generator=gen)[:, 3:27]  # [50, 24], row stride 40
    row = torch.sort(torch.randint(0, 5, (50,), generator=gen)).values  # rows 0..4 of 7
    weight = (torch.rand(50, generator=gen) < 0.7).float() * 2.0
    expected = torch.zeros(7, 24).index_add_(0, row, x * weight[:, None])
    got = kernel.row_sums(x, row, weight, 7)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[5:], torch.zeros(2, 24))
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.row_sums(x, torch.full((50,), 9), weight, 7)


def _kernel_case(dtype: torch.dtype, seed: int = 0, sub_rows: tuple[int, ...] = (0, 1)) -> dict:
    """A fused linear of two sublayers, `sub_rows` of them adapted (4 experts, 2 slots), and a
    batch of 9 tokens: one without adapter, widths with vector tails (d_in 40, d_out 36), x a
    strided column slice."""
    gen = torch.Generator().manual_seed(seed)
    s, n_sub, e, d_in, rp, d_out, n = 2, len(sub_rows), 4, 40, 16, 36, 9
    a = (torch.randn(s, n_sub, e, d_in, rp, generator=gen) * 0.3).to(dtype)
    b = (torch.randn(s, n_sub, e, rp, d_out, generator=gen) * 0.3).to(dtype)
    fuse = torch.randn(s, n_sub, e, rp, generator=gen)
    x = (torch.randn(n, d_in + 5, generator=gen) * 2.0).to(dtype)[:, 2 : 2 + d_in]
    y = torch.randn(n, 2 * d_out, generator=gen).to(dtype)
    scale = torch.full((n,), 1.5)
    scale[4] = 0.0  # a token without adapter: its outputs stay as they are
    return dict(
        sub_row=torch.tensor(sub_rows),
        a=a,
        b=b,
        fuse=fuse,
        x=x,
        y=y,
        tok_slot=torch.randint(0, s, (n,), generator=gen),
        tok_scale=scale,
        tok_vu=torch.randint(0, e // 2, (n, n_sub), generator=gen),
        tok_if=torch.randint(e // 2, e, (n, n_sub), generator=gen),
    )


def _run(
    kernel: routed_kernel.RoutedKernel, c: dict, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    fusion = torch.zeros(x.shape[0], c["sub_row"].numel(), 2)
    kernel(x, y, c["tok_slot"], c["tok_scale"], c["tok_vu"], c["tok_if"], fusion, fusion.stride(0))
    return fusion


@pytest.mark.parametrize("sub_rows", [(0, 1), (0,), (1,)])  # gate+up, gate only, up only
def test_bfloat16_kernel_is_the_float32_kernel_rounded_once(sub_rows: tuple[int, ...]) -> None:
    """For a bfloat16 model the kernel widens the experts and x exactly, does the float32
    kernel's arithmetic in the same order, and rounds each output once: bit for bit,
    `bf16(y + delta)` with delta from the float32 kernel on the widened tensors and torch's
    rounding (nearest even; NaN stays NaN; tokens without adapter and sublayers without
    experts are left untouched)."""
    if kernel_build.find_compiler() is None:
        pytest.skip("no C compiler here")
    c = _kernel_case(torch.bfloat16, sub_rows=sub_rows)
    c["y"][2, 7] = float("nan")
    k16 = routed_kernel.RoutedKernel(c["sub_row"], c["a"], c["b"], c["fuse"])
    k32 = routed_kernel.RoutedKernel(c["sub_row"], c["a"].float(), c["b"].float(), c["fuse"])
    delta = torch.zeros(c["y"].shape)
    fusion32 = _run(k32, c, c["x"].float(), delta)
    got = c["y"].clone()
    fusion16 = _run(k16, c, c["x"], got)
    want = (c["y"].float() + delta).to(torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got[4], c["y"][4]) and bool(delta.abs().sum() > 0)
    for half in {0, 1} - set(sub_rows):  # the sublayer without experts
        cols = slice(half * 36, (half + 1) * 36)
        torch.testing.assert_close(got[:, cols], c["y"][:, cols], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fusion16, fusion32, rtol=0, atol=0)


def test_kernel_refuses_mismatched_dtypes() -> None:
    if kernel_build.find_compiler() is None:
        pytest.skip("no C compiler here")
    c = _kernel_case(torch.bfloat16)
    with pytest.raises(ValueError, match="lora_a/lora_b"):
        routed_kernel.RoutedKernel(c["sub_row"], c["a"].half(), c["b"].half(), c["fuse"])
    with pytest.raises(ValueError, match="lora_a/lora_b"):
        routed_kernel.RoutedKernel(c["sub_row"], c["a"], c["b"].float(), c["fuse"])
    k16 = routed_kernel.RoutedKernel(c["sub_row"], c["a"], c["b"], c["fuse"])
    with pytest.raises(ValueError, match="built for torch.bfloat16"):
        _run(k16, c, c["x"].float(), c["y"].float())


def test_bfloat16_calls_in_token_chunks_give_the_same_bits() -> None:
    """A bf16 step with more tokens than the scratch budget allows runs in chunks (here 2
    tokens, 5 chunks): outputs and fusion weights are identical to one call."""
    if kernel_build.find_compiler() is None:
        pytest.skip("no C compiler here")
    c = _kernel_case(torch.bfloat16, seed=4)
    whole = routed_kernel.RoutedKernel(c["sub_row"], c["a"], c["b"], c["fuse"])
    chunked = routed_kernel.RoutedKernel(
        c["sub_row"], c["a"], c["b"], c["fuse"], max_scratch_bytes=2 * 4 * 72
    )
    assert chunked.chunk_tokens == 2 and whole.chunk_tokens is not None and whole.chunk_tokens >= 9
    assert (
        routed_kernel.RoutedKernel(
            c["sub_row"], c["a"].float(), c["b"].float(), c["fuse"]
        ).chunk_tokens
        is None
    )
    y1, y2 = c["y"].clone(), c["y"].clone()
    f1, f2 = _run(whole, c, c["x"], y1), _run(chunked, c, c["x"], y2)
    assert torch.equal(y1, y2) and torch.equal(f1, f2)
    assert not torch.equal(y1, c["y"])


@pytest.fixture
def helper() -> Iterator[overlap_helper.OverlapHelper]:
    if kernel_build.find_compiler() is None:
        pytest.skip("no C compiler here")
    h = overlap_helper.OverlapHelper(overlap_helper.spare_cpus())
    yield h
    h.close()


def _bind(
    kernel: routed_kernel.RoutedKernel, c: dict
) -> tuple[routed_kernel.BoundStep, torch.Tensor]:
    fusion = torch.zeros(c["x"].shape[0], c["sub_row"].numel(), 2)
    return kernel.bind(
        c["tok_slot"], c["tok_scale"], c["tok_vu"], c["tok_if"], fusion, fusion.stride(0)
    ), fusion


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sub_rows", [(0, 1), (1,)])
def test_overlap_helper_adds_the_kernels_delta(
    helper: overlap_helper.OverlapHelper, dtype: torch.dtype, sub_rows: tuple[int, ...]
) -> None:
    """A step run on the overlap helper (submit, then finish into y) adds exactly the delta
    the kernel computes: float32 `y + delta` with delta the in-place call's on zeros (the
    in-place call adds the two experts to y one after the other, so it may differ from this
    in the last bit), bfloat16 bit for bit the in-place call. Fusion weights are identical;
    the token without adapter and the sublayer without experts are untouched. Whether the
    helper or the caller ran the job does not change a bit."""
    c = _kernel_case(dtype, seed=7, sub_rows=sub_rows)
    plain = routed_kernel.RoutedKernel(c["sub_row"], c["a"], c["b"], c["fuse"])
    overlapped = routed_kernel.RoutedKernel(c["sub_row"], c["a"], c["b"], c["fuse"], helper=helper)
    inplace = c["y"].clone()
    fusion_inplace = _run(plain, c, c["x"], inplace)
    if dtype == torch.float32:
        delta = torch.zeros_like(c["y"])
        _run(plain, c, c["x"], delta)
        want = c["y"] + delta
    else:
        want = inplace
    step, fusion = _bind(overlapped, c)
    assert step.overlaps and not _bind(plain, c)[0].overlaps
    results = []
    for round_ in range(
        40
    ):  # finish at once (the caller mostly runs the job) or after 2 ms (the helper does)
        got = c["y"].clone()
        step.submit(c["x"])
        if round_ % 2:
            time.sleep(0.002)
        step.finish(got)
        results.append(got)
    ran_by_helper, ran_by_caller = helper.counts()
    assert ran_by_helper + ran_by_caller == 40
    if len(os.sched_getaffinity(0)) > 1:
        assert ran_by_helper > 0, "the helper never picked up a job while the caller slept"
    for got in results:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(fusion, fusion_inplace, rtol=0, atol=0)
    assert torch.equal(results[0][4], c["y"][4])
    for half in {0, 1} - set(sub_rows):
        cols = slice(half * 36, (half + 1) * 36)
        assert torch.equal(results[0][:, cols], c["y"][:, cols])


def test_overlap_helper_drains_an_abandoned_job(helper: overlap_helper.OverlapHelper) -> None:
    """A caller that fails between submit and finish (its base matmul raised) leaves a job
    behind: the next submit, or `drain()` (the model calls it after every forward), waits
    for it and drops its result."""
    c = _kernel_case(torch.float32, seed=8)
    kernel = routed_kernel.RoutedKernel(c["sub_row"], c["a"], c["b"], c["fuse"], helper=helper)
    step, _ = _bind(kernel, c)
    want = c["y"].clone()
    step.submit(c["x"])
    step.finish(want)
    step.submit(c["x"])  # abandoned
    step.submit(c["x"])
    got = c["y"].clone()
    step.finish(got)
    assert torch.equal(got, want)
    step.submit(c["x"])  # abandoned again
    helper.drain()
    helper.drain()  # nothing pending: a no-op
    step.submit(c["x"])
    again = c["y"].clone()
    step.finish(again)
    assert torch.equal(again, want)
    with pytest.raises(RuntimeError, match="no job"):
        step.finish(again)
    step.submit(c["x"])
    with pytest.raises(
        ValueError, match="got y torch.float64"
    ):  # a wrong output: the job is dropped
        step.finish(again.double())
    step.submit(c["x"])
    step.finish(again := c["y"].clone())
    assert torch.equal(again, want)


def test_overlap_helper_takes_steps_up_to_the_scratch_budget(
    helper: overlap_helper.OverlapHelper,
) -> None:
    c = _kernel_case(torch.float32, seed=9)  # 9 tokens x 72 columns of float32 delta
    small = routed_kernel.RoutedKernel(
        c["sub_row"], c["a"], c["b"], c["fuse"], max_scratch_bytes=8 * 4 * 72, helper=helper
    )
    big = routed_kernel.RoutedKernel(
        c["sub_row"], c["a"], c["b"], c["fuse"], max_scratch_bytes=9 * 4 * 72, helper=helper
    )
    assert not _bind(small, c)[0].overlaps and _bind(big, c)[0].overlaps


def test_overlap_helper_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "off" never starts one; "auto" only for a single-threaded worker with a CPU to spare."""
    if kernel_build.find_compiler() is None:
        pytest.skip("no C compiler here")
    assert overlap_helper.start_overlap_helper("off") is None
    monkeypatch.setattr(overlap_helper, "spare_cpus", lambda: ())
    assert overlap_helper.start_overlap_helper("auto") is None
    on = overlap_helper.start_overlap_helper("on")
    assert on is not None and on.cpus == ()
    on.close()
    monkeypatch.setattr(overlap_helper, "spare_cpus", lambda: (0,))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert overlap_helper.start_overlap_helper("auto") is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    auto = overlap_helper.start_overlap_helper("auto")
    assert auto is not None and auto.cpus == (0,)
    auto.close()
