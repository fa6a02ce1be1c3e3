"""`python -m smolora.training publish`: a checkpoint folder verified and published into a
registry that a running server watches (the HTTP layer on a `ScriptedEngine`; the engine's own
hot-load is tested in tests/server/engine and tests/e2e)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolora.server.app import create_app
from smolora.server.settings import ServerSettings
from smolora.training.cli import main
from tests.server.api.helpers import (
    HashingEmbedder,
    ServerThread,
    instruction_types,
    publish_version,
    wait_until,
)
from tests.server.api.scripted_engine import ScriptedEngine, scripted_factory


@pytest.fixture(scope="module")
def watched(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ScriptedEngine, Path]]:
    """A server watching a registry with one published version: (engine, registry)."""
    reg = tmp_path_factory.mktemp("publish-registry")
    publish_version(reg, "vqa", instruction_types(HashingEmbedder()))
    engine = ScriptedEngine()
    settings = ServerSettings(
        model_dir=tiny_model_dir,
        registry_dir=reg,
        served_model_name="tiny-llava",
        api_keys=("sk-p",),
        admin_api_key="adm-p",
        watch_registry=True,
        watch_interval_s=0.05,
    )
    app = create_app(settings, scripted_factory(engine), embedder_factory=HashingEmbedder)
    with ServerThread(app) as srv:
        srv.wait_ready()
        yield engine, reg


def test_publish_then_the_watcher_serves_it(
    watched: tuple[ScriptedEngine, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, reg = watched
    staging = publish_version(tmp_path / "staging", "gqa", instruction_types(HashingEmbedder()))
    assert main(["publish", str(staging.path), "--registry", str(reg)]) == 0
    published = json.loads(capsys.readouterr().out)["published"]
    wait_until(
        lambda: getattr(engine.active_version(), "version", None) == published,
        what="the watcher to activate the published version",
    )
    (staging.path / "adapter.safetensors").write_bytes(b"corrupt")
    assert main(["publish", str(staging.path), "--registry", str(reg)]) == 1
    assert "sha256" in capsys.readouterr().err


def test_publish_of_a_missing_folder_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-checkpoint"
    assert main(["publish", str(missing), "--registry", str(tmp_path / "reg")]) == 1
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "reg").exists() or not any((tmp_path / "reg").iterdir())
