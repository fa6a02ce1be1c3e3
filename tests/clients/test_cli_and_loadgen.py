"""The client CLI and the load generator, against the HTTP layer (ScriptedEngine)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from smolora.clients.cli import main
from smolora.clients.loadgen import LoadgenConfig, check_loopback, percentiles, run_load
from tests.server.api.helpers import (
    image_bytes,
)


def _cli(srv, *args: str) -> list[str]:
    return ["--base-url", srv.base_url, "--api-key", "sk-c", "--admin-api-key", "adm-c", *args]


def test_cli_chat_models_versions(
    server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    srv, _, _ = server
    img = tmp_path / "img.png"
    img.write_bytes(image_bytes())
    assert main(_cli(srv, "chat", str(img), "What is it?", "--max-tokens", "2")) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "a red" and "tiny-llava@" in out.err and "w_vu" in out.err
    assert (
        main(
            _cli(
                srv, "chat", str(img), "What is it?", "--max-tokens", "2", "--stream", "--no-trace"
            )
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == "a red"
    assert main(_cli(srv, "models")) == 0
    assert "tiny-llava" in capsys.readouterr().out
    assert main(_cli(srv, "versions")) == 0
    assert json.loads(capsys.readouterr().out)["active"] is not None
    assert main(_cli(srv, "activate", "77")) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert main(["--base-url", srv.base_url, "--api-key", "wrong", "models"]) == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_loadgen_reports_throughput_and_percentiles(server) -> None:
    srv, _, _ = server
    cfg = LoadgenConfig(
        base_url=srv.base_url,
        api_key="sk-c",
        num_requests=8,
        concurrency=3,
        max_tokens=4,
        max_duration_s=30,
    )
    report = asyncio.run(run_load(cfg)).to_dict()
    assert report["requests_sent"] == 8 and report["requests_ok"] == 8 and report["errors"] == {}
    assert report["output_tokens"] == 32 and report["requests_per_s"] > 0
    for key in ("ttft_s", "itl_s", "e2e_s"):
        assert (
            report[key]["count"] > 0
            and report[key]["p50"] <= report[key]["p99"] <= report[key]["max"]
        )
    assert "api_key" not in report["config"]


def test_loadgen_is_bounded_to_loopback_and_limits() -> None:
    for ok in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:9"):
        check_loopback(ok)
    with pytest.raises(ValueError, match="loopback"):
        LoadgenConfig(base_url="http://example.com:8000")
    with pytest.raises(ValueError, match="num_requests"):
        LoadgenConfig(num_requests=10**6)
    with pytest.raises(ValueError, match="max_duration_s"):
        LoadgenConfig(max_duration_s=86400)
    assert percentiles([1.0, 2.0, 3.0, 4.0])["p50"] == 2.0 and percentiles([])["p50"] is None
