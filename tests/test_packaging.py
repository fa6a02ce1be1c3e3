"""Packaging and layering: every subpackage ships, and imports flow one way."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[1]
MAPPED = {
    "smolora": "smolora",
    "smolora.adapters": "adapters",
    "smolora.training": "training",
    "smolora.server": "server",
    "smolora.clients": "clients",
}


def test_every_subpackage_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for name, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found - listed == set(), (
        "add these to [tool.setuptools] packages, or wheels will miss them"
    )


def _imports(folder: str) -> set[str]:
    mods = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                mods.add(node.module)
    return mods


def test_imports_flow_one_way() -> None:
    adapters = _imports("adapters")
    assert not {m for m in adapters if m.split(".")[0] in {"vllm", "fastapi", "uvicorn"}}
    assert not {
        m
        for m in adapters
        if m.startswith(("smolora.server", "smolora.training", "smolora.clients"))
    }
    assert not {m for m in _imports("training") if m.startswith("smolora.server")}
    assert not {m for m in _imports("server") if m.startswith("smolora.training")}


def test_importing_adapters_loads_no_serving_stack() -> None:
    code = (
        "import sys, smolora.adapters.smolora, smolora.adapters.checkpoint, "
        "smolora.adapters.instructions, smolora.adapters.tiny_llava; "
        "print(sorted(m for m in ('vllm', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
