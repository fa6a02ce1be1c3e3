"""Write checkpoints in the SMoLoRA reference code's exact on-disk layout, for tests.

What its PEFT fork's `save_pretrained` writes for a LLaVA model (module paths of the original
LLaVA code: `model.layers.{i}.mlp.*`, `model.mm_projector.{0,2}`): a flat state dict under
`base_model.model.<module>.<tensor>` keys, saved with `torch.save` as `adapter_model.bin`,
each expert's weight under both of its names (`loraA.{e}.mlp.weight` and the alias
`loraA.{e}.weight`), plus `adapter_config.json` with `expert_num`, `r`, `lora_alpha`,
`target_modules`, `ins_type` and the `ins_emb` table. Values are random and non-zero (B
included) so every expert changes outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from smolora.adapters.tiny_llava import get_preset

#: Module paths (after `base_model.model.`) the reference adapts in a 2-layer LLaVA.
MLP_KINDS = ("gate_proj", "up_proj", "down_proj")
PROJECTOR_MODULES = ("model.mm_projector.0", "model.mm_projector.2")


@dataclass
class ReferenceLayout:
    """A written reference checkpoint.

    Attributes:
        path: the folder.
        state: the saved state dict (one entry per key on disk, aliases included).
        config: the saved adapter_config.json.
        modules: reference module path -> (d_in, d_out).
    """

    path: Path
    state: dict[str, Tensor]
    config: dict
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def ins_emb(self) -> Tensor:
        return torch.tensor(self.config["ins_emb"], dtype=torch.float32)

    def expert(self, module: str, kind: str, e: int) -> Tensor:
        """`kind` "A" or "B": expert e's weight of a module (the `.mlp.weight` spelling)."""
        return self.state[f"base_model.model.{module}.lora_{kind}.lora{kind}.{e}.mlp.weight"]

    def single(self, module: str, name: str) -> Tensor:
        return self.state[f"base_model.model.{module}.{name}.weight"]

    def save(self) -> None:
        """Rewrite both files from `state` and `config` (after a test changed them)."""
        torch.save(self.state, self.path / "adapter_model.bin")
        (self.path / "adapter_config.json").write_text(json.dumps(self.config, indent=2))


def tiny_modules(projector: bool = True) -> dict[str, tuple[int, int]]:
    """Reference module paths of the `tiny` preset and their (d_in, d_out)."""
    p = get_preset("tiny")
    out: dict[str, tuple[int, int]] = {}
    if projector:
        out["model.mm_projector.0"] = (p.vision_hidden, p.text_hidden)
        out["model.mm_projector.2"] = (p.text_hidden, p.text_hidden)
    for i in range(p.text_layers):
        out[f"model.layers.{i}.mlp.gate_proj"] = (p.text_hidden, p.text_intermediate)
        out[f"model.layers.{i}.mlp.up_proj"] = (p.text_hidden, p.text_intermediate)
        out[f"model.layers.{i}.mlp.down_proj"] = (p.text_intermediate, p.text_hidden)
    return out


def write_reference_checkpoint(
    out: Path,
    *,
    expert_num: int = 4,
    r: int = 16,
    lora_alpha: float = 48,
    ins_emb: Tensor | None = None,
    ins_rows: int = 5,
    ins_type: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    projector: bool = True,
    both_spellings: bool = True,
) -> ReferenceLayout:
    """Write a random SMoLoRA reference checkpoint for the tiny LLaVA into `out`.

    Args:
        expert_num, r, lora_alpha: the adapter's sizes (r is the total rank).
        ins_emb: `[K, 384]` instruction table; random rows (`ins_rows` of them) when None.
        ins_type: the task id the checkpoint was last trained on.
        seed: draws all values.
        dtype: tensor dtype on disk (the reference trains in bf16).
        projector: also adapt `mm_projector.0` / `.2`.
        both_spellings: write each expert under `.mlp.weight` and its `.weight` alias.
    """
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    k, half = r // expert_num, expert_num // 2
    modules = tiny_modules(projector)

    def randn(*shape: int, std: float) -> Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    state: dict[str, Tensor] = {}
    for module, (d_in, d_out) in modules.items():
        pre = f"base_model.model.{module}"
        for e in range(expert_num):
            a, b = randn(k, d_in, std=0.05), randn(d_out, k, std=0.3)
            state[f"{pre}.lora_A.loraA.{e}.mlp.weight"] = a
            state[f"{pre}.lora_B.loraB.{e}.mlp.weight"] = b
            if both_spellings:
                state[f"{pre}.lora_A.loraA.{e}.weight"] = a
                state[f"{pre}.lora_B.loraB.{e}.weight"] = b
        state[f"{pre}.lora_vu_gate.weight"] = randn(half, d_in, std=1.0)
        state[f"{pre}.lora_ins_gate.weight"] = randn(half, 384, std=1.0)
        state[f"{pre}.lora_fc_A.weight"] = randn(1, d_out, std=0.2)
        state[f"{pre}.lora_fc_B.weight"] = randn(1, d_out, std=0.2)
    table = ins_emb if ins_emb is not None else torch.randn(ins_rows, 384, generator=gen) * 0.1
    config = {
        "base_model_name_or_path": "vicuna-7b-v1.5",
        "bias": "none",
        "expert_num": expert_num,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "ins_emb": table.tolist(),
        "ins_type": ins_type,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "SMOLORA",
        "r": r,
        "revision": None,
        "target_modules": list(MLP_KINDS)
        + (["mm_projector.0", "mm_projector.2"] if projector else []),
        "task_type": "CAUSAL_LM",
    }
    layout = ReferenceLayout(out, state, config, modules)
    layout.save()
    return layout
