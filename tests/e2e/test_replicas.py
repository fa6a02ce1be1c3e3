"""Two server replicas watching one registry folder converge on the version published into it.

Two `python -m smolora.server serve` processes (real vLLM engine, tiny model) run on loopback
ports with the same `--registry`, which holds version 1. Replica a is up and serving version 1;
replica b is starting (listening, its engine still loading) when the training CLI's `publish`
command (`python -m smolora.training publish`, a separate process, as a trainer on another
host would) publishes version 2. Replica a must answer a chat request with version 2 in its
`smolora` object within the hot-load budget after the publish (the watch interval plus a
checkpoint load; 60 s here, allowing for a shared 2-core machine), and replica b, which may
have resolved "latest" before the publish, within the same budget after it is ready. The
measured times are printed (`-s`) and quoted in docs/scaling.md.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from smolora.adapters.checkpoint import list_versions
from tests.e2e.conftest import RemoteServer, publish_smolora
from tests.server.api.helpers import data_url, image_bytes, user_message

pytestmark = pytest.mark.e2e

HOT_LOAD_BUDGET_S = 60.0
IMG = data_url(image_bytes("PNG", (32, 32), (40, 40, 200)))
QUESTION = "What colour is the circle?\nAnswer the question using a single word or phrase."
ENGINE = [
    "--engine-option",
    "max_model_len=256",
    "--engine-option",
    f"kv_cache_bytes={32 * 1024 * 1024}",
    "--engine-option",
    "max_num_seqs=4",
]


def _served_version(url: str) -> int | None:
    r = httpx.post(
        url + "/v1/chat/completions",
        json={
            "model": "tiny-llava",
            "messages": [user_message(QUESTION, [IMG])],
            "max_tokens": 2,
            "temperature": 0.0,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == f"tiny-llava@{body['smolora']['version']}"
    return body["smolora"]["version"]


def _wait_for_version(srv: RemoteServer, version: int, since: float) -> float:
    """Seconds after `since` (wall clock) until `srv` answers a chat request with `version`."""
    while _served_version(srv.url) != version:
        if time.time() - since > HOT_LOAD_BUDGET_S:
            pytest.fail(f"{srv.url} not on version {version} in time:\n{srv.log_tail(3000)}")
        time.sleep(0.1)
    return time.time() - since


def test_two_replicas_converge_on_a_published_version(
    tmp_path: Path, tiny_model_dir: Path, instruction_encoder: Any
) -> None:
    registry = tmp_path / "registry"
    publish_smolora(registry, tiny_model_dir, instruction_encoder, "vqa", seed=1)
    # a trainer elsewhere: a finished checkpoint folder, to publish with the training CLI
    staging = publish_smolora(
        tmp_path / "staging", tiny_model_dir, instruction_encoder, "caption", seed=2
    )
    replicas = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        replicas.append(RemoteServer(tmp_path / name, tiny_model_dir, registry, ENGINE))
    a, b = replicas
    with ExitStack() as stack, ThreadPoolExecutor(1) as pool:
        for srv in replicas:  # stopped on exit, also when the other one failed to start
            stack.callback(srv.__exit__)
        a.__enter__()
        assert _served_version(a.url) == 1
        # replica b starts now; version 2 is published while it is still starting
        b_started = pool.submit(b.__enter__)
        while not b.port_file.is_file() and not b_started.done():
            time.sleep(0.05)
        cmd = [sys.executable, "-m", "smolora.training", "publish", str(staging.path)]
        done = subprocess.run(
            [*cmd, "--registry", str(registry)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        b_was_starting = not b_started.done()
        # the version became visible when its folder was renamed into the registry
        (entry,) = [e for e in list_versions(registry) if e.version == 2]
        published = entry.path.stat().st_ctime
        a_after_publish = _wait_for_version(a, 2, published)
        b_started.result()
        assert a.url != b.url
        b_after_ready = _wait_for_version(b, 2, time.time())
        # converged: both stay on the new version (no replica goes back to version 1)
        assert [_served_version(srv.url) for srv in replicas] == [2, 2]
        for srv in replicas:
            assert httpx.get(srv.url + "/ready", timeout=10).json()["active_version"] == 2
        print(
            f"replica a on v2 {a_after_publish:.2f}s after the publish; replica b (still "
            f"starting at the publish: {b_was_starting}) on v2 {b_after_ready:.2f}s after ready"
        )
