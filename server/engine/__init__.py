"""The vLLM-backed SMoLoRA engine: plugin, model, routed-adapter hook, worker extension, API."""
