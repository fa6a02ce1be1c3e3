"""Fixtures for the engine tests: published SMoLoRA checkpoint versions of the tiny LLaVA model
(`tiny_model_dir`, from tests/conftest.py) and real vLLM engines shared per session.

Engines run inside one background event-loop thread (vLLM's `AsyncLLM` keeps its output
handler task on the loop that created it), so synchronous tests drive them with
`loop.run(coro)`. Each engine starts once per session (~20 s each on 2 cores).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smolora.adapters.checkpoint import RegistryEntry
from smolora.adapters.smolora import SMoLoRAModel
from tests.server.engine.engine_testlib import LoopThread, make_adapter, publish, running_engine


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def version1(tiny_model_dir: Path, registry: Path) -> tuple[RegistryEntry, SMoLoRAModel, Any]:
    smodel, processor = make_adapter(tiny_model_dir, seed=1)
    return publish(registry, tiny_model_dir, smodel, "task1"), smodel, processor


@pytest.fixture(scope="session")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="session")
def engine(
    loop: LoopThread, tiny_model_dir: Path, version1: tuple[RegistryEntry, SMoLoRAModel, Any]
) -> Iterator[Any]:
    """The shared SMoLoRA engine: version 1 active, 2 slots, a tight token budget (128 per
    step, so staggered prompts queue up behind each other instead of all prefilling at once),
    the MLP deltas run on the overlap helper (`cpu_overlap="on"`, whatever the CPU count)."""
    yield from running_engine(
        loop,
        model_dir=tiny_model_dir,
        checkpoint=version1[0].path,
        num_slots=2,
        trace_step_routes=16,
        cpu_overlap="on",
        max_num_seqs=16,
        max_model_len=128,
        max_num_batched_tokens=128,
        kv_cache_bytes=64 * 1024 * 1024,
    )


@pytest.fixture(scope="session")
def base_engine(loop: LoopThread, tiny_model_dir: Path) -> Iterator[Any]:
    """The same model with adapters disabled and vLLM's chunked prefill on, with a budget of
    32 tokens per step so every image prompt is split across steps."""
    yield from running_engine(
        loop,
        model_dir=tiny_model_dir,
        adapters=False,
        chunked_prefill=True,
        max_num_seqs=16,
        max_model_len=128,
        max_num_batched_tokens=32,
        kv_cache_bytes=64 * 1024 * 1024,
    )


@pytest.fixture(scope="session")
def preempting_engine(
    loop: LoopThread, tiny_model_dir: Path, version1: tuple[RegistryEntry, SMoLoRAModel, Any]
) -> Iterator[Any]:
    """A SMoLoRA engine whose KV cache (256 tokens, 32-token blocks) is too small for its
    requests, so vLLM preempts running requests and later recomputes them; no overlap helper
    (the kernel adds the deltas in place)."""
    yield from running_engine(
        loop,
        model_dir=tiny_model_dir,
        checkpoint=version1[0].path,
        num_slots=1,
        trace_step_routes=32,
        cpu_overlap="off",
        max_num_seqs=16,
        max_model_len=128,
        max_num_batched_tokens=128,
        kv_cache_bytes=256 * 1024,
        extra_engine_args={"block_size": 32},
    )
