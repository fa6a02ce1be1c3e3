"""Typed configuration of a SMoLoRA adapter (see shared SMOLORA.md, "The adapted layer").

This module only describes an adapter; it builds nothing. `SMoLoRAConfig` is stored
verbatim in every checkpoint manifest, so its fields are part of the checkpoint contract:
add fields with defaults, never rename them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from smolora.adapters.config_dicts import config_from_dict, config_to_dict

VuRouting = Literal["pinned", "per_step"]
#: The VU routing modes (shared SMOLORA.md, "Decoding"); the one list every check uses.
VU_ROUTINGS: tuple[str, ...] = get_args(VuRouting)
RouterTraining = Literal["frozen_random", "learned"]

#: Default target modules: every MLP projection of every decoder layer plus both
#: linears of the multimodal projector. Matched as dotted suffixes of module names.
DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "multi_modal_projector.linear_1",
    "multi_modal_projector.linear_2",
)

INSTRUCTION_DIM = 384  # all-MiniLM-L6-v2 sentence-embedding width


@dataclass
class SMoLoRAConfig:
    """Hyper-parameters of one SMoLoRA adapter.

    Attributes:
        num_experts: E, total experts per adapted layer; even. Experts 0..E/2-1 are
            visual-understanding (VU) experts, E/2..E-1 instruction-following (IF) experts.
        rank: r, the total rank; each expert has rank r / E.
        alpha: LoRA alpha; the scaling is alpha / r (total rank, as in the reference).
        dropout: LoRA dropout applied to the layer input before A (training only).
        instruction_dim: width of the instruction embedding the IF gate reads.
        target_modules: dotted module-name suffixes to adapt.
        vu_routing: "pinned" decides the VU route once from the whole prompt and keeps it
            while decoding (serving default); "per_step" recomputes it from the decode
            step's own tokens (reference behaviour).
        router_training: "frozen_random" keeps the gates at their random init (reference
            parity: hard argmax gives them no gradient); "learned" trains them with a
            straight-through top-1 estimator.
        init_std: standard deviation of the A init (B starts at zero).
        gate_init_std: standard deviation of the gate init.
    """

    num_experts: int = 8
    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    instruction_dim: int = INSTRUCTION_DIM
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    vu_routing: VuRouting = "pinned"
    router_training: RouterTraining = "frozen_random"
    init_std: float = 0.01
    gate_init_std: float = 0.02

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.num_experts < 2 or self.num_experts % 2:
            raise ValueError(f"num_experts must be even and >= 2, got {self.num_experts}")
        if self.rank < self.num_experts or self.rank % self.num_experts:
            raise ValueError(
                f"rank ({self.rank}) must be a positive multiple of num_experts "
                f"({self.num_experts})"
            )
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.instruction_dim <= 0:
            raise ValueError(f"instruction_dim must be positive, got {self.instruction_dim}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        if self.vu_routing not in VU_ROUTINGS:
            raise ValueError(f"vu_routing must be 'pinned' or 'per_step', got {self.vu_routing!r}")
        if self.router_training not in ("frozen_random", "learned"):
            raise ValueError(
                "router_training must be 'frozen_random' or 'learned', got "
                f"{self.router_training!r}"
            )

    @property
    def experts_per_group(self) -> int:
        """E/2: the number of VU experts, which equals the number of IF experts."""
        return self.num_experts // 2

    @property
    def expert_rank(self) -> int:
        """r / E: the rank of one expert."""
        return self.rank // self.num_experts

    @property
    def scaling(self) -> float:
        """alpha / r with r the total rank."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SMoLoRAConfig:
        """Build from a manifest dict; unknown keys are an error (they mean a newer format)."""
        return config_from_dict(cls, data, ValueError, "SMoLoRA config")
