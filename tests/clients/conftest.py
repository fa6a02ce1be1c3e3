"""A real-socket server on a `ScriptedEngine` (HTTP layer only) for the client tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from smolora.server.app import create_app
from smolora.server.settings import ServerSettings
from tests.server.api.helpers import (
    HashingEmbedder,
    ServerThread,
    instruction_types,
    publish_version,
)
from tests.server.api.scripted_engine import ScriptedEngine, scripted_factory


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, ScriptedEngine, Path]]:
    reg = tmp_path_factory.mktemp("client-registry")
    emb = HashingEmbedder()
    publish_version(reg, "vqa", instruction_types(emb, ["vqa_short", "mc_letter"]))
    publish_version(reg, "caption", instruction_types(emb))
    engine = ScriptedEngine()
    settings = ServerSettings(
        model_dir=tiny_model_dir,
        registry_dir=reg,
        served_model_name="tiny-llava",
        api_keys=("sk-c",),
        admin_api_key="adm-c",
        watch_registry=True,
        watch_interval_s=0.05,
    )
    app = create_app(settings, scripted_factory(engine), embedder_factory=HashingEmbedder)
    with ServerThread(app) as srv:
        srv.wait_ready()
        yield srv, engine, reg
