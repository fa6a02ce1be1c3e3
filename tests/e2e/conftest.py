"""The real servers for the e2e tests: tiny LLaVA, a published SMoLoRA checkpoint, a subprocess
(and a second, base-only one started with `--no-adapters`).

`RemoteServer` starts `python -m smolora.server serve` on a free port (`--port 0` and the
`--port-file` it writes once listening), polls `/ready`, and on exit stops the process
(SIGTERM, then its process group if it does not exit). Engine start takes ~20 s on 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from smolora.adapters.checkpoint import (
    CheckpointManifest,
    RegistryEntry,
    base_model_fingerprint,
    publish_checkpoint,
)
from smolora.adapters.instructions import InstructionType
from smolora.adapters.smolora import SMoLoRAConfig, SMoLoRAModel
from smolora.adapters.tiny_llava import load_llava

TYPES = {
    "vqa_short": ("Answer the question using a single word or phrase.", "vqa"),
    "caption": ("Provide a one-sentence caption for the provided image.", "caption"),
    "mc_letter": ("Answer with the option's letter from the given choices directly.", "scienceqa"),
}
ADMIN_KEY = "e2e-admin"


def publish_smolora(
    registry: Path,
    model_dir: Path,
    encoder: Any,
    task: str,
    seed: int,
    scores: dict[str, float] | None = None,
) -> RegistryEntry:
    """Publish a SMoLoRA adapter with visible expert effects (non-zero B) and an instruction
    table; `scores` (task -> 0-100) become the manifest's evaluation row."""
    model, _ = load_llava(model_dir)
    smodel = SMoLoRAModel(
        model,
        SMoLoRAConfig(num_experts=4, rank=16, alpha=32.0, dropout=0.0, gate_init_std=0.5),
        seed=seed,
    )
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for layer in smodel.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.5)
    embs = encoder.encode([t for t, _ in TYPES.values()])
    types = [
        InstructionType(n, t, k, tuple(e.tolist())).to_dict()
        for (n, (t, k)), e in zip(TYPES.items(), embs)
    ]
    manifest = CheckpointManifest(
        adapter_kind="smolora",
        adapter_config=smodel.config.to_dict(),
        base_model={"fingerprint": base_model_fingerprint(model_dir), "name": "tiny"},
        layers=list(smodel.layers),
        tasks=[task],
        instruction_types=types,
        eval={"row": {t: {"score": s} for t, s in scores.items()}} if scores else {},
    )
    return publish_checkpoint(registry, smodel.adapter_state_dict(), manifest)


class RemoteServer:
    """`python -m smolora.server serve ...` in a subprocess on a free port."""

    def __init__(self, workdir: Path, model_dir: Path, registry: Path | None, extra: list[str]):
        self.port_file = workdir / "port"
        self.log_path = workdir / "server.log"
        key_file = workdir / "admin.key"
        key_file.write_text(ADMIN_KEY + "\n")
        source = ["--registry", str(registry)] if registry is not None else ["--no-adapters"]
        self.cmd = [
            sys.executable,
            "-m",
            "smolora.server",
            "serve",
            "--model",
            str(model_dir),
            *source,
            "--port",
            "0",
            "--port-file",
            str(self.port_file),
            "--admin-api-key-file",
            str(key_file),
            "--served-model-name",
            "tiny-llava",
            "--watch-interval",
            "0.2",
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RemoteServer:
        env = dict(os.environ)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            self._wait(lambda: self.port_file.is_file(), 120, "the port file")
            self.url = f"http://127.0.0.1:{int(self.port_file.read_text())}"
            self._wait(self._ready, 300, "/ready")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def _wait(self, predicate: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited ({self.proc.returncode}) before {what}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout_s}s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def __exit__(self, *exc: Any) -> None:
        if exc and exc[0] is not None:  # pytest shows what a failed test printed
            state = "running" if self.proc is None or self.proc.poll() is None else "exited"
            code = "" if self.proc is None else f" ({self.proc.returncode})"
            print(f"server {state}{code}; its log's tail:\n{self.log_tail(20_000)}")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="session")
def e2e_registry(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, instruction_encoder: Any
) -> Path:
    reg = tmp_path_factory.mktemp("e2e-registry")
    publish_smolora(reg, tiny_model_dir, instruction_encoder, "vqa", seed=1)
    return reg


@pytest.fixture(scope="session")
def remote(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, e2e_registry: Path
) -> Iterator[RemoteServer]:
    work = tmp_path_factory.mktemp("e2e-server")
    extra = [
        "--engine-option",
        "max_model_len=256",
        "--engine-option",
        f"kv_cache_bytes={64 * 1024 * 1024}",
        "--engine-option",
        "max_num_seqs=8",
    ]
    with RemoteServer(work, tiny_model_dir, e2e_registry, extra) as srv:
        yield srv


@pytest.fixture(scope="session")
def remote_base(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RemoteServer]:
    """The same model served with `--no-adapters` (base-only: no registry, no MiniLM)."""
    work = tmp_path_factory.mktemp("e2e-base-server")
    extra = [
        "--engine-option",
        "max_model_len=256",
        "--engine-option",
        f"kv_cache_bytes={32 * 1024 * 1024}",
        "--engine-option",
        "max_num_seqs=4",
    ]
    with RemoteServer(work, tiny_model_dir, None, extra) as srv:
        yield srv
