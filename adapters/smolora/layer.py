"""The SMoLoRA linear layer: a frozen base linear plus routed VU/IF LoRA experts.

Forward semantics (shared SMOLORA.md, "The adapted layer"), per request b with tokens x_t:
  v = argmax(G_vu · mean_t x_t)              one VU expert, pinned at prefill or per step
  f = argmax(G_if · u_b)                     one IF expert from the instruction embedding
  h_vu = s B_v A_v x_t ; h_if = s B_f A_f x_t
  (w_vu, w_if) = softmax(f_vu · h_vu, f_if · h_if)      per token
  y_t = W0 x_t + b0 + w_vu h_vu + w_if h_if
Only the two routed experts are computed. `dense_reference_delta` computes all E experts and
masks them, as the reference code does, for tests.

This module does not decide how requests are laid out or which tokens are real: it asks
the `RoutingContext` it is given (see `context.py`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from smolora.adapters.smolora import router
from smolora.adapters.smolora.config import SMoLoRAConfig
from smolora.adapters.smolora.context import RoutingContext, TokenLayout

ADAPTER_TENSORS = ("lora_A", "lora_B", "gate_vu", "gate_if", "fuse_vu", "fuse_if")


def routed_expert_apply(x: Tensor, lora_a: Tensor, lora_b: Tensor, expert: Tensor) -> Tensor:
    """`B_e A_e x` for each row with its own expert e, computing only the experts used.

    Args:
        x: `[N, d_in]` token rows.
        lora_a: `[E, r_e, d_in]` all experts' A.
        lora_b: `[E, d_out, r_e]` all experts' B.
        expert: `[N]` long expert id per row.

    Returns:
        `[N, d_out]` (unscaled).
    """
    out = x.new_zeros(x.shape[0], lora_b.shape[1])
    for e in torch.unique(expert).tolist():
        rows = (expert == e).nonzero(as_tuple=True)[0]
        h = (x.index_select(0, rows) @ lora_a[e].t()) @ lora_b[e].t()
        out = out.index_copy(0, rows, h)
    return out


def fuse(h_vu: Tensor, h_if: Tensor, fuse_vu: Tensor, fuse_if: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token softmax fusion of the two routed experts' outputs.

    Args:
        h_vu, h_if: `[N, d_out]` scaled expert outputs.
        fuse_vu, fuse_if: `[d_out]` fusion vectors.

    Returns:
        (delta `[N, d_out]`, weights `[N, 2]` as (w_vu, w_if)).
    """
    logits = torch.stack((h_vu @ fuse_vu, h_if @ fuse_if), dim=-1)
    w = torch.softmax(logits.to(torch.float32), dim=-1).to(h_vu.dtype)
    return w[:, :1] * h_vu + w[:, 1:] * h_if, w


