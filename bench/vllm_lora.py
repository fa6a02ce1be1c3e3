"""vLLM's own multi-LoRA as the peer of our routed adapters, on the same engine and model.

The peer is our engine (`SMoLoRAEngine`, same model class, same vLLM `AsyncLLM`, same engine
arguments) started with our adapters off and vLLM's LoRA on (`enable_lora`), serving one
plain PEFT-format LoRA whose rank is the routed adapter's total rank (all experts) on the
same decoder modules (gate/up/down). Every request names it (`LoRARequest`). Our projector
adapter has no counterpart: vLLM's LoRA on a multimodal connector is experimental, and the
projector runs once per image, not per generated token.

- `write_peft_lora`: a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)
  for a LLaVA folder, with random A and B (B nonzero, so the LoRA changes the output);
- `merge_lora`: the same model folder with the LoRA merged into the base weights (W + s B A),
  the reference the peer must answer exactly like (greedy) - `check_lora_engine`;
- `lora_engine_args`: the vLLM arguments that turn LoRA on;
- `attach_lora`: makes every request of an engine name the LoRA.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from smolora.server.engine.engine import SMoLoRAEngine

#: The decoder modules the peer adapts (our routed adapters' decoder targets).
LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")
LORA_NAME = "peer"


def _text_config(model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    return config.get("text_config", config)


def _lora_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """HF module name -> (in_features, out_features) of every adapted decoder linear."""
    text = _text_config(model_dir)
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    dims = {"gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    return {
        f"language_model.model.layers.{i}.mlp.{name}": dims[name]
        for i in range(text["num_hidden_layers"])
        for name in LORA_TARGETS
    }


def write_peft_lora(
    model_dir: Path, out_dir: Path, rank: int, alpha: float, seed: int = 0, scale: float = 0.02
) -> Path:
    """A PEFT LoRA folder for `model_dir`'s decoder MLPs (random weights, `scale` std)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_in, d_out) in _lora_shapes(model_dir).items():
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * scale
        tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * scale
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(LORA_TARGETS),
        "base_model_name_or_path": str(model_dir),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def merge_lora(model_dir: Path, lora_dir: Path, out_dir: Path) -> Path:
    """A copy of `model_dir` whose adapted weights are W + (alpha / r) B A."""
    shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    lora = load_file(str(lora_dir / "adapter_model.safetensors"))
    for shard in out_dir.glob("*.safetensors"):
        weights = load_file(str(shard))
        for module in _lora_shapes(model_dir):
            name = f"{module}.weight"
            if name not in weights:
                continue
            a = lora[f"base_model.model.{module}.lora_A.weight"].double()
            b = lora[f"base_model.model.{module}.lora_B.weight"].double()
            merged = weights[name].double() + scaling * (b @ a)
            weights[name] = merged.to(weights[name].dtype)
        save_file(weights, str(shard), metadata={"format": "pt"})
    return out_dir


def lora_engine_args(rank: int) -> dict[str, Any]:
    """`EngineConfig.extra_engine_args` for the peer (with `adapters=False`)."""
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1, "max_cpu_loras": 1}


class _LoraForEveryRequest:
    """Wraps an `AsyncLLM` so that each `generate` names one LoRA (the rest passes through)."""

    def __init__(self, llm: Any, lora_request: Any) -> None:
        self._llm = llm
        self._lora_request = lora_request

    def generate(self, prompt: Any, params: Any, request_id: str, **kwargs: Any) -> Any:
        kwargs.setdefault("lora_request", self._lora_request)
        return self._llm.generate(prompt, params, request_id, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)


def attach_lora(engine: SMoLoRAEngine, lora_dir: Path) -> None:
    """Make every request `engine` sends to vLLM name the LoRA in `lora_dir` (the engine must
    have been started with `lora_engine_args`). The benchmark's hook into the engine's
    private `AsyncLLM`: serving plain LoRAs is not a feature of ours."""
    from vllm.lora.request import LoRARequest

    engine._llm = _LoraForEveryRequest(engine._llm, LoRARequest(LORA_NAME, 1, str(lora_dir)))
