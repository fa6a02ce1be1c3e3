"""Fixtures of the HTTP-layer tests: a registry with two versions and apps on a `ScriptedEngine`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from smolora.server.app import create_app
from smolora.server.settings import ServerSettings
from tests.server.api.helpers import HashingEmbedder, instruction_types, publish_version, wait_until
from tests.server.api.scripted_engine import ScriptedEngine, scripted_factory


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with v1 (vqa: vqa_short, mc_letter) and v2 (caption: all three types)."""
    root = tmp_path_factory.mktemp("registry")
    emb = HashingEmbedder()
    publish_version(root, "vqa", instruction_types(emb, ["vqa_short", "mc_letter"]))
    publish_version(root, "caption", instruction_types(emb))
    return root


@contextmanager
def running_app(
    model_dir: Path,
    registry: Path,
    engine: ScriptedEngine | None = None,
    embedder: Any = None,
    ready: bool = True,
    on_engine_failure: Callable[[str], None] | None = None,
    **overrides: Any,
) -> Iterator[tuple[TestClient, ScriptedEngine, Any]]:
    """A TestClient on a fresh app (lifespan running); waits for /ready unless `ready=False`."""
    engine = engine or ScriptedEngine()
    embedder = embedder or HashingEmbedder()
    overrides.setdefault("watch_registry", False)
    overrides.setdefault("keep_state", False)  # each app a fresh server unless a test says
    settings = ServerSettings(
        model_dir=model_dir, registry_dir=registry, served_model_name="tiny-llava", **overrides
    )
    app = create_app(
        settings,
        scripted_factory(engine),
        embedder_factory=lambda: embedder,
        on_engine_failure=on_engine_failure,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        if ready:
            wait_until(lambda: client.get("/ready").status_code == 200, what="/ready")
        yield client, engine, embedder


@pytest.fixture(scope="module")
def served(
    tiny_model_dir: Path, registry: Path
) -> Iterator[tuple[TestClient, ScriptedEngine, Any]]:
    """One app for a module: keys required, admin key set, v2 (latest) active."""
    with running_app(
        tiny_model_dir,
        registry,
        api_keys=("sk-test",),
        admin_api_key="admin-test",
        max_images_per_request=2,
        max_image_bytes=200_000,
        max_image_pixels=256 * 256,
        max_request_bytes=2_000_000,
        max_n=4,
    ) as ctx:
        yield ctx
