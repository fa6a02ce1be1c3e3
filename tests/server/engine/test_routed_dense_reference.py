"""The routed layer (`RoutedAdapter`) against a dense per-token reference computed straight
from the checkpoint tensors, without vLLM, on each of its paths (the compiled CPU kernel
built for AVX-512 where the CPU has it and built without AVX-512 as an AVX2-only CPU runs it,
and grouped matmuls): many requests on one or three checkpoint slots, a base request and
padding tokens in one decode batch, fused and single sublayers (incl. a sublayer in the second half
of a fused output), the cached plan reused across steps, a slot reloaded under the same plan
key, the kernel's specialised and generic expert ranks, and prompt steps split over threads."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from smolora.server.engine import kernel_build, overlap_helper, routed_kernel
from smolora.server.engine.config import AdapterLayout
from smolora.server.engine.kernel_config import KernelConfig
from smolora.server.engine.routed_linear import RoutedAdapter
from smolora.server.engine.row_state import RowRoutingState, StepRouting

D_IN, D_OUT, E, RANK, SLOTS = 24, 20, 4, 8, 3
D_OUT_BF16 = 40  # bf16 grouped matmuls need multiples of 8; 40 leaves the kernel a tail
SCALING = [2.0, 0.5, 1.5]
#: float32 agreement with the dense reference: the same products summed in another order (the
#: kernel's blocking, oneDNN's on this CPU); inputs are scaled x3, so terms reach ~10 and an
#: order change moves a sum by a few 1e-5 (seen on a Sapphire Rapids CPU); a wrong expert,
#: weight or fusion weight moves it by more than 1e-2.
F32_TOL = {"atol": 1e-4, "rtol": 1e-4}
#: The kernel built for AVX-512 (this CPU's native build, where it has AVX-512) and built
#: without it (what an AVX2-only CPU runs; tested on every x86 machine), and grouped matmuls.
KERNEL_PATHS = ["kernel-avx512", "kernel-avx2"]
PATHS = [*KERNEL_PATHS, "grouped"]
_KERNEL_CONFIGS = {
    "kernel-avx512": KernelConfig(isa="native"),
    "kernel-avx2": KernelConfig(isa="avx2"),
    "grouped": KernelConfig(),
}
_HAS_AVX512 = "avx512f" in (
    Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
)


@pytest.fixture(autouse=True)
def _need_kernel(request: pytest.FixtureRequest) -> None:
    """Kernel-path cases must really run the kernel: wherever a C compiler exists (CI), it
    has to build; only a machine without one skips them."""
    path = request.node.callspec.params.get("path") if hasattr(request.node, "callspec") else None
    if path in KERNEL_PATHS:
        if kernel_build.find_compiler() is None:
            pytest.skip("no C compiler: the routed CPU kernel cannot be built here")
        if path == "kernel-avx512" and not _HAS_AVX512:
            pytest.skip(
                "this CPU has no AVX-512: its native kernel build is the AVX2 one "
                "(tested as kernel-avx2)"
            )
        assert kernel_build.kernel_available(_KERNEL_CONFIGS[path]), (
            "a C compiler is present but the routed CPU kernel did not build"
        )


def _checkpoint(
    seed: int, names: list[str], d_in: int, d_out: int, rank: int = RANK
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r, h = rank // E, E // 2
    out = {}
    for name in names:
        out[f"{name}.lora_A"] = torch.randn(E, r, d_in, generator=gen) * 0.3
        out[f"{name}.lora_B"] = torch.randn(E, d_out, r, generator=gen) * 0.3
        out[f"{name}.gate_vu"] = torch.randn(h, d_in, generator=gen)
        out[f"{name}.gate_if"] = torch.randn(h, 384, generator=gen)
        out[f"{name}.fuse_vu"] = torch.randn(d_out, generator=gen)
        out[f"{name}.fuse_if"] = torch.randn(d_out, generator=gen)
    return out


def _setup(
    names: list[str],
    offsets: list[int],
    d_total: int,
    n_req: int,
    path: str = "kernel-avx2",
    rank: int = RANK,
    dtype: torch.dtype = torch.float32,
    d_out: int = D_OUT,
    kernel: KernelConfig | None = None,
) -> tuple[RoutedAdapter, RowRoutingState, list[dict[str, torch.Tensor]]]:
    layout = AdapterLayout(
        num_experts=E,
        rank=rank,
        instruction_dim=384,
        num_slots=SLOTS,
        cpu_kernel_max_tokens=10_000 if path in KERNEL_PATHS else 0,
    )
    state = RowRoutingState(layout, max_rows=n_req + 2, device=torch.device("cpu"))
    adapter = RoutedAdapter(
        layout,
        names,
        offsets,
        D_IN,
        d_out,
        d_total,
        state,
        False,
        dtype,
        kernel=kernel or _KERNEL_CONFIGS[path],
    )
    state.finalize()
    ckpts = [_checkpoint(10 + s, names, D_IN, d_out, rank) for s in range(SLOTS)]
    for s, ckpt in enumerate(ckpts):
        adapter.load_slot(s, ckpt, state)
        state.slot_scaling[s] = SCALING[s]
        state.slot_versions[s] = {"version": s + 1}
    return adapter, state, ckpts


def _join(
    state: RowRoutingState,
    adapter: RoutedAdapter,
    n_req: int,
    gen: torch.Generator,
    slots: list[int],
    dtype: torch.dtype = torch.float32,
) -> None:
    """`n_req` SMoLoRA requests (on `slots`, round robin) and one base request, then one
    packed prefill that pins their VU routes."""
    added = []
    for i in range(n_req):
        extra = {
            "smolora": {
                "key": i,
                "slot": slots[i % len(slots)],
                "instruction": torch.randn(384, generator=gen).tolist(),
            }
        }
        added.append((i, SimpleNamespace(extra_args=extra), [0] * 3, []))
    added.append((n_req, SimpleNamespace(extra_args=None), [0] * 3, []))
    state.apply_batch_update(SimpleNamespace(removed=[], moved=[], added=added))
    rows = n_req + 1
    x = (torch.randn(3 * rows, D_IN, generator=gen) * 3.0).to(dtype)
    step = state.text_step(
        torch.arange(3).repeat(rows), torch.arange(0, 3 * rows + 1, 3), rows, 3 * rows
    )
    adapter.delta(x, step)
    state.finish_step(step)


def _decode_step(state: RowRoutingState, n_req: int, pad: int) -> StepRouting:
    rows = n_req + 1
    positions = torch.cat((torch.full((rows,), 3), torch.zeros(pad, dtype=torch.long)))
    return state.text_step(positions, torch.arange(rows + 1), rows, rows, decode_only=pad == 0)


def _dense_reference(
    x: torch.Tensor,
    state: RowRoutingState,
    adapter: RoutedAdapter,
    ckpts: list[dict[str, torch.Tensor]],
    n_req: int,
    d_total: int,
    slots: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta `[N, d_total]` and fusion weights `[N, n_sub, 2]`, token by token, from the
    checkpoint tensors and the routes the row state pinned."""
    delta = torch.zeros(x.shape[0], d_total)
    fusion = torch.full((x.shape[0], adapter.n_sub, 2), 0.5)
    for t in range(n_req):  # tokens t < n_req are the SMoLoRA requests' (row t)
        slot = slots[t % len(slots)]
        for j, name in enumerate(adapter.names):
            col = adapter.columns.start + j
            hs = []
            for expert in (int(state.row_vu[t, col]), int(state.row_if[t, col])):
                a, b = ckpts[slot][f"{name}.lora_A"][expert], ckpts[slot][f"{name}.lora_B"][expert]
                hs.append(SCALING[slot] * (b @ (a @ x[t])))
            logits = torch.stack(
                (ckpts[slot][f"{name}.fuse_vu"] @ hs[0], ckpts[slot][f"{name}.fuse_if"] @ hs[1])
            )
            w = torch.softmax(logits, dim=0)
            off = adapter.out_offsets[j]
            delta[t, off : off + adapter.d_out] = w[0] * hs[0] + w[1] * hs[1]
            fusion[t, j] = w
    return delta, fusion


