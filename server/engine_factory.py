"""The vLLM engine the server runs: `vllm_engine_factory(settings)`.

It starts `SMoLoRAEngine` (`server/engine/`) on the model folder and yields it as is: the
engine implements the HTTP layer's seam (`EngineClient`, `server/engine/protocol.py`), so
nothing is translated between the two. With adapters, it starts on the first checkpoint
version (the one named by `initial_version`, else the registry's latest, waiting for one to
be published if the registry is empty); without adapters (`settings.adapters=False`), on the
base model alone (no registry, no routing hook). It shuts the engine down on exit. Engine
options (`--engine-option KEY=VALUE`) are `EngineConfig` fields.

It does not serve HTTP (`app.py`) and imports vLLM only when the factory runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smolora.adapters.checkpoint import latest_version, list_versions
from smolora.server.settings import ServerSettings

if TYPE_CHECKING:
    from smolora.server.engine.engine import SMoLoRAEngine

log = logging.getLogger("smolora.server.engine_factory")


async def first_checkpoint(settings: ServerSettings) -> Path:
    """The folder to start the engine with; waits (polling) while the registry is empty."""
    announced = False
    while True:
        entries = await asyncio.to_thread(list_versions, settings.registry_dir)
        if settings.initial_version is not None:
            match = next((e for e in entries if e.version == settings.initial_version), None)
            if match is None:
                raise ValueError(
                    f"--initial-version {settings.initial_version} is not published in "
                    f"{settings.registry_dir} (published: {[e.version for e in entries]})"
                )
            return match.path
        latest = await asyncio.to_thread(latest_version, settings.registry_dir)
        if latest is not None:
            return latest.path
        if not announced:
            log.warning(
                "registry %s has no published version; the engine starts when one appears",
                settings.registry_dir,
            )
            announced = True
        await asyncio.sleep(settings.watch_interval_s)


def engine_config(settings: ServerSettings, checkpoint: Path | None) -> Any:
    """The engine's `EngineConfig` from the settings (engine options are its fields).

    Args:
        settings: server settings; `settings.adapters=False` gives a base-only engine.
        checkpoint: the first checkpoint folder (None, and ignored, without adapters).
    """
    from smolora.server.engine.config import EngineConfig

    fields = {f.name for f in dataclasses.fields(EngineConfig)} - {
        "model_dir",
        "checkpoint",
        "adapters",
    }
    unknown = set(settings.engine_options) - fields
    if unknown:
        raise ValueError(f"unknown engine options {sorted(unknown)}; known: {sorted(fields)}")
    options = dict(settings.engine_options)
    # vLLM labels its vllm:* metrics model_name=<its served_model_name>: the name clients use,
    # not the path.
    options["extra_engine_args"] = {
        "served_model_name": settings.served_model_name,
        **(options.get("extra_engine_args") or {}),
    }
    if not settings.adapters:
        return EngineConfig(model_dir=settings.model_dir, adapters=False, **options)
    # one slot more than the resident cap: the staging slot a version swap loads into while
    # the old version finishes its requests (server/versions.py)
    options.setdefault("num_slots", settings.max_resident_versions + 1)
    # The overlap helper runs routed deltas on the CPUs vLLM leaves outside the worker's
    # binding; in a server those CPUs run this API process and vLLM's engine core, and a
    # helper preempted there stalls the forward that waits for it (bench/README.md, "Over
    # HTTP"). `--engine-option cpu_overlap='"auto"'` turns it back on.
    options.setdefault("cpu_overlap", "off")
    return EngineConfig(model_dir=settings.model_dir, checkpoint=checkpoint, **options)


@asynccontextmanager
async def vllm_engine_factory(settings: ServerSettings) -> AsyncIterator[SMoLoRAEngine]:
    """Start the vLLM engine for the server (tens of seconds) and stop it on exit."""
    from smolora.server.engine.engine import SMoLoRAEngine

    checkpoint = await first_checkpoint(settings) if settings.adapters else None
    config = engine_config(settings, checkpoint)
    log.info(
        "starting the vLLM engine on %s with %s",
        settings.model_dir,
        checkpoint.name if checkpoint is not None else "adapters disabled (base model only)",
    )
    engine = await SMoLoRAEngine.start(config)
    try:
        yield engine
    finally:
        await engine.shutdown()
