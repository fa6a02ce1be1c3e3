"""The client package imports nothing of ours but itself, and loads without torch, numpy or
the serving stack (its commands against a real server: tests/e2e/test_clients_without_torch.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.clients.torchless import run_torchless

CLIENTS = Path(__file__).parents[2] / "clients"
HEAVY = ("torch", "numpy", "vllm", "transformers", "tokenizers", "safetensors", "fastapi")


def _imported(path: Path) -> set[str]:
    mods: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def test_clients_import_only_clients_and_light_packages() -> None:
    for path in sorted(CLIENTS.rglob("*.py")):
        for mod in _imported(path):
            ours = mod.startswith("smolora") and not mod.startswith("smolora.clients")
            assert not ours, f"{path.name} imports {mod}"
            assert mod.split(".")[0] not in HEAVY, f"{path.name} imports {mod}"


@pytest.mark.parametrize("module", ["torch", "numpy", "vllm", "smolora.adapters.checkpoint"])
def test_the_block_holds(module: str) -> None:
    proc = run_torchless("-c", f"import {module}")
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr, proc.stderr


def test_every_client_module_and_the_cli_load_without_torch() -> None:
    code = (
        "import sys, smolora.clients, smolora.clients.cli, smolora.clients.client, "
        "smolora.clients.loadgen, smolora.clients.bad_requests; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    proc = run_torchless("-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    help_ = run_torchless("-m", "smolora.clients", "--help")
    assert help_.returncode == 0, help_.stderr
    commands = "{chat,models,versions,load,activate,unload,rollback,loadgen}"
    assert commands in help_.stdout  # `publish` is a training command
