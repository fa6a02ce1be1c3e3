"""Task-owned route assignment for the learned SMoLoRA router.

Why: trained by the task loss alone (straight-through top-1 in task 1, gates frozen after),
the routers collapse — every task lands on the same experts, so each new task overwrites
the experts the old ones use (measured on mini-CVIT: IF experts shared across tasks in
86–100% of layers). A gate that only ever saw task 1 cannot separate tasks it has not met.

What the learned router does instead, per task and adapted layer:
1. IF route: a task whose instruction text an earlier task already used keeps that task's
   IF expert (same instruction, same route: the contract's IF semantics); a new
   instruction gets the least-loaded IF expert. The IF gate is refit (softmax
   cross-entropy on `u @ G^T`) on every remembered instruction embedding before the task.
2. VU route (text layers): the least-loaded VU expert, preferring one not already paired
   with the same IF expert. The projector sees only the image, which tasks share, so its
   VU gate cannot tell tasks apart: it gets no VU route and its VU experts never train.
3. A task trains only the experts it owns (`RouteMemory.owned`: assigned to no earlier
   task), with its VU routes teacher-forced to its assigned experts.
4. After the task, its requests' prompt-only mean inputs per text layer (what the pinned
   VU route sees at prefill) are remembered, and each VU gate is refit from zero
   (`fit_gate_fresh`: L2-regularised softmax regression) on every task's remembered inputs.
   Because no earlier task's parameters change later, its remembered inputs stay exactly
   what its requests produce when routed right.

Measured on mini-CVIT (before this scheme): gates fit once before each task on 64 means
per task memorised them (fit accuracy 1.0 in text layers) but routed old tasks' test
requests to their experts in only 17–51% of text-layer routes after the last task; the
inputs had been recorded before training and moved as shared experts and fusion vectors
trained. With the scheme: 95–100%.

The route memory stores, per past task and layer, a few hundred mean input vectors
(aggregates, not examples) and the instruction embeddings; the trainer keeps it in the run
folder (`ContinualMethod.run_state`) so a resumed run refits identically. This module
holds the pure parts (assignment, fitting, memory); `smolora.py` wires it into the method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

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


def fit_gate(
    gate: Tensor, feats: Tensor, targets: Tensor, steps: int = 300, lr: float = 0.05
) -> Tensor:
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
    w = _softmax_regression(gate.detach().float() * scale, x / scale, targets, steps, lr, l2=0.0)
    return (w / scale).to(gate.dtype)


def _softmax_regression(
    w0: Tensor, xs: Tensor, targets: Tensor, steps: int, lr: float, l2: float
) -> Tensor:
    """`steps` full-batch Adam steps of softmax cross-entropy on `xs @ W^T` from `w0` (plus
    `l2` times the mean squared row norm when `l2` is non-zero); returns the detached `W`."""
    w = w0.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(xs @ w.t(), targets)
            if l2:
                loss = loss + l2 * w.pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return w.detach()


def fit_gate_fresh(
    num_experts: int,
    feats: Tensor,
    targets: Tensor,
    steps: int = 400,
    lr: float = 0.05,
    l2: float = 1e-3,
) -> Tensor:
    """Fit a bias-free gate from zero so that `argmax(feats @ G^T)` equals `targets`, with an
    L2 penalty (a margin that generalises to unseen requests rather than memorising a few
    dozen points in a space of hundreds of dimensions).

    Each input dimension is scaled by its RMS over `feats` for the optimiser's sake (no
    centring: the gate has no bias) and the scale is folded back into the returned weight,
    so the result is a plain gate for raw inputs. Deterministic: full batch, Adam, fixed
    step count, zero start (the same data always gives the same gate, whatever the gate was).

    Args:
        num_experts: K, rows of the gate.
        feats: `[n, d]` inputs (mean layer inputs).
        targets: `[n]` long expert ids in `[0, K)`.
        steps, lr: optimisation budget.
        l2: weight of the mean squared (scaled) gate weight in the loss.

    Returns:
        The fitted `[K, d]` float32 gate.
    """
    d = feats.shape[-1]
    if feats.shape[0] == 0:
        return torch.zeros(num_experts, d)
    x = feats.detach().float()
    scale = x.pow(2).mean(0).sqrt().clamp_min(1e-6)  # [d]
    return (
        _softmax_regression(torch.zeros(num_experts, d), x / scale, targets, steps, lr, l2) / scale
    )


@dataclass
class RouteEntry:
    """The routes one task was given in one layer."""

    stage: int
    task: str
    layer: str
    kind: Kind
    expert: int
    feats: Tensor  # [n, d] inputs that must route to `expert`
    texts: tuple[str, ...] = ()  # instruction texts (IF entries)


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

    def owned(self, layer: str, stage: int, half: int) -> list[int]:
        """Global ids of the experts stage `stage` owns in `layer`: those assigned to it that
        no earlier stage was assigned (a reused expert stays as the earlier task left it)."""
        mine = [e for e in self.entries if e.layer == layer and e.stage == stage]
        earlier = {(e.kind, e.expert) for e in self.entries if e.layer == layer and e.stage < stage}
        return sorted(
            e.expert + (half if e.kind == "if" else 0)
            for e in mine
            if (e.kind, e.expert) not in earlier
        )

    def vu_paired_with(self, layer: str, if_expert: int) -> set[int]:
        """VU experts of earlier tasks whose IF expert in this layer is `if_expert`."""
        stages = {e.stage for e in self.of(layer, "if") if e.expert == if_expert}
        return {e.expert for e in self.of(layer, "vu") if e.stage in stages}

    def training_set(
        self, layer: str, kind: Kind, upto: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """All remembered inputs of one gate and their target experts (stages `<= upto`
        only, when given)."""
        es = [e for e in self.of(layer, kind) if upto is None or e.stage <= upto]
        if not es:
            return torch.zeros(0, 1), torch.zeros(0, dtype=torch.long)
        feats = torch.cat([e.feats.float() for e in es])
        targets = torch.cat(
            [torch.full((e.feats.shape[0],), e.expert, dtype=torch.long) for e in es]
        )
        return feats, targets

    def to_list(self) -> list[dict]:
        """Plain containers and tensors (loadable with `torch.load(weights_only=True)`)."""
        return [dict(e.__dict__) for e in self.entries]

    @classmethod
    def from_list(cls, items: list[dict] | None) -> RouteMemory:
        return cls([RouteEntry(**d) for d in items or []])
