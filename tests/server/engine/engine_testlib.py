"""Helpers for the engine tests: the event-loop thread engines run on, reference adapters
with visible effect, publishing them as checkpoint versions, test workloads with their
reference (HF + `adapters/`) generations, staggered submission, and the comparison of an
engine's results with the reference."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from PIL import Image

from smolora.adapters.checkpoint import (
    CheckpointManifest,
    RegistryEntry,
    base_model_fingerprint,
    publish_checkpoint,
)
from smolora.adapters.reference_generate import (
    ReferenceRequest,
    ReferenceResult,
    generate_one_by_one,
)
from smolora.adapters.smolora import SMoLoRAConfig, SMoLoRAModel
from smolora.adapters.tiny_llava import load_llava
from smolora.server.engine.protocol import GenerateChunk, GenerateRequest

T = TypeVar("T")

#: Adapter hyper-parameters of the test checkpoints: several experts so routes differ.
ADAPTER = dict(num_experts=4, rank=16, alpha=32.0, dropout=0.0, gate_init_std=0.5)
INSTRUCTION_DIM = 384


class LoopThread:
    """An asyncio loop running in a daemon thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="engine-loop", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


def make_adapter(model_dir: Path, seed: int, **overrides: Any) -> tuple[SMoLoRAModel, Any]:
    """A reference SMoLoRA model with non-zero B (so experts visibly change outputs)."""
    model, processor = load_llava(model_dir)
    cfg = SMoLoRAConfig(**{**ADAPTER, **overrides})
    smodel = SMoLoRAModel(model, cfg, seed=seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for layer in smodel.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.5)
    return smodel, processor


def publish(registry: Path, model_dir: Path, smodel: SMoLoRAModel, task: str) -> RegistryEntry:
    """Publish a reference adapter as the registry's next version."""
    manifest = CheckpointManifest(
        adapter_kind="smolora",
        adapter_config=smodel.config.to_dict(),
        base_model={"fingerprint": base_model_fingerprint(model_dir), "name": "tiny"},
        layers=list(smodel.layers),
        tasks=[task],
    )
    return publish_checkpoint(registry, smodel.adapter_state_dict(), manifest)


def random_images(n: int, size: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def random_instructions(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(INSTRUCTION_DIM, generator=gen) for _ in range(n)]


@dataclass
class Workload:
    """Prompts, images (None for text-only) and instruction embeddings of a test batch."""

    prompts: list[str]
    images: list[Image.Image | None]
    instructions: list[torch.Tensor]
    max_tokens: list[int]

    def reference(
        self, smodel: SMoLoRAModel, processor: Any, vu_routing: str
    ) -> list[ReferenceResult]:
        """Greedy reference generations, one request at a time (as the paper's code serves)."""
        out = []
        for p, im, u, m in zip(self.prompts, self.images, self.instructions, self.max_tokens):
            out.extend(
                generate_one_by_one(
                    smodel, processor, [ReferenceRequest(p, im, u)], m, vu_routing=vu_routing
                )
            )  # type: ignore[arg-type]
        return out


def make_workload(n: int, seed: int, text_only: int = 2, image_size: int = 32) -> Workload:
    """`n` requests: varied questions, `n - text_only` with distinct images, varied lengths."""
    questions = [
        "What is in the picture?",
        "Describe the image.",
        "How many shapes are there?",
        "What color is the object?",
        "Answer with one word: what is it?",
        "Is there a cat?",
        "Write a caption.",
        "Where is the ball?",
    ]
    images = random_images(n, image_size, seed)
    images[1] = images[0]  # same image, other question and instruction: no shared projector output
    prompts: list[str] = []
    imgs: list[Image.Image | None] = []
    for i in range(n):
        q = questions[(i + seed) % len(questions)]
        if i < n - text_only:
            prompts.append(f"USER: <image>\n{q} ASSISTANT:")
            imgs.append(images[i])
        else:
            prompts.append(f"USER: {q} ASSISTANT:")
            imgs.append(None)
    return Workload(
        prompts, imgs, random_instructions(n, seed), [6 + (i * 3) % 7 for i in range(n)]
    )


def running_engine(loop: LoopThread, **config: Any) -> Iterator[Any]:
    """Start a `SMoLoRAEngine` with this `EngineConfig`, yield it, shut it down (the test
    process's environment prepared for vLLM as the serve CLI prepares its own)."""
    from smolora.server.cli import prepare_vllm_environment
    from smolora.server.engine.config import EngineConfig
    from smolora.server.engine.engine import SMoLoRAEngine

    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    prepare_vllm_environment(os.environ, config.get("tensor_parallel_size", 1))
    try:
        eng = loop.run(SMoLoRAEngine.start(EngineConfig(**config)))
    finally:  # a TP engine's binding is read at its start; later engines in this process differ
        if bind is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    yield eng
    loop.run(eng.shutdown())


def requests_for(
    w: Workload, vu_routing: str | None, version: int | None = None
) -> list[GenerateRequest]:
    return [
        GenerateRequest(
            prompt=p,
            image=im,
            instruction=u,
            max_tokens=m,
            vu_routing=vu_routing,
            version=version,  # type: ignore[arg-type]
            instruction_source="explicit",
        )
        for p, im, u, m in zip(w.prompts, w.images, w.instructions, w.max_tokens)
    ]


async def staggered(engine: Any, requests: list[GenerateRequest]) -> list[GenerateChunk]:
    """Request i is submitted once request i-1 has streamed its first token, so requests
    arrive at different engine steps and prefill next to other requests' decodes."""
    started = [asyncio.Event() for _ in requests]
    results: list[GenerateChunk | None] = [None] * len(requests)

    async def one(i: int) -> None:
        if i:
            await started[i - 1].wait()
        ids: list[int] = []
        last = None
        async for chunk in engine.generate(requests[i]):
            ids.extend(chunk.token_ids)
            if chunk.token_ids:
                started[i].set()
            last = chunk
        started[i].set()
        assert last is not None and last.finished
        last.token_ids = ids
        results[i] = last

    await asyncio.gather(*(one(i) for i in range(len(requests))))
    return results  # type: ignore[return-value]


def assert_matches_reference(
    results: list[GenerateChunk], refs: list[ReferenceResult], version: int, per_step: bool
) -> None:
    for i, (got, ref) in enumerate(zip(results, refs)):
        assert got.token_ids == ref.token_ids, f"request {i}: tokens differ"
        assert got.version == version
        trace = got.trace
        assert trace is not None and trace.exact and trace.version == version
        assert trace.routes() == [
            (r["layer"], r["vu_expert"], r["if_expert"]) for r in ref.trace
        ], f"request {i}: routes differ"
        for mine, theirs in zip(trace.layers, ref.trace):
            assert mine.w_vu == pytest.approx(theirs["w_vu"], abs=1e-4)
            assert mine.w_if == pytest.approx(theirs["w_if"], abs=1e-4)
            if per_step and not mine.layer.startswith("projector."):
                assert mine.vu_steps == ref.vu_steps[mine.layer], (
                    f"request {i}: per-step routes differ at {mine.layer}"
                )
