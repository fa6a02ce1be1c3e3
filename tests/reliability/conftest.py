"""Fixtures of the reliability suites: the HTTP-layer tests' registry (scripted engine apps) and
a real server (`python -m smolora.server serve`, tiny model) with tight admission limits, an
access log and a short shutdown grace, for the overload, disconnect, drain and fuzz tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smolora.clients.bad_requests import image_bytes
from tests.e2e.conftest import RemoteServer, publish_smolora
from tests.reliability.live import StallingImageHost
from tests.server.api.conftest import registry  # noqa: F401 - the scripted apps' registry

#: The tight server's limits: two requests run, one waits, the rest are refused.
MAX_RUNNING = 2
MAX_WAITING = 1
GRACE_S = 3.0
MAX_MODEL_LEN = 256  # the tiny model's positions


@pytest.fixture(scope="session")
def reliability_registry(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, instruction_encoder: Any
) -> Path:
    reg = tmp_path_factory.mktemp("reliability-registry")
    publish_smolora(reg, tiny_model_dir, instruction_encoder, "vqa", seed=1)
    return reg


def start_tight_server(
    workdir: Path,
    model_dir: Path,
    registry_dir: Path,
    grace_s: float = GRACE_S,
    max_model_len: int = MAX_MODEL_LEN,
    max_running: int = MAX_RUNNING,
) -> RemoteServer:
    """The real server with tight admission limits; `localhost` image URLs allowed (the
    tests' stalling image host on 127.0.0.1)."""
    extra = [
        "--image-url-allow",
        "localhost",
        "--image-url-allow-network",
        "127.0.0.0/8",
        "--image-url-allow-network",
        "::1/128",
        "--image-fetch-timeout",
        "120",
        "--engine-option",
        f"max_model_len={max_model_len}",
        "--engine-option",
        f"kv_cache_bytes={64 * 1024 * 1024}",
        "--engine-option",
        "max_num_seqs=4",
        "--max-concurrent-requests",
        str(max_running),
        "--max-waiting-requests",
        str(MAX_WAITING),
        "--shutdown-grace-s",
        str(grace_s),
        "--access-log",
        str(workdir / "access.jsonl"),
    ]
    return RemoteServer(workdir, model_dir, registry_dir, extra)


@pytest.fixture(scope="session")
def tight(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, reliability_registry: Path
) -> Iterator[RemoteServer]:
    """A real server: 2 running, 1 waiting, 3 s shutdown grace, access log in its workdir."""
    work = tmp_path_factory.mktemp("tight-server")
    with start_tight_server(work, tiny_model_dir, reliability_registry) as srv:
        srv.workdir = work  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="session")
def image_host() -> Iterator[StallingImageHost]:
    host = StallingImageHost(image_bytes("PNG", (64, 64)))
    yield host
    host.close()