class SMoLoRALinear(nn.Module):
    """A frozen `nn.Linear` with a SMoLoRA expert pool.

    Args:
        base: the linear layer to adapt (kept frozen).
        config: adapter hyper-parameters.
        name: canonical layer name, used in checkpoints and traces.
        image_side: True for projector layers, whose input is image patches.
    """

    TENSORS = ADAPTER_TENSORS

    def __init__(self, base: nn.Linear, config: SMoLoRAConfig, name: str, image_side: bool = False):
        super().__init__()
        self.base = base
        self.config = config
        self.name = name
        self.image_side = image_side
        for p in self.base.parameters():
            p.requires_grad_(False)
        e, r_e, half = config.num_experts, config.expert_rank, config.experts_per_group
        d_in, d_out = base.in_features, base.out_features
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(e, r_e, d_in, device=dev))  # [E, r/E, d_in]
        self.lora_B = nn.Parameter(torch.empty(e, d_out, r_e, device=dev))  # [E, d_out, r/E]
        self.gate_vu = nn.Parameter(torch.empty(half, d_in, device=dev))  # [E/2, d_in]
        self.gate_if = nn.Parameter(torch.empty(half, config.instruction_dim, device=dev))
        self.fuse_vu = nn.Parameter(torch.empty(d_out, device=dev))  # [d_out]
        self.fuse_if = nn.Parameter(torch.empty(d_out, device=dev))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.context: RoutingContext | None = None
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A ~ N(0, init_std^2), B = 0, gates ~ N(0, gate_init_std^2), fusion like nn.Linear.

        Values are drawn on the CPU (from `generator` when given) so that a seed gives the
        same adapter on every device.
        """
        c = self.config
        bound = 1.0 / math.sqrt(self.base.out_features)

        def draw(param: Tensor, kind: str, a: float, b: float = 0.0) -> None:
            buf = torch.empty(param.shape, dtype=torch.float32)
            buf.normal_(0.0, a, generator=generator) if kind == "normal" else buf.uniform_(
                a, b, generator=generator
            )
            param.copy_(buf)

        with torch.no_grad():
            draw(self.lora_A, "normal", c.init_std)
            self.lora_B.zero_()
            draw(self.gate_vu, "normal", c.gate_init_std)
            draw(self.gate_if, "normal", c.gate_init_std)
            draw(self.fuse_vu, "uniform", -bound, bound)
            draw(self.fuse_if, "uniform", -bound, bound)
        self.set_gates_trainable(c.router_training == "learned")

    def set_gates_trainable(self, trainable: bool) -> None:
        """Gates train only with `router_training="learned"` and only when asked to."""
        learned = self.config.router_training == "learned"
        self.gate_vu.requires_grad_(trainable and learned)
        self.gate_if.requires_grad_(trainable and learned)

    def _layout(self, ctx: RoutingContext, x: Tensor) -> TokenLayout:
        return ctx.image_layout(x) if self.image_side else ctx.text_layout(x)

    def _straight_through(self) -> bool:
        return (
            self.training
            and torch.is_grad_enabled()
            and self.config.router_training == "learned"
            and self.gate_vu.requires_grad
        )

    def forward(self, x: Tensor) -> Tensor:  # x: [..., d_in]
        y = self.base(x)
        ctx = self.context
        if ctx is None:
            raise RuntimeError(
                f"SMoLoRA layer {self.name!r} ran without a routing context: wrap the forward "
                "in `with smolora_model.routing(ctx):`"
            )
        layout = self._layout(ctx, x)
        xf = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)  # [N, d_in]
        st = self._straight_through()
        half = self.config.experts_per_group

        vu = ctx.pinned_vu(self.name)
        vu_scale = None
        if vu is None or st:
            mean = router.segment_mean(
                xf.detach() if not st else xf, layout.owners, layout.valid, layout.num_segments
            )
            vu_logits = router.gate_logits(self.gate_vu, mean)  # [B, E/2]
            if vu is None:
                vu = router.top1(vu_logits)
            if st:
                vu_scale = router.straight_through_scale(vu_logits, vu)
        vu = vu.to(x.device)
        if_logits = router.gate_logits(self.gate_if, ctx.instruction.to(x.device))
        if_local = router.top1(if_logits)
        if_scale = router.straight_through_scale(if_logits, if_local) if st else None

        xd = self.dropout(xf)
        s = self.config.scaling
        tok_vu = vu[layout.owners]
        tok_if = if_local[layout.owners] + half
        h_vu = s * routed_expert_apply(xd, self.lora_A, self.lora_B, tok_vu)
        h_if = s * routed_expert_apply(xd, self.lora_A, self.lora_B, tok_if)
        if vu_scale is not None:
            h_vu = h_vu * vu_scale[layout.owners][:, None].to(h_vu.dtype)
        if if_scale is not None:
            h_if = h_if * if_scale[layout.owners][:, None].to(h_if.dtype)
        delta, w = fuse(h_vu, h_if, self.fuse_vu, self.fuse_if)
        ctx.record(self.name, vu, if_local + half, w, layout)
        return y + delta.reshape(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"name={self.name}, experts={c.num_experts}, rank={c.rank}, "
            f"image_side={self.image_side}"
        )


def dense_reference_delta(
    layer: SMoLoRALinear, x: Tensor, vu: Tensor, if_local: Tensor, owners: Tensor
) -> Tensor:
    """All-experts reference (as the reference code computes it): run every expert, mask.

    Args:
        layer: the SMoLoRA layer.
        x: `[N, d_in]` token rows.
        vu: `[B]` VU expert ids; if_local: `[B]` IF expert ids within the IF half.
        owners: `[N]` request index per row.

    Returns:
        `[N, d_out]` adapter delta (no base output).
    """
    c = layer.config
    half = c.experts_per_group
    all_h = torch.einsum("nd,erd->enr", x, layer.lora_A)
    all_h = torch.einsum("enr,eor->eno", all_h, layer.lora_B) * c.scaling  # [E, N, d_out]
    vu_mask = F.one_hot(vu[owners], half).t().to(x.dtype)  # [E/2, N]
    if_mask = F.one_hot(if_local[owners], half).t().to(x.dtype)
    h_vu = (all_h[:half] * vu_mask[..., None]).sum(0)
    h_if = (all_h[half:] * if_mask[..., None]).sum(0)
    delta, _ = fuse(h_vu, h_if, layer.fuse_vu, layer.fuse_if)
    return delta
