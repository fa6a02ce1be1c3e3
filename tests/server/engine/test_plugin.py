"""The plugin entry point registers our architecture lazily; our model never imports vLLM's
own `llava` module (which needs torchvision)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

from smolora.server.engine.config import ARCHITECTURE


def test_entry_point_is_declared() -> None:
    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("smolora") == "smolora.server.engine.plugin:register"


def test_register_is_lazy_and_idempotent() -> None:
    code = (
        "import sys\n"
        "from smolora.server.engine.plugin import register\n"
        "register(); register()\n"
        "from vllm import ModelRegistry\n"
        f"assert {ARCHITECTURE!r} in ModelRegistry.get_supported_archs()\n"
        "assert 'smolora.server.engine.model' not in sys.modules\n"
        "import smolora.server.engine.model\n"
        "assert 'vllm.model_executor.models.llava' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
