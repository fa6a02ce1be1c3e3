"""Makes this interpreter behave as if torch and the serving stack were not installed.

Put this folder first on PYTHONPATH of a subprocess: Python imports `sitecustomize` at start-up,
and the finder below then answers every import of a blocked package (and of our own torch-side
packages) with the `ModuleNotFoundError` an uninstalled package gives. Used by
tests/e2e/test_clients_without_torch.py to run the client commands as on a machine that has
only the client's dependencies.
"""

from __future__ import annotations

import sys
from importlib.abc import MetaPathFinder

BLOCKED = (
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "safetensors",
    "vllm",
    "numpy",
    "fastapi",
    "uvicorn",
    "smolora.adapters",
    "smolora.training",
    "smolora.server",
)


def _blocked(name: str) -> bool:
    return any(name == b or name.startswith(b + ".") for b in BLOCKED)


class BlockFinder(MetaPathFinder):
    """Refuses blocked modules before any other finder can find them."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if _blocked(fullname):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked)", name=fullname)
        return None


already = sorted(m for m in sys.modules if _blocked(m))
if already:  # a .pth file imported one before us: the block would prove nothing
    raise SystemExit(f"torchless: already imported at start-up: {already}")
sys.meta_path.insert(0, BlockFinder())
