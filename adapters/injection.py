"""Find target linears in a model and swap them for adapter layers, and back.

What it does: matches `nn.Linear` modules by dotted-suffix target names, replaces each with
a wrapper built by a factory, restores the originals on detach, and gives every adapted
layer a canonical, model-agnostic name used in checkpoints and routing traces. What it does
not do: define any adapter math (see `smolora/`, `baselines/`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

_DECODER_MLP = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(\w+)$")
_PROJECTOR = re.compile(r"(?:^|\.)(?:multi_modal_projector|mm_projector)\.(\w+)$")


def canonical_layer_name(qualified_name: str) -> str:
    """A model-agnostic name for an adapted module.

    `model.language_model.layers.3.mlp.up_proj` (transformers 5) and
    `language_model.model.layers.3.mlp.up_proj` (transformers 4) both become
    `layers.3.mlp.up_proj`; projector linears become `projector.<name>`. Other modules keep
    their qualified name.
    """
    m = _DECODER_MLP.search(qualified_name)
    if m:
        return f"layers.{m.group(1)}.mlp.{m.group(2)}"
    m = _PROJECTOR.search(qualified_name)
    if m:
        return f"projector.{m.group(1)}"
    return qualified_name


def is_image_side(canonical_name: str) -> bool:
    """Projector layers read image-patch features, one stream per image, not text tokens."""
    return canonical_name.startswith("projector.")


def matches_target(qualified_name: str, targets: tuple[str, ...]) -> bool:
    """True if the dotted name ends with one of the dotted target suffixes."""
    return any(qualified_name == t or qualified_name.endswith("." + t) for t in targets)


def find_target_linears(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Qualified name -> `nn.Linear` for every linear matching a target suffix.

    Raises:
        ValueError: if no module matches, or two modules share a canonical name.
    """
    found: dict[str, nn.Linear] = {}
    seen: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and matches_target(name, targets):
            canon = canonical_layer_name(name)
            if canon in seen:
                raise ValueError(
                    f"modules {seen[canon]!r} and {name!r} share canonical name {canon!r}"
                )
            seen[canon] = name
            found[name] = module
    if not found:
        raise ValueError(f"no nn.Linear in the model matches target_modules={list(targets)}")
    return found


def _set_submodule(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    parent_name, _, child = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def inject(
    model: nn.Module,
    targets: tuple[str, ...],
    factory: Callable[[nn.Linear, str], nn.Module],
) -> dict[str, nn.Module]:
    """Replace every target linear with `factory(base_linear, canonical_name)`.

    Returns:
        canonical name -> the new wrapper module, in model order.
    """
    wrappers: dict[str, nn.Module] = {}
    for qname, linear in find_target_linears(model, targets).items():
        canon = canonical_layer_name(qname)
        wrapper = factory(linear, canon)
        wrapper.qualified_name = qname  # type: ignore[attr-defined]
        _set_submodule(model, qname, wrapper)
        wrappers[canon] = wrapper
    return wrappers


def eject(model: nn.Module, wrappers: dict[str, nn.Module]) -> None:
    """Put back the base linears that `inject` wrapped."""
    for wrapper in wrappers.values():
        _set_submodule(model, wrapper.qualified_name, wrapper.base)  # type: ignore[attr-defined]
