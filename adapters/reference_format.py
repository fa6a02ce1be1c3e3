"""The SMoLoRA reference code's checkpoint format: read it, check it, map its tensors.

The paper's code (a PEFT 0.4 fork inside LLaVA's trainer) saves a folder holding
`adapter_model.bin` (`torch.save` of a flat state dict) and `adapter_config.json` (`r`,
`lora_alpha`, `expert_num`, `target_modules`, `ins_type`, and the instruction-embedding
table `ins_emb`). This module parses the config, reads tensors only through
`torch.load(weights_only=True)` (or safetensors), reads the widths of the adaptable linears
from the base model's config, and maps the reference's per-layer tensors onto our canonical
`{layer}.{tensor}` names, checking every key and shape (the table in adapters/README.md,
"Importing the paper's checkpoints"). Anything that cannot be mapped exactly raises
`ReferenceCheckpointError`, whose message says what is wrong.

It does not build manifests, instruction tables or files (see `reference_checkpoint.py`).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from smolora.adapters.checkpoint import CheckpointError, all_finite
from smolora.adapters.config_dicts import read_json_object
from smolora.adapters.instructions import EMBED_DIM

ADAPTER_BIN = "adapter_model.bin"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

#: `base_model.model.<module>.<tensor>`: the names PEFT's `save_pretrained` writes (adapter
#: name stripped). An expert's weight appears as `loraA.<e>.mlp.weight` and, because the
#: expert module aliases it, also as `loraA.<e>.weight`.
_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+?)\."
    r"(?:lora_A\.loraA\.(?P<a>\d+)(?:\.mlp)?\.weight"
    r"|lora_B\.loraB\.(?P<b>\d+)(?:\.mlp)?\.weight"
    r"|(?P<single>lora_vu_gate|lora_ins_gate|lora_fc_A|lora_fc_B)\.weight)$"
)
_MLP_MODULE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)$")
_PROJECTOR_MODULE = re.compile(r"^(?:.*\.)?mm_projector\.(0|2)$")
_PROJECTOR_LAYER = {"0": "projector.linear_1", "2": "projector.linear_2"}
#: our target suffix of each canonical layer kind (SMoLoRAConfig.target_modules)
_TARGET_OF = {
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
    "projector.linear_1": "multi_modal_projector.linear_1",
    "projector.linear_2": "multi_modal_projector.linear_2",
}
_SINGLE = {
    "lora_vu_gate": "gate_vu",
    "lora_ins_gate": "gate_if",
    "lora_fc_A": "fuse_vu",
    "lora_fc_B": "fuse_if",
}


class ReferenceCheckpointError(CheckpointError):
    """A reference checkpoint cannot be imported; the message says what is wrong."""


# -- config ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceConfig:
    """What `adapter_config.json` of a reference checkpoint says.

    Attributes:
        expert_num: E, all experts of a layer (E/2 VU + E/2 IF).
        r: the total rank (each expert has r / E).
        lora_alpha: LoRA alpha; the scaling is alpha / r.
        lora_dropout: training-time dropout (recorded, unused when serving).
        target_modules: PEFT's target list (or pattern), as saved.
        ins_type: the task id the checkpoint was last trained on (row of `ins_emb`).
        ins_emb: `[K, 384]` instruction embeddings, one row per task id.
        peft_type: PEFT's type tag, as saved.
    """

    expert_num: int
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str] | str | None
    ins_type: int
    ins_emb: Tensor
    peft_type: str | None = None

    @property
    def expert_rank(self) -> int:
        return self.r // self.expert_num

    @property
    def experts_per_group(self) -> int:
        return self.expert_num // 2

    def summary(self) -> dict[str, Any]:
        """The scalar fields (JSON-ready), for the manifest's provenance."""
        return {
            "expert_num": self.expert_num,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "ins_type": self.ins_type,
            "ins_emb_rows": int(self.ins_emb.shape[0]),
            "peft_type": self.peft_type,
        }