def _count_binds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the token count of every `RoutedKernel.bind` (each kernel step layout), binding
    as usual."""
    tokens: list[int] = []
    real = routed_kernel.RoutedKernel.bind
    monkeypatch.setattr(
        routed_kernel.RoutedKernel,
        "bind",
        lambda self, slot, *a: (tokens.append(slot.shape[0]), real(self, slot, *a))[1],
    )
    return tokens


@pytest.mark.parametrize(
    ("names", "offsets", "d_total"),
    [
        (
            ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"],
            [0, D_OUT],
            2 * D_OUT,
        ),  # fused gate_up
        (["layers.0.mlp.up_proj"], [D_OUT], 2 * D_OUT),  # up only, second half
        (["layers.0.mlp.down_proj"], [0], D_OUT),
    ],
)
@pytest.mark.parametrize(("slots", "n_req"), [([0, 1, 2], 12), ([1], 24)])
@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("path", PATHS)
def test_decode_batch_matches_dense_reference(
    names: list[str],
    offsets: list[int],
    d_total: int,
    slots: list[int],
    n_req: int,
    pad: int,
    path: str,
) -> None:
    adapter, state, ckpts = _setup(names, offsets, d_total, n_req, path)
    gen = torch.Generator().manual_seed(5)
    _join(state, adapter, n_req, gen, slots)
    col = adapter.columns.start
    routes = {
        (slots[i % len(slots)], int(state.row_vu[i, col]), int(state.row_if[i, col]))
        for i in range(n_req)
    }
    assert len(routes) >= 4, "routes should differ across requests for this test to mean something"

    x = torch.randn(n_req + 1 + pad, D_IN, generator=gen) * 3.0
    step = _decode_step(state, n_req, pad)
    assert step.plan_key is not None  # a cacheable decode step
    got = adapter.delta(x, step)
    fusion = step.fusion[:, adapter.columns].clone()
    for _ in range(2):  # the cached plan gives the same result again
        torch.testing.assert_close(adapter.delta(x, step), got, rtol=0, atol=0)

    want, want_fusion = _dense_reference(x, state, adapter, ckpts, n_req, d_total, slots)
    torch.testing.assert_close(got, want, **F32_TOL)
    assert torch.equal(got[n_req:], torch.zeros(1 + pad, d_total))  # base request and padding
    torch.testing.assert_close(fusion[:n_req], want_fusion[:n_req], **F32_TOL)


@pytest.mark.parametrize("path", PATHS)
def test_reloaded_slot_is_seen_under_the_same_plan_key(path: str) -> None:
    """Loading a slot drops the cached plan (it holds copies of slot-derived values)."""
    names = ["layers.0.mlp.down_proj"]
    n_req = 6
    adapter, state, ckpts = _setup(names, [0], D_OUT, n_req, path)
    gen = torch.Generator().manual_seed(9)
    _join(state, adapter, n_req, gen, [0, 1, 2])
    x = torch.randn(n_req + 1, D_IN, generator=gen)
    step = _decode_step(state, n_req, 0)
    before = adapter.delta(x, step)
    new = _checkpoint(99, names, D_IN, D_OUT)
    new[f"{names[0]}.gate_if"] = ckpts[1][f"{names[0]}.gate_if"]  # same IF routes as before
    adapter.load_slot(1, new, state)
    ckpts[1] = new
    after = adapter.delta(x, step)
    want, _ = _dense_reference(x, state, adapter, ckpts, n_req, D_OUT, [0, 1, 2])
    torch.testing.assert_close(after, want, **F32_TOL)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize(
    "rank", [32, 64, 128, 48]
)  # expert ranks 8, 16, 32 (specialised) and 12 (generic)
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_kernel_ranks_match_dense_reference(
    rank: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names, offsets, d_total = (
        ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"],
        [0, D_OUT],
        2 * D_OUT,
    )
    calls = _count_binds(monkeypatch)
    n_req, slots = 10, [0, 2]
    adapter, state, ckpts = _setup(names, offsets, d_total, n_req, path, rank)
    gen = torch.Generator().manual_seed(rank)
    _join(state, adapter, n_req, gen, slots)
    x = torch.randn(n_req + 1, D_IN, generator=gen) * 3.0
    got = adapter.delta(x, _decode_step(state, n_req, 0))
    want, _ = _dense_reference(x, state, adapter, ckpts, n_req, d_total, slots)
    torch.testing.assert_close(got, want, **F32_TOL)
    assert calls == [3 * (n_req + 1), n_req + 1], (
        "both the prompt step and the decode step ran the kernel"
    )


@pytest.mark.parametrize(
    "rank", [64, 48, 96]
)  # expert ranks 16, 12 (zero-padded to 16 in bf16) and 24 (generic)
@pytest.mark.parametrize("path", PATHS)
def test_bfloat16_layer_matches_dense_reference(
    rank: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bfloat16 model: the layer stores the experts in bfloat16, and its output is the
    base output plus the dense reference's delta (computed in float32 from the bfloat16
    values it multiplies with), rounded to bfloat16. The kernel path is within one rounding
    of it (only the float32 summation order differs); grouped matmuls, which round their
    products to bfloat16 on the way, within a few bf16 steps of the largest delta."""
    names, offsets, d_total = (
        ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"],
        [0, D_OUT_BF16],
        2 * D_OUT_BF16,
    )
    calls = _count_binds(monkeypatch)
    n_req, slots = 10, [0, 2]
    adapter, state, ckpts = _setup(
        names, offsets, d_total, n_req, path, rank, dtype=torch.bfloat16, d_out=D_OUT_BF16
    )
    assert adapter.lora_a.dtype == adapter.lora_b.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(rank)
    _join(state, adapter, n_req, gen, slots, dtype=torch.bfloat16)
    col = adapter.columns.start
    assert (
        len(
            {
                (slots[i % 2], int(state.row_vu[i, col]), int(state.row_if[i, col]))
                for i in range(n_req)
            }
        )
        >= 4
    )
    x = (torch.randn(n_req + 1, D_IN, generator=gen) * 3.0).to(torch.bfloat16)
    base = torch.randn(n_req + 1, d_total, generator=gen).to(torch.bfloat16)
    got = adapter.add_delta(x, base.clone(), _decode_step(state, n_req, 0))
    stored = [
        {
            k: (v.to(torch.bfloat16).float() if k.endswith(("lora_A", "lora_B")) else v)
            for k, v in c.items()
        }
        for c in ckpts
    ]
    delta, _ = _dense_reference(x.float(), state, adapter, stored, n_req, d_total, slots)
    want = (base.float() + delta).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and bool((want != base).any())
    if path in KERNEL_PATHS:  # one rounding of y + delta: at most one bf16 step apart
        torch.testing.assert_close(got.float(), want.float(), rtol=2.0**-7, atol=2.0**-7)
    else:  # products rounded to bf16 on the way: errors scale with the delta, not with y + delta
        torch.testing.assert_close(
            got.float(), want.float(), rtol=2.0**-5, atol=2.0**-5 * float(delta.abs().max())
        )
    assert calls == ([3 * (n_req + 1), n_req + 1] if path in KERNEL_PATHS else []), (
        "the kernel path ran the kernel, the grouped path did not"
    )


