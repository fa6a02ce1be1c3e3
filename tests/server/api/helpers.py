"""Helpers of the HTTP-layer tests: a hashing embedder, fake registry versions, images, a server
thread.

`HashingEmbedder` is a test double of MiniLM (bag of hashed words, 384-d): texts sharing
words are similar, equal texts identical. `publish_version` writes a real, verifiable
checkpoint folder (format v1, tiny tensors) into a registry. `ServerThread` runs uvicorn
on 127.0.0.1 with an OS-picked port in a background thread and stops it cleanly.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from smolora.adapters.checkpoint import CheckpointManifest, RegistryEntry, publish_checkpoint
from smolora.adapters.instructions import EMBED_DIM, InstructionType
from smolora.clients.bad_requests import data_url, image_bytes, user_message  # noqa: F401 (re-exported to the tests)

INSTRUCTIONS = {
    "vqa_short": ("Answer the question using a single word or phrase.", "vqa"),
    "mc_letter": ("Answer with the option's letter from the given choices directly.", "scienceqa"),
    "caption": ("Provide a one-sentence caption for the provided image.", "caption"),
}


class HashingEmbedder:
    """MiniLM stand-in for HTTP-layer tests: a normalised bag of hashed lower-case words."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), EMBED_DIM)
        for i, t in enumerate(texts):
            self.calls.append(t)
            for w in t.lower().replace(".", " ").replace("?", " ").replace(",", " ").split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % EMBED_DIM] += 1.0
            out[i, 0] += 1e-3  # never all-zero
        return out


def instruction_types(
    embedder: Any, names: Sequence[str] = tuple(INSTRUCTIONS)
) -> list[dict[str, Any]]:
    """The `instruction_types` manifest entries of `names`, embedded with `embedder`."""
    texts = [INSTRUCTIONS[n][0] for n in names]
    embs = embedder.encode(texts)
    return [
        InstructionType(
            n, INSTRUCTIONS[n][0], INSTRUCTIONS[n][1], tuple(float(x) for x in e)
        ).to_dict()
        for n, e in zip(names, embs)
    ]


def publish_version(
    registry: Path,
    task: str,
    types: list[dict[str, Any]],
    fingerprint: str = "f" * 64,
    scores: dict[str, float] | None = None,
) -> RegistryEntry:
    """Publish a small, valid checkpoint version (format v1) into `registry`; `scores`
    (task -> 0-100) become its manifest's evaluation row, as the trainer writes it."""
    row = {
        t: {"score": s, "format_rate": 100.0, "n": 10, "metric": "accuracy"}
        for t, s in (scores or {}).items()
    }
    manifest = CheckpointManifest(
        eval={"row": row} if scores is not None else {},
        adapter_kind="smolora",
        adapter_config={"num_experts": 8, "rank": 8, "alpha": 16},
        base_model={"fingerprint": fingerprint, "name": "tiny"},
        layers=["layers.0.mlp.up_proj"],
        tasks=[task],
        instruction_types=types,
    )
    return publish_checkpoint(registry, {"layers.0.mlp.up_proj.A": torch.zeros(8, 4)}, manifest)


def wait_until(predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate()` until true (short waits between polls), or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a daemon thread.

    Use as a context manager; `base_url` is `http://127.0.0.1:<port>`.
    """

    def __init__(self, app: Any):
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=5,
            )
        )
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.server.serve())

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_until(
            lambda: self.server.started or not self.thread.is_alive(), what="uvicorn to start"
        )
        if not self.server.started:
            raise RuntimeError("uvicorn did not start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        wait_until(
            lambda: httpx.get(self.base_url + "/ready").status_code == 200, timeout_s, "/ready"
        )