def _int_field(cfg: dict[str, Any], name: str, path: Path) -> int:
    v = cfg.get(name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ReferenceCheckpointError(f"{path}: '{name}' must be an integer, got {v!r}")
    return v


def read_reference_config(src: str | Path) -> ReferenceConfig:
    """Parse and check `adapter_config.json` of a reference checkpoint folder.

    Raises:
        ReferenceCheckpointError: missing file or field, odd `expert_num`, `r` not divisible
            by it, a missing or malformed `ins_emb`, `ins_type` outside it.
    """
    path = Path(src) / ADAPTER_CONFIG
    cfg = read_json_object(
        path,
        ReferenceCheckpointError,
        f"{Path(src)}: no {ADAPTER_CONFIG}; not a reference SMoLoRA checkpoint folder",
    )
    if "expert_num" not in cfg:
        raise ReferenceCheckpointError(
            f"{path}: no 'expert_num'; this is not a SMoLoRA adapter (peft_type "
            f"{cfg.get('peft_type')!r})"
        )
    e = _int_field(cfg, "expert_num", path)
    if e < 2 or e % 2:
        raise ReferenceCheckpointError(
            f"{path}: expert_num={e} must be even and >= 2 (E/2 VU experts + E/2 IF experts)"
        )
    r = _int_field(cfg, "r", path)
    if r <= 0 or r % e:
        raise ReferenceCheckpointError(
            f"{path}: r={r} is not a positive multiple of expert_num={e} (each expert has rank r "
            "/ expert_num)"
        )
    alpha = cfg.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ReferenceCheckpointError(
            f"{path}: lora_alpha must be a positive number, got {alpha!r}"
        )
    dropout = cfg.get("lora_dropout", 0.0)
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, (int, float))
        or not 0.0 <= dropout < 1.0
    ):
        raise ReferenceCheckpointError(f"{path}: lora_dropout must be in [0, 1), got {dropout!r}")
    ins_type = _int_field(cfg, "ins_type", path)
    table = cfg.get("ins_emb")
    if table is None:
        raise ReferenceCheckpointError(
            f"{path}: no 'ins_emb' instruction-embedding table; the IF experts cannot be routed "
            "without it"
        )
    if isinstance(table, str):
        raise ReferenceCheckpointError(
            f"{path}: 'ins_emb' is a file name ({table!r}), not the table; write the [tasks x "
            f"{EMBED_DIM}] embedding rows into adapter_config.json's 'ins_emb' as a list of lists"
        )
    try:
        emb = torch.tensor(table, dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise ReferenceCheckpointError(
            f"{path}: 'ins_emb' must be a list of equally long lists of numbers ({e})"
        ) from None
    if emb.dim() == 1 and emb.numel():
        emb = emb[None]
    if emb.dim() != 2 or emb.shape[0] == 0:
        raise ReferenceCheckpointError(
            f"{path}: 'ins_emb' must be a [tasks x {EMBED_DIM}] table, got shape {list(emb.shape)}"
        )
    if emb.shape[1] != EMBED_DIM:
        raise ReferenceCheckpointError(
            f"{path}: 'ins_emb' rows have {emb.shape[1]} dims, but this server embeds "
            f"instructions with all-MiniLM-L6-v2 ({EMBED_DIM} dims); a checkpoint routed by "
            "another encoder cannot be served"
        )
    if not all_finite(emb):
        raise ReferenceCheckpointError(f"{path}: 'ins_emb' contains NaN or inf")
    if not 0 <= ins_type < emb.shape[0]:
        raise ReferenceCheckpointError(
            f"{path}: ins_type={ins_type} is not a row of ins_emb (it has {emb.shape[0]} rows)"
        )
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, (str, list)):
        raise ReferenceCheckpointError(
            f"{path}: target_modules must be a list or a pattern, got {targets!r}"
        )
    return ReferenceConfig(
        e,
        r,
        float(alpha),
        float(dropout),
        targets,
        ins_type,
        emb.to(torch.float32),
        cfg.get("peft_type"),
    )