def test_kernel_and_grouped_paths_agree_on_a_prompt_step_split_over_threads(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """A prompt step run on three OpenMP threads (experts split for A, output columns for B):
    the kernel pins the same VU routes and adds the same delta as grouped matmuls."""
    if kernel_build.find_compiler() is None:
        pytest.skip("no C compiler: the routed CPU kernel cannot be built here")
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # the kernel runs on torch's OpenMP threads
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    names, offsets, d_total = (
        ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"],
        [0, D_OUT],
        2 * D_OUT,
    )
    n_req, prompt = 9, 7
    results = {}
    paths = PATHS if _HAS_AVX512 else ["kernel-avx2", "grouped"]
    for path in paths:
        threaded = KernelConfig(
            isa=_KERNEL_CONFIGS[path].isa, min_parallel_work=0
        )  # every call on the threads
        adapter, state, _ = _setup(names, offsets, d_total, n_req, path, kernel=threaded)
        gen = torch.Generator().manual_seed(3)
        added = [
            (
                i,
                SimpleNamespace(
                    extra_args={
                        "smolora": {
                            "key": i,
                            "slot": i % SLOTS,
                            "instruction": torch.randn(384, generator=gen).tolist(),
                        }
                    }
                ),
                [0] * prompt,
                [],
            )
            for i in range(n_req)
        ]
        state.apply_batch_update(SimpleNamespace(removed=[], moved=[], added=added))
        x = torch.randn(prompt * n_req, D_IN, generator=gen) * 3.0
        step = state.text_step(
            torch.arange(prompt).repeat(n_req),
            torch.arange(0, prompt * n_req + 1, prompt),
            n_req,
            prompt * n_req,
        )
        delta = adapter.delta(x, step)
        results[path] = (delta, state.row_vu[:n_req].clone(), step.fusion.clone())
    dg, vg, fg = results.pop("grouped")
    for dk, vk, fk in results.values():
        assert torch.equal(vk, vg)
        assert len({tuple(r.tolist()) for r in vk}) > 1, "routes should differ across requests"
        torch.testing.assert_close(dk, dg, **F32_TOL)
        torch.testing.assert_close(fk, fg, **F32_TOL)


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_steady_decode_binds_the_kernel_once_and_reads_each_steps_input(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steady decoding reuses one step layout; the kernel is bound to its routes once, and
    every later step's new activations still get their own, correct delta."""
    names, offsets, d_total = (
        ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"],
        [0, D_OUT],
        2 * D_OUT,
    )
    binds = _count_binds(monkeypatch)
    n_req, slots = 8, [0, 1]
    adapter, state, ckpts = _setup(names, offsets, d_total, n_req, path)
    gen = torch.Generator().manual_seed(21)
    _join(state, adapter, n_req, gen, slots)
    binds.clear()
    first = _decode_step(state, n_req, 0)
    for _ in range(3):
        step = _decode_step(state, n_req, 0)
        assert step is first  # vLLM's batch did not change: the same layout is reused
        x = torch.randn(n_req + 1, D_IN, generator=gen) * 3.0
        got = adapter.delta(x, step)
        want, _ = _dense_reference(x, state, adapter, ckpts, n_req, d_total, slots)
        torch.testing.assert_close(got, want, **F32_TOL)
        state.finish_step(step)
    assert binds == [n_req + 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_overlapped_layer_matches_the_in_place_kernel(
    dtype: torch.dtype, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an overlap helper, the layer's delta starts before the base matmul
    (`begin_delta`) and is added after it (`end_delta`): on the prompt step (which pins the
    routes) and on three reused decode steps it gives the same routes, fusion weights and
    outputs as `add_delta` on a layer without helper (bit for bit in bfloat16; in float32
    the two experts' sum is added at once, so within rounding), and the dense reference's
    delta. Each step binds the kernel once."""
    names, offsets, d_total = (
        ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"],
        [0, D_OUT_BF16],
        2 * D_OUT_BF16,
    )
    n_req, slots = 8, [0, 1]
    helper = overlap_helper.OverlapHelper(overlap_helper.spare_cpus(), _KERNEL_CONFIGS[path])
    binds = _count_binds(monkeypatch)
    try:
        layers = {}
        for overlap in (None, helper):
            layout = AdapterLayout(num_experts=E, rank=RANK, instruction_dim=384, num_slots=SLOTS)
            state = RowRoutingState(layout, max_rows=n_req + 2, device=torch.device("cpu"))
            adapter = RoutedAdapter(
                layout,
                names,
                offsets,
                D_IN,
                D_OUT_BF16,
                d_total,
                state,
                False,
                dtype,
                overlap,
                _KERNEL_CONFIGS[path],
            )
            state.finalize()
            ckpts = [_checkpoint(10 + s, names, D_IN, D_OUT_BF16) for s in range(SLOTS)]
            for s, ckpt in enumerate(ckpts):
                adapter.load_slot(s, ckpt, state)
                state.slot_scaling[s] = SCALING[s]
                state.slot_versions[s] = {"version": s + 1}
            layers[overlap is not None] = (adapter, state, ckpts)
        outs: dict[bool, list[torch.Tensor]] = {False: [], True: []}
        for overlapped, (adapter, state, ckpts) in layers.items():
            gen = torch.Generator().manual_seed(17)
            added = [
                (
                    i,
                    SimpleNamespace(
                        extra_args={
                            "smolora": {
                                "key": i,
                                "slot": slots[i % 2],
                                "instruction": torch.randn(384, generator=gen).tolist(),
                            }
                        }
                    ),
                    [0] * 3,
                    [],
                )
                for i in range(n_req)
            ]
            state.apply_batch_update(SimpleNamespace(removed=[], moved=[], added=added))
            steps = [
                state.text_step(
                    torch.arange(3).repeat(n_req),
                    torch.arange(0, 3 * n_req + 1, 3),
                    n_req,
                    3 * n_req,
                )
            ]
            for i in range(4):
                x = (torch.randn(steps[-1].token_row.shape[0], D_IN, generator=gen) * 3.0).to(dtype)
                base = torch.randn(x.shape[0], d_total, generator=gen).to(dtype)
                step = steps[-1]
                if overlapped:
                    pending = adapter.begin_delta(x, step)
                    assert pending is not None and pending.submitted
                    y = adapter.end_delta(pending, x, base.clone(), step)
                else:
                    y = adapter.add_delta(x, base.clone(), step)
                outs[overlapped] += [
                    y,
                    step.fusion[:, adapter.columns].clone(),
                    state.row_vu[:n_req].clone(),
                ]
                if i:  # decode steps: token t is request t's
                    stored = [
                        {
                            k: (v.to(dtype).float() if k.endswith(("lora_A", "lora_B")) else v)
                            for k, v in c.items()
                        }
                        for c in ckpts
                    ]
                    want, _ = _dense_reference(
                        x.float(), state, adapter, stored, n_req, d_total, slots
                    )
                    tol = 2.0**-7 if dtype == torch.bfloat16 else F32_TOL["atol"]
                    torch.testing.assert_close(
                        y.float(), (base.float() + want).to(dtype).float(), rtol=tol, atol=tol
                    )
                state.finish_step(step)
                steps.append(_decode_step(state, n_req - 1, 0) if i == 0 else steps[-1])
        exact = dtype == torch.bfloat16
        for a, b in zip(outs[False], outs[True]):
            torch.testing.assert_close(b, a, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-5)
        assert len({tuple(r.tolist()) for r in outs[True][2]}) > 1, (
            "routes should differ across requests"
        )
        assert binds == [3 * n_req, n_req] * 2, (
            "one bind per step layout, with and without the helper"
        )
        assert helper.counts()[0] + helper.counts()[1] == 4
    finally:
        helper.close()
