"""Does a loaded checkpoint fit the adapter layout resident in the engine?

Used twice: by the front end on the manifest alone before it reserves a slot (a cheap
refusal with a clear message, no tensor read) and by the worker on the verified tensors
right before copying (the worker is the one reader of the files). A checkpoint that does not
fit is refused as a whole; nothing is copied.

It does not read files (see `smolora.adapters.checkpoint.load_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from smolora.adapters.checkpoint import CheckpointError, CheckpointManifest, all_finite
from smolora.adapters.smolora.config import VU_ROUTINGS
from smolora.server.engine.config import AdapterLayout


class CheckpointMismatchError(CheckpointError):
    """A verified checkpoint whose adapter does not fit the engine's resident layout."""


def check_fit(
    manifest: CheckpointManifest,
    tensors: Mapping[str, Tensor] | None,
    layout: AdapterLayout,
    expected_shapes: Mapping[str, tuple[int, ...] | list[int]],
) -> None:
    """Raise `CheckpointMismatchError` unless the checkpoint matches the layout exactly.

    Args:
        manifest: the checkpoint's manifest.
        tensors: its tensors (None checks the manifest only).
        layout: the engine's adapter layout.
        expected_shapes: `{canonical}.{tensor}` -> shape, for every resident tensor.
    """
    if manifest.adapter_kind != "smolora":
        raise CheckpointMismatchError(
            f"adapter_kind {manifest.adapter_kind!r} is not 'smolora'; this engine serves "
            "SMoLoRA only"
        )
    cfg: dict[str, Any] = manifest.adapter_config
    for field_name, want in (
        ("num_experts", layout.num_experts),
        ("rank", layout.rank),
        ("instruction_dim", layout.instruction_dim),
    ):
        got = cfg.get(field_name)
        if got != want:
            raise CheckpointMismatchError(
                f"adapter {field_name}={got} but the engine holds {want}; restart the engine "
                "with this layout"
            )
    if cfg.get("vu_routing", "pinned") not in VU_ROUTINGS:
        raise CheckpointMismatchError(
            f"adapter vu_routing must be 'pinned' or 'per_step', got {cfg.get('vu_routing')!r}"
        )
    alpha = cfg.get("alpha")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise CheckpointMismatchError(f"adapter alpha must be a positive number, got {alpha!r}")
    want_layers = sorted({k.rsplit(".", 1)[0] for k in expected_shapes})
    if sorted(manifest.layers) != want_layers:
        missing = sorted(set(want_layers) - set(manifest.layers))
        extra = sorted(set(manifest.layers) - set(want_layers))
        raise CheckpointMismatchError(
            f"adapted layers differ from the engine's: missing {missing[:4]}, "
            f"unexpected {extra[:4]}"
        )
    if tensors is None:
        return
    missing_t = sorted(set(expected_shapes) - set(tensors))
    extra_t = sorted(set(tensors) - set(expected_shapes))
    if missing_t or extra_t:
        raise CheckpointMismatchError(
            f"tensor keys differ: missing {missing_t[:4]}, unexpected {extra_t[:4]}"
        )
    for key, shape in expected_shapes.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointMismatchError(
                f"{key}: shape {tuple(t.shape)} but the engine expects {tuple(shape)}"
            )
        if not t.is_floating_point():
            raise CheckpointMismatchError(f"{key}: dtype {t.dtype} is not floating point")
        if not all_finite(t):
            raise CheckpointMismatchError(f"{key}: contains NaN or inf")
