"""Task-balanced route assignment for the learned SMoLoRA router.

Why: trained by the task loss alone (straight-through top-1 in task 1, gates frozen after),
the routers collapse — every task lands on the same experts, so each new task overwrites
the experts the old ones use (measured on mini-CVIT: IF experts shared across tasks in
86–100% of layers). A gate that only ever saw task 1 cannot separate tasks it has not met.

What the learned router does instead, at the start of every task and per adapted layer:
1. IF route: a task whose instruction text an earlier task already used keeps that task's
   IF expert (same instruction, same route: the contract's IF semantics); a new
   instruction gets the least-loaded IF expert.
2. VU route: the least-loaded VU expert, preferring one not already paired with the same
   IF expert, so (VU, IF) pairs stay distinct as long as there are enough of them.
3. Both gates are refit by gradient descent (softmax cross-entropy on the gate logits, the
   same `x @ G^T` the router computes) on a route memory: the instruction embeddings and a
   few per-request mean layer inputs of every task so far, each labelled with its expert.
   Old tasks' routes are thus held, and the new task's inputs route to its assigned experts.
   During the task itself the gates are frozen and the task's experts train.

Measured limits (mini-CVIT): the projector sees only the image, and tasks share image
distributions, so its VU gate cannot separate them (fit accuracy ~0.8); the fusion
vectors are one pair per layer for all tasks; tasks with the same instruction text share
their IF expert by construction. Freezing the fusion vectors and the projector's VU experts
after task 1 was tried and did not change the forgetting measured.

The route memory stores, per past task and layer, a few dozen mean input vectors
(aggregates, not examples) and the instruction embeddings; the trainer keeps it in the run
folder (`ContinualMethod.run_state`) so a resumed run refits identically. This module
holds the pure parts (assignment, fitting, memory); `smolora.py` wires it into the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from torch import Tensor

Kind = Literal["vu", "if"]


def pick_expert(loads: Sequence[int], avoid: set[int] | frozenset[int] = frozenset()) -> int:
    """The expert to give a new task: not in `avoid` if possible, then least loaded, then
    lowest index.

    Args:
        loads: number of tasks already routed to each expert.
        avoid: experts to use only if every other one is also avoided.
    """
    return min(range(len(loads)), key=lambda k: (k in avoid, loads[k], k))


@torch.no_grad()
def gate_accuracy(gate: Tensor, feats: Tensor, targets: Tensor) -> float:
    """Share of rows of `feats` whose top-1 route under `gate` is their target."""
    if feats.shape[0] == 0:
        return 1.0
    return float(((feats.float() @ gate.float().t()).argmax(-1) == targets).float().mean())


def fit_gate(gate: Tensor, feats: Tensor, targets: Tensor, steps: int = 300, lr: float = 0.05) -> Tensor:
    """Fit a bias-free gate so that `argmax(feats @ G^T)` equals `targets`.

    Features are standardised by their global RMS for the optimiser's sake and the scale is
    folded back into the returned weight, so the result is a plain gate for raw inputs.
    Deterministic (full batch, Adam, fixed step count), starts from `gate`.

    Args:
        gate: `[K, d]` current gate weight (not modified).
        feats: `[n, d]` inputs (instruction embeddings or mean layer inputs).
        targets: `[n]` long expert ids in `[0, K)`.
        steps, lr: optimisation budget.

    Returns:
        The fitted `[K, d]` gate, in `gate`'s dtype.
    """
    if feats.shape[0] == 0:
        return gate.clone()
    x = feats.detach().float()
    scale = x.pow(2).mean().sqrt().clamp_min(1e-6)
    w = (gate.detach().float() * scale).clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    xs = x / scale
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(xs @ w.t(), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return (w.detach() / scale).to(gate.dtype)


@dataclass
class RouteEntry:
    """The routes one task was given in one layer."""

    stage: int
    task: str
    layer: str
    kind: Kind
    expert: int
    feats: Tensor                      # [n, d] inputs that must route to `expert`
    texts: tuple[str, ...] = ()        # instruction texts (IF entries)


@dataclass
class RouteMemory:
    """Every task's assigned experts and the inputs that hold them, per layer."""

    entries: list[RouteEntry] = field(default_factory=list)

    def truncate(self, stages: int) -> None:
        """Forget stages `>= stages` (a resumed run refits the stage it restarts)."""
        self.entries = [e for e in self.entries if e.stage < stages]

    def of(self, layer: str, kind: Kind) -> list[RouteEntry]:
        return [e for e in self.entries if e.layer == layer and e.kind == kind]

    def loads(self, layer: str, kind: Kind, num_experts: int) -> list[int]:
        """Tasks per expert (a task counts once)."""
        loads = [0] * num_experts
        for e in self.of(layer, kind):
            loads[e.expert] += 1
        return loads

    def if_expert_for(self, layer: str, texts: Sequence[str]) -> int | None:
        """The IF expert of an earlier task that used one of these instruction texts."""
        wanted = set(texts)
        for e in self.of(layer, "if"):
            if wanted & set(e.texts):
                return e.expert
        return None

    def vu_paired_with(self, layer: str, if_expert: int) -> set[int]:
        """VU experts of earlier tasks whose IF expert in this layer is `if_expert`."""
        stages = {e.stage for e in self.of(layer, "if") if e.expert == if_expert}
        return {e.expert for e in self.of(layer, "vu") if e.stage in stages}

    def training_set(self, layer: str, kind: Kind) -> tuple[Tensor, Tensor]:
        """All remembered inputs of one gate and their target experts."""
        es = self.of(layer, kind)
        if not es:
            return torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)
        feats = torch.cat([e.feats.float() for e in es])
        targets = torch.cat([torch.full((e.feats.shape[0],), e.expert, dtype=torch.long) for e in es])
        return feats, targets

    def to_list(self) -> list[dict]:
        """Plain containers and tensors (loadable with `torch.load(weights_only=True)`)."""
        return [dict(e.__dict__) for e in self.entries]

    @classmethod
    def from_list(cls, items: list[dict] | None) -> "RouteMemory":
        return cls([RouteEntry(**d) for d in items or []])
