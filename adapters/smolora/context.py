"""Routing context: the per-request inputs SMoLoRA layers read, and the routes they record.

A `RoutingContext` covers one batch of B requests for the life of one generation (prefill
and every decode step). The caller creates it, enters it with `SMoLoRAModel.routing(ctx)`
(scoped: no globals) and, before each forward, says which tokens are real with
`set_token_mask`. Layers call back into it to lay out their input as per-request token
streams, to pin or recompute VU routes, and to record routes and fusion weights.

It does not compute expert outputs (see `layer.py`) and does not embed instructions
(see `adapters/instructions.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from smolora.adapters.smolora.config import VU_ROUTINGS, VuRouting


@dataclass
class TokenLayout:
    """A layer input flattened to token rows, each tagged with its request.

    Attributes:
        owners: request index of each row, `[N]` long.
        valid: whether the row is a real token (padding is not), `[N]` bool.
        num_segments: B, the number of requests.
    """

    owners: Tensor
    valid: Tensor
    num_segments: int


@dataclass
class BatchLayerRoutes:
    """What one adapted layer decided for each request of the batch, as tensors.

    The engine's `smolora.server.engine.protocol.LayerRoute` is the other view of the same
    decision: one request's route through one layer, as plain numbers for a response.

    Attributes:
        vu_expert: VU expert id chosen at prefill (the pinned route), `[B]` long.
        if_expert: IF expert id (global id, in E/2..E-1), `[B]` long.
        fusion_sum: sum over real tokens of (w_vu, w_if), `[B, 2]`.
        token_count: number of real tokens summed, `[B]`.
        vu_steps: in `per_step` mode, the VU route of each later forward call.
    """

    vu_expert: Tensor
    if_expert: Tensor
    fusion_sum: Tensor
    token_count: Tensor
    vu_steps: list[Tensor] = field(default_factory=list)

    def mean_fusion(self) -> Tensor:
        """Mean fusion weights per request, `[B, 2]` (w_vu, w_if)."""
        return self.fusion_sum / self.token_count.clamp_min(1.0)[:, None]


class RoutingContext:
    """Routing inputs and state for one batch of requests.

    Args:
        instruction: instruction embedding per request, `[B, 384]`.
        vu_routing: "pinned" or "per_step" (see `SMoLoRAConfig.vu_routing`).
        image_owner: request index of each image, `[num_images]` long; defaults to one image
            per request in order.
        pinned_vu: optional pre-decided VU routes, layer name -> `[B]`, e.g. to recompute a
            pinned generation without the KV cache.
    """

    def __init__(
        self,
        instruction: Tensor,
        vu_routing: VuRouting = "pinned",
        image_owner: Tensor | None = None,
        pinned_vu: dict[str, Tensor] | None = None,
    ) -> None:
        if instruction.dim() != 2:
            raise ValueError(f"instruction must be [B, d], got shape {tuple(instruction.shape)}")
        if vu_routing not in VU_ROUTINGS:
            raise ValueError(f"vu_routing must be 'pinned' or 'per_step', got {vu_routing!r}")
        self.instruction = instruction
        self.vu_routing: VuRouting = vu_routing
        self.batch_size = instruction.shape[0]
        self.image_owner = image_owner
        self.token_mask: Tensor | None = None
        self.routes: dict[str, BatchLayerRoutes] = {}
        self._preset_vu = dict(pinned_vu or {})

    # -- called by the caller ------------------------------------------------------------
    def set_token_mask(self, mask: Tensor | None) -> None:
        """Mark the real tokens of the next forward, `[B, T]` (None: all are real)."""
        self.token_mask = mask

    # -- called by layers ----------------------------------------------------------------
    def text_layout(self, x: Tensor) -> TokenLayout:
        """Layout of a decoder-layer input `[B, T, d]`."""
        if x.dim() != 3 or x.shape[0] != self.batch_size:
            raise ValueError(
                f"expected a [B={self.batch_size}, T, d] layer input, got {tuple(x.shape)}"
            )
        b, t = x.shape[0], x.shape[1]
        owners = torch.arange(b, device=x.device).repeat_interleave(t)
        if self.token_mask is None:
            valid = torch.ones(b * t, dtype=torch.bool, device=x.device)
        elif tuple(self.token_mask.shape) == (b, t):
            valid = self.token_mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        else:
            raise ValueError(
                f"token mask of shape {tuple(self.token_mask.shape)} does not fit a layer input of "
                f"[{b}, {t}] tokens: call ctx.set_token_mask(...) before each forward"
            )
        return TokenLayout(owners, valid, b)

    def image_layout(self, x: Tensor) -> TokenLayout:
        """Layout of a projector input `[num_images, P, d]` (every patch is real)."""
        if x.dim() != 3:
            raise ValueError(f"expected a [num_images, P, d] projector input, got {tuple(x.shape)}")
        n, p = x.shape[0], x.shape[1]
        owner = self.image_owner
        if owner is None:
            if n != self.batch_size:
                raise ValueError(
                    f"{n} images for {self.batch_size} requests: pass image_owner to RoutingContext"
                )
            owner = torch.arange(n)
        owners = owner.to(x.device).repeat_interleave(p)
        return TokenLayout(
            owners, torch.ones(n * p, dtype=torch.bool, device=x.device), self.batch_size
        )

    def pinned_vu(self, layer: str) -> Tensor | None:
        """The VU route to reuse for `layer`, or None when it must be computed now."""
        if layer in self._preset_vu:
            return self._preset_vu[layer]
        if self.vu_routing == "pinned" and layer in self.routes:
            return self.routes[layer].vu_expert
        return None

    def record(
        self, layer: str, vu: Tensor, if_global: Tensor, weights: Tensor, layout: TokenLayout
    ) -> None:
        """Record one forward call of `layer`.

        Args:
            vu: VU expert per request, `[B]`.
            if_global: IF expert (global id) per request, `[B]`.
            weights: fusion weights per token row, `[N, 2]`.
            layout: the rows' owners and validity.
        """
        w = weights.detach().to(torch.float32) * layout.valid[:, None]
        fsum = torch.zeros(layout.num_segments, 2, dtype=torch.float32, device=w.device)
        fsum.index_add_(0, layout.owners, w)
        cnt = torch.zeros(layout.num_segments, dtype=torch.float32, device=w.device)
        cnt.index_add_(0, layout.owners, layout.valid.to(torch.float32))
        route = self.routes.get(layer)
        if route is None:
            self.routes[layer] = BatchLayerRoutes(
                vu.detach().clone(), if_global.detach().clone(), fsum, cnt
            )
            return
        route.fusion_sum += fsum
        route.token_count += cnt
        if self.vu_routing == "per_step":
            route.vu_steps.append(vu.detach().clone())

    def trace(self) -> list[list[dict]]:
        """Per request, per adapted layer: VU expert, IF expert and mean fusion weights."""
        out: list[list[dict]] = [[] for _ in range(self.batch_size)]
        for name, route in self.routes.items():
            mean = route.mean_fusion()
            for b in range(self.batch_size):
                out[b].append(
                    {
                        "layer": name,
                        "vu_expert": int(route.vu_expert[b]),
                        "if_expert": int(route.if_expert[b]),
                        "w_vu": float(mean[b, 0]),
                        "w_if": float(mean[b, 1]),
                    }
                )
        return out
