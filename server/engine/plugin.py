"""vLLM general plugin: registers our LLaVA-architecture model class under its own name.

vLLM calls `register()` (entry point `vllm.general_plugins` -> `smolora`) in every process
it starts: API process, EngineCore, workers, the registry-inspection subprocess. Registration
is lazy (a "module:Class" string) so that importing the plugin never imports torch models or
vLLM's model modules, and it is idempotent. It does not register vLLM's own `llava` module,
which we never import.
"""

from __future__ import annotations

import logging

from smolora.server.engine.config import ARCHITECTURE

logger = logging.getLogger(__name__)

MODEL_CLASS = "smolora.server.engine.model:SMoLoRALlavaForConditionalGeneration"


def register() -> None:
    """Register `ARCHITECTURE` with vLLM's model registry (safe to call repeatedly)."""
    from vllm import ModelRegistry

    if ARCHITECTURE in ModelRegistry.get_supported_archs():
        return
    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    logger.debug("registered vLLM architecture %s -> %s", ARCHITECTURE, MODEL_CLASS)
