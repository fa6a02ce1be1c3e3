"""Stop strings and version unloading in the real vLLM engine (the shared `engine` fixture).

- A stop string ends the request inside the engine: finish_reason "stop", text cut right
  before the stop string, token ids a prefix of the unstopped run, and the routing trace
  present with the same routes as the unstopped run (routes are pinned at prefill).
- Unloading frees a version's slot: refused for the active version and while a request is
  pinned to it; afterwards the version is gone (requests for it are refused, the worker
  forgets the slot) and the freed slot takes the next load.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from smolora.server.engine.engine import collect
from smolora.server.engine.protocol import (
    GenerateChunk,
    GenerateRequest,
    InvalidRequestError,
    VersionInUseError,
    VersionNotResidentError,
)
from tests.server.engine.engine_testlib import LoopThread, make_adapter, make_workload, publish

pytestmark = pytest.mark.engine


def _request(w: Any, i: int = 0, **kw: Any) -> GenerateRequest:
    return GenerateRequest(
        prompt=w.prompts[i], image=w.images[i], instruction=w.instructions[i], **kw
    )


def test_stop_string_finishes_in_the_engine_with_a_trace(loop: LoopThread, engine: Any) -> None:
    w = make_workload(2, seed=71, text_only=0)
    full = loop.run(collect(engine, _request(w, max_tokens=24, ignore_eos=True)))
    assert full.finish_reason == "length" and len(full.text) > 6
    # A stop string that first occurs a few characters in (the text of a random model is arbitrary).
    start = next(
        i
        for i in range(2, len(full.text) - 2)
        if full.text[i : i + 2].strip() and full.text.find(full.text[i : i + 2]) == i
    )
    stop = full.text[start : start + 2]
    cut = loop.run(
        collect(engine, _request(w, max_tokens=24, ignore_eos=True, stop=[stop, "\x00never"]))
    )
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:start]  # truncated before the stop string, which is not included
    assert (
        0 < len(cut.token_ids) < len(full.token_ids)
        and cut.token_ids == full.token_ids[: len(cut.token_ids)]
    )
    assert cut.trace is not None and cut.trace.version == cut.version == full.version
    assert cut.trace.routes() == full.trace.routes()


def test_more_than_four_stop_strings_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="at most 4"):
        GenerateRequest(prompt="USER: hi ASSISTANT:", stop=["a", "b", "c", "d", "e"])
    with pytest.raises(InvalidRequestError):
        GenerateRequest(prompt="USER: hi ASSISTANT:", stop=[""])


def test_unload_frees_the_slot_and_refuses_active_or_pinned_versions(
    loop: LoopThread, engine: Any, registry: Path, tiny_model_dir: Path
) -> None:
    smodel, _ = make_adapter(tiny_model_dir, seed=7)
    entry = publish(registry, tiny_model_dir, smodel, "task-unload")
    info = loop.run(engine.load_version(entry.path, activate=False))
    version, slot = info.version, info.slot
    active = engine.active_version().version
    assert version != active
    w = make_workload(2, seed=72, text_only=0)

    async def pinned_then_unload() -> tuple[GenerateChunk, Exception | None]:
        first = asyncio.Event()
        chunks: list[GenerateChunk] = []

        async def stream() -> None:
            async for chunk in engine.generate(
                _request(w, max_tokens=16, ignore_eos=True, version=version)
            ):
                chunks.append(chunk)
                first.set()

        task = asyncio.create_task(stream())
        await first.wait()
        # Freeze the request in the engine so the unload attempt deterministically meets it in
        # flight.
        await engine.vllm.pause_generation(mode="keep", clear_cache=False)
        refused: Exception | None = None
        try:
            await engine.unload_version(version)
        except VersionInUseError as e:
            refused = e
        await engine.vllm.resume_generation()
        await task
        return chunks[-1], refused

    last, refused = loop.run(pinned_then_unload())
    assert refused is not None and "in-flight" in str(refused)
    assert last.finished and last.version == version  # the pinned request finished on its version
    with pytest.raises(VersionInUseError, match="active"):
        loop.run(engine.unload_version(active))

    unloaded = loop.run(engine.unload_version(version))
    assert unloaded.version == version and unloaded.slot == slot
    assert version not in {v.version for v in engine.list_versions()}
    stats = loop.run(engine.vllm.collective_rpc("smolora_stats"))[0]
    assert slot not in stats["slot_versions"]
    with pytest.raises(VersionNotResidentError):
        loop.run(collect(engine, _request(w, max_tokens=2, version=version)))
    with pytest.raises(VersionNotResidentError):
        loop.run(engine.unload_version(version))
    # The freed slot takes the next load, and the reloaded version serves again.
    again = loop.run(engine.load_version(entry.path, activate=False))
    assert again.slot == slot
    assert loop.run(collect(engine, _request(w, max_tokens=2, version=version))).version == version
