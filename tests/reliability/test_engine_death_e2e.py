"""Killing the engine core of the real server (`python -m smolora.server serve`): the
server's engine monitor sees it, `/ready` says why, and the server drains and exits with
status 3 (`ENGINE_FAILED_EXIT`) for its supervisor (compose `restart:`, Kubernetes) to start
a fresh one, instead of staying up and unready for good."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil  # a dependency of vLLM
import pytest

from smolora.server.cli import ENGINE_FAILED_EXIT
from tests.reliability.conftest import start_tight_server
from tests.reliability.live import CHAT, long_stream_body


def test_a_dead_engine_core_ends_the_server_with_status_3(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, reliability_registry: Path
) -> None:
    work = tmp_path_factory.mktemp("engine-death")
    with start_tight_server(work, tiny_model_dir, reliability_registry, grace_s=2.0) as srv:
        served = httpx.post(
            srv.url + CHAT, json={**long_stream_body(4), "stream": False}, timeout=120
        )
        assert served.status_code == 200, served.text
        assert srv.proc is not None
        cores = [
            p
            for p in psutil.Process(srv.proc.pid).children(recursive=True)
            if "EngineCore" in p.name()
        ]
        assert len(cores) == 1, [p.name() for p in cores]
        cores[0].kill()
        assert srv.proc.wait(timeout=120) == ENGINE_FAILED_EXIT, srv.log_tail()
        log = srv.log_tail(50_000)
        assert "the engine stopped serving" in log and "draining" in log, log[-3000:]