@dataclass(frozen=True)
class BaseShapes:
    """Widths of the adaptable linears of an HF LLaVA base (from its config).

    Attributes:
        num_layers: decoder layers.
        hidden: decoder hidden width.
        intermediate: decoder MLP width.
        projector_in: input width of the projector's first linear (vision features).
    """

    num_layers: int
    hidden: int
    intermediate: int
    projector_in: int

    @classmethod
    def from_model_dir(cls, base_dir: str | Path) -> BaseShapes:
        """Read `config.json` (with transformers' defaults filled in) of a LLaVA folder.

        Raises:
            ReferenceCheckpointError: not an HF LLaVA folder.
        """
        from transformers import AutoConfig

        root = Path(base_dir)
        if not (root / "config.json").is_file():
            raise ReferenceCheckpointError(
                f"{root}: no config.json; --base must be a Hugging Face LLaVA model folder"
            )
        try:
            cfg = AutoConfig.from_pretrained(str(root), local_files_only=True)
        except Exception as e:  # transformers raises several types for a bad config
            raise ReferenceCheckpointError(
                f"{root}/config.json: not a readable model config ({type(e).__name__}: {e})"
            ) from None
        text, vision = getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)
        if text is None or vision is None:
            raise ReferenceCheckpointError(
                f"{root}: model_type {getattr(cfg, 'model_type', '?')!r} has no text and vision "
                "config; --base must be an HF LLaVA folder (LlavaForConditionalGeneration)"
            )
        layers = getattr(cfg, "vision_feature_layer", -2)
        n_feat = len(layers) if isinstance(layers, (list, tuple)) else 1
        return cls(
            int(text.num_hidden_layers),
            int(text.hidden_size),
            int(text.intermediate_size),
            int(vision.hidden_size) * n_feat,
        )

    def linear(self, canonical: str) -> tuple[int, int]:
        """(d_in, d_out) of an adaptable linear by canonical name."""
        if canonical == "projector.linear_1":
            return self.projector_in, self.hidden
        if canonical == "projector.linear_2":
            return self.hidden, self.hidden
        kind = canonical.rsplit(".", 1)[1]
        return (
            (self.intermediate, self.hidden)
            if kind == "down_proj"
            else (self.hidden, self.intermediate)
        )


