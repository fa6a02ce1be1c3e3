"""Fixtures of the reliability suites: the HTTP-layer tests' registry (scripted engine apps) and
a real server (`python -m smolora.server serve`, tiny model) with tight admission limits, an
access log and a short shutdown grace, for the overload, disconnect, drain and fuzz tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smolora.adapters.tiny_llava import build_tiny_llava, get_preset
from smolora.clients.bad_requests import image_bytes
from tests.e2e.conftest import RemoteServer, publish_smolora
from tests.reliability.live import StallingImageHost
from tests.server.api.conftest import registry  # noqa: F401 - the scripted apps' registry

#: The tight server's limits: two requests run, one waits, the rest are refused.
MAX_RUNNING = 2
MAX_WAITING = 1
GRACE_S = 3.0
MAX_MODEL_LEN = 256  # the tiny model's positions
#: Context of the slow model: room for a request long enough to outlive any step of a test.
SLOW_CONTEXT = 2048
#: Tokens such a request asks for: ~30 s on 2 cores (about 16 ms a token), so still generating
#: seconds later on a machine several times faster.
SLOW_TOKENS = 1800


@pytest.fixture(scope="session")
def reliability_registry(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, instruction_encoder: Any
) -> Path:
    reg = tmp_path_factory.mktemp("reliability-registry")
    publish_smolora(reg, tiny_model_dir, instruction_encoder, "vqa", seed=1)
    return reg


@pytest.fixture(scope="session")
def slow_model(
    tmp_path_factory: pytest.TempPathFactory, instruction_encoder: Any
) -> tuple[Path, Path]:
    """A tiny-preset LLaVA made slow on purpose (512 wide, 16 layers, 2048 positions) and a
    registry with one SMoLoRA version for it.

    Tests that need a request still generating when they act (a client leaving mid-stream,
    a drain outlasting the grace period) use it: the 64-wide tiny model makes 200 tokens in
    ~0.3 s, faster than a test can observe them reliably.
    """
    preset = dataclasses.replace(
        get_preset("tiny"),
        name="tiny-slow",
        max_positions=SLOW_CONTEXT,
        text_hidden=512,
        text_layers=16,
        text_heads=8,
        text_kv_heads=2,
        text_intermediate=2048,
    )
    model = build_tiny_llava(preset, tmp_path_factory.mktemp("tiny-slow"), seed=0)
    slow_registry = tmp_path_factory.mktemp("tiny-slow-registry")
    publish_smolora(slow_registry, model, instruction_encoder, "vqa", seed=1)
    return model, slow_registry


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
