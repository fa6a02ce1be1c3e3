"""Which SMoLoRA experts each task's requests use, and how much tasks share them.

For every task, one prefill forward over some of its examples records the VU and IF route
of every request at every adapted layer (the routing context's trace). From these:
per-layer usage histograms per task, and for every pair of tasks the share of layers in
which their majority VU (or IF) expert is the same. A shared expert is trained by both
tasks, so a high share predicts forgetting. This module only measures; it changes nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from smolora.adapters.smolora import RoutingContext, SMoLoRAModel
from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.cvit_json import Example


@torch.no_grad()
def route_usage(
    smodel: SMoLoRAModel, encoder: ExampleEncoder, embed: Any, examples: Sequence[Example]
) -> dict[str, dict[str, list[int]]]:
    """Expert usage counts of one batch of examples.

    Args:
        smodel: the SMoLoRA-adapted model.
        encoder: batches the examples.
        embed: callable mapping instruction texts to `[B, 384]` embeddings.
        examples: requests (one task's, typically).

    Returns:
        layer -> {"vu": counts per VU expert, "if": counts per IF expert (local ids)}.
    """
    batch = encoder.collate_generate(list(examples))
    device = next(smodel.model.parameters()).device
    ctx = RoutingContext(embed(batch["instructions"]).to(device), vu_routing="pinned")
    was_training = smodel.model.training
    smodel.model.eval()
    with smodel.routing(ctx):
        ctx.set_token_mask(batch["attention_mask"].to(device))
        smodel.model(
            input_ids=batch["input_ids"].to(device),
            pixel_values=batch["pixel_values"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp_min(0).to(device),
        )
    smodel.model.train(was_training)
    half = smodel.config.experts_per_group
    out = {}
    for layer, route in ctx.routes.items():
        vu = Counter(int(v) for v in route.vu_expert)
        inst = Counter(int(f) - half for f in route.if_expert)
        out[layer] = {
            "vu": [vu.get(k, 0) for k in range(half)],
            "if": [inst.get(k, 0) for k in range(half)],
        }
    return out


def sharing(usage: dict[str, dict[str, dict[str, list[int]]]]) -> dict[str, Any]:
    """Pairwise share of layers whose majority VU / IF expert two tasks have in common.

    Args:
        usage: task -> `route_usage` result.

    Returns:
        {"tasks": [...], "vu": T x T shares, "if": T x T shares, "both": T x T shares of
        layers where the majority (VU, IF) pair is the same}.
    """
    tasks = list(usage)
    layers = list(next(iter(usage.values()))) if usage else []

    def major(task: str, layer: str, kind: str) -> int:
        counts = usage[task][layer][kind]
        return max(range(len(counts)), key=counts.__getitem__)

    res: dict[str, Any] = {"tasks": tasks}
    for kind in ("vu", "if", "both"):
        mat = []
        for a in tasks:
            row = []
            for b in tasks:
                if kind == "both":
                    same = [
                        major(a, name, "vu") == major(b, name, "vu")
                        and major(a, name, "if") == major(b, name, "if")
                        for name in layers
                    ]
                else:
                    same = [major(a, name, kind) == major(b, name, kind) for name in layers]
                row.append(round(sum(same) / max(1, len(same)), 3))
            mat.append(row)
        res[kind] = mat
    return res