# -- tensors -------------------------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A flat `{name: tensor}` from a `torch.save` file (weights only) or a safetensors file.

    Raises:
        ReferenceCheckpointError: unreadable, not a flat dict of tensors, or holding pickled
            objects other than tensors (those are never unpickled).
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise ReferenceCheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
        if m is None:
            detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]
            raise ReferenceCheckpointError(
                f"{p}: not a readable torch.save file (the weights-only reader stopped: {detail})"
            ) from None
        raise ReferenceCheckpointError(
            f"{p}: holds pickled objects other than tensors, which are never unpickled here "
            f"(unsupported global {m.group(1)}); re-save it as a plain state dict (a dict of name "
            "-> tensor)"
        ) from None
    except Exception as e:  # a truncated or foreign file: zip, EOF, runtime errors
        raise ReferenceCheckpointError(
            f"{p}: not a readable torch.save file ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(obj, Mapping):
        raise ReferenceCheckpointError(
            f"{p}: holds a {type(obj).__name__}, not a state dict (a dict of name -> tensor)"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ReferenceCheckpointError(
            f"{p}: entries {[str(k) for k in bad[:4]]} are not tensors under string names"
        )
    return dict(obj)


def canonical_reference_layer(module: str) -> str | None:
    """Our canonical layer name for a reference module path, or None when the engine cannot
    route it (`model.layers.3.mlp.up_proj` -> `layers.3.mlp.up_proj`,
    `model.mm_projector.0` -> `projector.linear_1`)."""
    if "vision_tower" in module:
        return None
    m = _MLP_MODULE.match(module)
    if m:
        return f"layers.{m.group(1)}.mlp.{m.group(2)}"
    m = _PROJECTOR_MODULE.match(module)
    return _PROJECTOR_LAYER[m.group(1)] if m else None


def _peft_targets(targets: list[str] | str | None, module: str) -> bool:
    """PEFT 0.4's target rule: a pattern must match the whole module name; a list matches
    by name suffix."""
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module.endswith(t) for t in targets)


def _reference_name(slot: Any) -> str:
    """The reference's tensor name of one of our slots (`("A", 3)` -> `lora_A.loraA.3.weight`)."""
    if isinstance(slot, tuple):
        return f"lora_{slot[0]}.lora{slot[0]}.{slot[1]}.weight"
    return next(ref for ref, ours in _SINGLE.items() if ours == slot) + ".weight"


def first_items(items: Sequence[str], n: int = 4) -> str:
    """The first `n` items joined for an error message, with how many more there are."""
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def map_reference_tensors(
    state: Mapping[str, Tensor], cfg: ReferenceConfig, shapes: BaseShapes
) -> dict[str, Tensor]:
    """Map a reference state dict onto our `{canonical_layer}.{tensor}` names (float32).

    Per layer: `lora_A` `[E, r/E, d_in]` stacks `loraA.{e}`, `lora_B` `[E, d_out, r/E]` stacks
    `loraB.{e}` (expert order kept: VU 0..E/2-1, IF E/2..E-1), `gate_vu` = `lora_vu_gate`
    `[E/2, d_in]`, `gate_if` = `lora_ins_gate` `[E/2, 384]`, `fuse_vu` / `fuse_if` = the
    single rows of `lora_fc_A` / `lora_fc_B` `[d_out]`.

    Raises:
        ReferenceCheckpointError: unknown keys, modules the engine cannot route, conflicting
            duplicate spellings, missing or extra experts and tensors, layers that are not in
            the base or not adapted in every decoder layer, wrong shapes, non-float or
            non-finite values, or modules outside `target_modules`.
    """
    parts: dict[str, dict[Any, Tensor]] = {}
    modules: dict[str, str] = {}
    unknown: list[str] = []
    unroutable: list[str] = []
    conflicts: list[str] = []
    for key, t in state.items():
        m = _KEY.match(key)
        if not m:
            unknown.append(key)
            continue
        module = m.group("module")
        canon = canonical_reference_layer(module)
        if canon is None:
            unroutable.append(module)
            continue
        modules[canon] = module
        slot: Any = (
            ("A", int(m.group("a")))
            if m.group("a")
            else ("B", int(m.group("b")))
            if m.group("b")
            else _SINGLE[m.group("single")]
        )
        prev = parts.setdefault(canon, {}).get(slot)
        if prev is not None:
            if prev.shape != t.shape or not torch.equal(prev, t):
                conflicts.append(key)
            continue
        parts[canon][slot] = t
    if unknown:
        raise ReferenceCheckpointError(
            f"{len(unknown)} keys are not SMoLoRA reference keys: {first_items(sorted(unknown))}; "
            "expected base_model.model.<module>.{lora_A.loraA.<e>[.mlp].weight, "
            "lora_B.loraB.<e>[.mlp].weight, lora_vu_gate.weight, lora_ins_gate.weight, "
            "lora_fc_A.weight, lora_fc_B.weight}"
        )
    if unroutable:
        raise ReferenceCheckpointError(
            f"adapted modules the engine cannot route: {first_items(sorted(set(unroutable)))}; "
            "only the decoder MLP projections (layers.<i>.mlp.gate_proj/up_proj/down_proj) and "
            "mm_projector.0 / .2 can be imported"
        )
    if conflicts:
        raise ReferenceCheckpointError(
            "an expert appears under two names with different tensors: "
            f"{first_items(sorted(conflicts))}; the '.loraA.<e>.weight' and "
            "'.loraA.<e>.mlp.weight' spellings must hold the same tensor"
        )
    if not parts:
        raise ReferenceCheckpointError("the state dict holds no SMoLoRA tensors")

    e, k, half = cfg.expert_num, cfg.expert_rank, cfg.experts_per_group
    want_slots = {("A", i) for i in range(e)} | {("B", i) for i in range(e)} | set(_SINGLE.values())
    problems: list[str] = []
    for canon, got in sorted(parts.items()):
        missing = sorted(want_slots - set(got), key=str)
        extra = sorted(set(got) - want_slots, key=str)
        if extra:
            problems.append(
                f"{modules[canon]}: experts {sorted({s[1] for s in extra})} beyond expert_num={e}"
            )
        if missing:
            problems.append(
                f"{modules[canon]}: missing {first_items([_reference_name(s) for s in missing])}"
            )
    if problems:
        raise ReferenceCheckpointError(
            "incomplete or inconsistent adapter tensors: " + "; ".join(problems[:6])
        )

    mlp_layers = sorted({int(c.split(".")[1]) for c in parts if c.startswith("layers.")})
    outside = [i for i in mlp_layers if i >= shapes.num_layers]
    if outside:
        raise ReferenceCheckpointError(
            f"adapter tensors for decoder layers {outside[:4]}, but the base has "
            f"{shapes.num_layers} layers"
        )
    for kind in ("gate_proj", "up_proj", "down_proj"):
        have = {i for i in range(shapes.num_layers) if f"layers.{i}.mlp.{kind}" in parts}
        if have and len(have) != shapes.num_layers:
            lacking = sorted(set(range(shapes.num_layers)) - have)
            raise ReferenceCheckpointError(
                f"{kind} is adapted in some decoder layers but not in layers {lacking[:6]}; the "
                "engine adapts a projection in every layer or in none"
            )
    if cfg.target_modules is not None:
        stray = sorted(
            mod for mod in modules.values() if not _peft_targets(cfg.target_modules, mod)
        )
        if stray:
            raise ReferenceCheckpointError(
                f"adapter_config.json's target_modules {cfg.target_modules!r} do not cover "
                f"{first_items(stray)}, which the adapter file adapts: the two files are not from "
                "the same run"
            )

    out: dict[str, Tensor] = {}
    for canon, got in parts.items():
        d_in, d_out = shapes.linear(canon)
        want: dict[Any, tuple[int, ...]] = {("A", i): (k, d_in) for i in range(e)}
        want |= {("B", i): (d_out, k) for i in range(e)}
        want |= {
            "gate_vu": (half, d_in),
            "gate_if": (half, EMBED_DIM),
            "fuse_vu": (1, d_out),
            "fuse_if": (1, d_out),
        }
        for slot, shape in want.items():
            t = got[slot]
            name = f"{modules[canon]}.{_reference_name(slot)}"
            if tuple(t.shape) != shape:
                problems.append(f"{name}: shape {list(t.shape)}, expected {list(shape)}")
            elif not t.is_floating_point():
                problems.append(f"{name}: dtype {t.dtype} is not floating point")
            elif not all_finite(t):
                problems.append(f"{name}: contains NaN or inf")
        if problems:
            continue
        out[f"{canon}.lora_A"] = torch.stack([got[("A", i)] for i in range(e)]).to(torch.float32)
        out[f"{canon}.lora_B"] = torch.stack([got[("B", i)] for i in range(e)]).to(torch.float32)
        out[f"{canon}.gate_vu"] = got["gate_vu"].to(torch.float32)
        out[f"{canon}.gate_if"] = got["gate_if"].to(torch.float32)
        out[f"{canon}.fuse_vu"] = got["fuse_vu"][0].to(torch.float32)
        out[f"{canon}.fuse_if"] = got["fuse_if"][0].to(torch.float32)
    if problems:
        raise ReferenceCheckpointError(
            f"tensors do not fit the base model (hidden {shapes.hidden}, intermediate "
            f"{shapes.intermediate}, projector input {shapes.projector_in}; expert_num {e}, rank "
            f"per expert {k}): "
            + "; ".join(problems[:6])
            + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        )
    return out


def adapted_layers(tensors: Mapping[str, Tensor]) -> list[str]:
    """Canonical layers in model order: projector first, then decoder layers (gate, up, down)."""
    names = {k.rsplit(".", 1)[0] for k in tensors}
    order = {"gate_proj": 0, "up_proj": 1, "down_proj": 2}

    def key(n: str) -> tuple[int, int, int]:
        if n.startswith("projector."):
            return (0, int(n[-1]), 0)
        _, i, _, kind = n.split(".")
        return (1, int(i), order[kind])

    return sorted(names, key=key)


def target_modules_of(layers: Sequence[str]) -> tuple[str, ...]:
    """Our `SMoLoRAConfig.target_modules` for a set of canonical layers (default order)."""
    kinds = {
        _TARGET_OF[n] if n.startswith("projector.") else _TARGET_OF[n.rsplit(".", 1)[1]]
        for n in layers
    }
    return tuple(t for t in _TARGET_OF.values() if t in kinds)
