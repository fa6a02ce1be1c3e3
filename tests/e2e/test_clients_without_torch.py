"""The client package runs where torch is not installed: every client command against the real
server (the session's `remote`), each in a subprocess whose imports of torch, transformers,
tokenizers, safetensors, vllm, numpy, fastapi, uvicorn and our own torch-side packages
(`smolora.adapters`, `.training`, `.server`) fail as if they were not installed
(tests/clients/torchless/; tests/clients/test_torchless.py checks the block itself).

Admin commands are run so that they leave the shared server as they found it: `load` and
`activate` of the active version (no-ops), `unload` of the active version (409) and `rollback`
with nothing to roll back to (409).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.clients.torchless import run_torchless as _torchless
from tests.e2e.conftest import ADMIN_KEY, RemoteServer
from tests.server.api.helpers import data_url, image_bytes

pytestmark = pytest.mark.e2e

QUESTION = "What colour is the circle?\nAnswer the question using a single word or phrase."


def _client_cli(remote: RemoteServer, *args: str) -> subprocess.CompletedProcess[str]:
    base = ("--base-url", remote.url, "--admin-api-key", ADMIN_KEY)
    return _torchless("-m", "smolora.clients", *base, *args)


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_models_and_chat_without_torch(remote: RemoteServer, tmp_path: Path) -> None:
    active = _json(_client_cli(remote, "versions"))["active"]
    models = _client_cli(remote, "models")
    assert models.returncode == 0, models.stderr
    assert {"tiny-llava", f"tiny-llava@{active}"} <= set(models.stdout.split())

    img = tmp_path / "circle.png"
    img.write_bytes(image_bytes("PNG", (32, 32), (200, 40, 40)))
    chat = _client_cli(remote, "chat", str(img), QUESTION, "--max-tokens", "6")
    assert chat.returncode == 0, chat.stderr
    # The same request through the openai SDK in this (torch-enabled) process.
    direct = openai.OpenAI(base_url=remote.url + "/v1", api_key="unused", max_retries=0)
    resp = direct.chat.completions.create(
        model="tiny-llava",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(img.read_bytes())}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        max_tokens=6,
        temperature=0.0,
        extra_body={"smolora": {"trace": True}},
    )
    assert chat.stdout == resp.choices[0].message.content + "\n"
    assert (
        f"-- tiny-llava@{active} " in chat.stderr and "instruction=snapped:vqa_short" in chat.stderr
    )
    # The routing table (layer, VU expert, IF expert, weights) after its header line.
    lines = chat.stderr.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["layer", "VU", "IF"])
    rows = [line.split()[:3] for line in lines[header + 1 :]]
    layers = resp.smolora["trace"][0]["layers"]
    assert rows == [[e["layer"], str(e["vu_expert"]), str(e["if_expert"])] for e in layers]

    stream = _client_cli(
        remote, "chat", str(img), QUESTION, "--max-tokens", "6", "--stream", "--no-trace"
    )
    assert stream.returncode == 0, stream.stderr
    assert stream.stdout == chat.stdout


def test_admin_commands_without_torch(remote: RemoteServer) -> None:
    before = _json(_client_cli(remote, "versions"))
    active = before["active"]
    assert active is not None and any(v["version"] == active for v in before["versions"])
    loaded = _json(_client_cli(remote, "load", str(active), "--activate"))
    assert loaded["loaded"]["version"] == active and loaded["active"] == active
    assert _json(_client_cli(remote, "activate", str(active)))["active"] == active
    unload = _client_cli(remote, "unload", str(active))
    assert unload.returncode == 1 and "HTTP 409" in unload.stderr and "is active" in unload.stderr
    rollback = _client_cli(remote, "rollback")
    assert rollback.returncode == 1 and "HTTP 409" in rollback.stderr
    assert "no earlier active version" in rollback.stderr
    missing = _client_cli(remote, "activate", "999")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    after = _json(_client_cli(remote, "versions"))
    assert after["active"] == active and after["history"] == before["history"]


def test_loadgen_and_bad_request_probe_without_torch(remote: RemoteServer, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    args = ("--requests", "4", "--concurrency", "2", "--max-tokens", "2", "--image-size", "32")
    load = _client_cli(remote, "loadgen", *args, "--output", str(out))
    assert load.returncode == 0, load.stderr
    report = json.loads(out.read_text())
    assert report["requests_ok"] == 4 and 0 < report["output_tokens"] <= 8

    code = (
        "import json, sys; from smolora.clients.bad_requests import probe_bad_requests; "
        "print(json.dumps(probe_bad_requests(sys.argv[1])))"
    )
    probe = _json(_torchless("-c", code, remote.url))
    assert probe["cases"] > 0 and probe["five_xx"] == [] and probe["normal_request_ok_after"]
