"""Importing the SMoLoRA reference code's checkpoints (`reference_format.py`,
`reference_checkpoint.py`): the key mapping onto our tensors, the manifest (per-step VU
routing, the instruction table from `ins_emb`), publishing and loading the result, the
`non_lora_trainables.bin` check and patched base, and one test per refusal.

Checkpoints are written in the reference's exact layout by `reference_layout.py`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from smolora.adapters.checkpoint import base_model_fingerprint, load_checkpoint, publish_checkpoint
from smolora.adapters.reference_checkpoint import (
    InstructionSpec,
    convert_reference_checkpoint,
    cvit_instructions,
    read_instruction_file,
)
from smolora.adapters.reference_format import ReferenceCheckpointError
from smolora.adapters.smolora import SMoLoRAConfig, SMoLoRAModel
from smolora.adapters.tiny_llava import load_llava
from tests.adapters.reference_layout import ReferenceLayout, write_reference_checkpoint

SPECS = [InstructionSpec(f"task{k}", f"Instruction number {k}.") for k in range(5)]


@pytest.fixture()
def ref(tmp_path: Path) -> ReferenceLayout:
    return write_reference_checkpoint(tmp_path / "ref", dtype=torch.bfloat16, seed=3)


def _convert(layout: ReferenceLayout, base: Path, **kw):
    kw.setdefault("instructions", SPECS)
    return convert_reference_checkpoint(layout.path, base, **kw)


def test_tensors_map_onto_canonical_layers(ref: ReferenceLayout, tiny_model_dir: Path) -> None:
    """Every reference tensor lands, unchanged (bf16 -> fp32 is exact), in our layout:
    experts stacked in the same order (VU first), gates as they are, fc rows as fusion vectors."""
    res = _convert(ref, tiny_model_dir)
    t = res.tensors
    names = {
        "model.mm_projector.0": "projector.linear_1",
        "model.mm_projector.2": "projector.linear_2",
    }
    names |= {
        f"model.layers.{i}.mlp.{k}": f"layers.{i}.mlp.{k}"
        for i in range(2)
        for k in ("gate_proj", "up_proj", "down_proj")
    }
    assert set(ref.modules) == set(names) and len(t) == 6 * len(names)
    for module, canon in names.items():
        for e in range(4):
            assert torch.equal(t[f"{canon}.lora_A"][e], ref.expert(module, "A", e).float())
            assert torch.equal(t[f"{canon}.lora_B"][e], ref.expert(module, "B", e).float())
        assert torch.equal(t[f"{canon}.gate_vu"], ref.single(module, "lora_vu_gate").float())
        assert torch.equal(t[f"{canon}.gate_if"], ref.single(module, "lora_ins_gate").float())
        assert torch.equal(t[f"{canon}.fuse_vu"], ref.single(module, "lora_fc_A")[0].float())
        assert torch.equal(t[f"{canon}.fuse_if"], ref.single(module, "lora_fc_B")[0].float())
        assert all(v.dtype == torch.float32 for v in t.values())


def test_manifest_records_reference_semantics_and_instruction_table(
    ref: ReferenceLayout, tiny_model_dir: Path
) -> None:
    m = _convert(ref, tiny_model_dir, tasks=["sqa", "vqa", "cap", "cls", "gqa"]).manifest
    cfg = SMoLoRAConfig.from_dict(m.adapter_config)
    assert (cfg.num_experts, cfg.rank, cfg.alpha, cfg.expert_rank) == (4, 16, 48.0, 4)
    assert cfg.scaling == 3.0  # alpha / total rank
    assert cfg.vu_routing == "per_step"
    assert cfg.target_modules == SMoLoRAConfig().target_modules
    assert m.base_model["fingerprint"] == base_model_fingerprint(tiny_model_dir)
    assert m.tasks == ["sqa", "vqa", "cap"]  # rows 0..ins_type were learned
    assert [t["name"] for t in m.instruction_types] == ["sqa", "vqa", "cap", "cls", "gqa"]
    assert [t["text"] for t in m.instruction_types] == [s.text for s in SPECS]
    assert torch.equal(torch.tensor([t["embedding"] for t in m.instruction_types]), ref.ins_emb)
    assert m.training["source"] == "smolora-reference"
    assert set(m.training["reference_semantics"]) == {"vu_routing", "vu_mean", "expert_order"}
    assert m.training["imported_from"]["adapter_config"]["ins_type"] == 2


def test_published_import_loads_into_our_model(
    ref: ReferenceLayout, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The published version passes verification against the base and fits `SMoLoRAModel`."""
    res = _convert(ref, tiny_model_dir)
    entry = publish_checkpoint(tmp_path / "registry", res.tensors, res.manifest)
    ckpt = load_checkpoint(entry.path, base_model_fingerprint(tiny_model_dir))
    model, _ = load_llava(tiny_model_dir)
    smodel = SMoLoRAModel(model, SMoLoRAConfig.from_dict(ckpt.manifest.adapter_config))
    smodel.load_adapter_state_dict(ckpt.tensors)
    assert sorted(smodel.layers) == sorted(ckpt.manifest.layers)
    assert entry.path.name == "v0001-task2"


def test_one_spelling_only_and_safetensors_are_accepted(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """`.mlp.weight` only (PEFT's state dict), the `.weight` alias only (LLaVA's trainer
    collects `named_parameters`, which lists a shared tensor once), or safetensors."""
    from safetensors.torch import save_file

    layout = write_reference_checkpoint(tmp_path / "ref", both_spellings=False, projector=False)
    res = _convert(layout, tiny_model_dir)
    alias = write_reference_checkpoint(tmp_path / "alias", projector=False)
    alias.state = {k: v for k, v in alias.state.items() if not k.endswith(".mlp.weight")}
    alias.save()
    assert not any(".loraA.0.mlp." in k for k in alias.state)
    from_alias = _convert(alias, tiny_model_dir)
    assert all(torch.equal(from_alias.tensors[k], res.tensors[k]) for k in res.tensors)
    assert all(n.startswith("layers.") for n in res.manifest.layers)
    assert res.manifest.adapter_config["target_modules"] == [
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    (layout.path / "adapter_model.bin").unlink()
    save_file(
        {k: v.contiguous() for k, v in layout.state.items()},
        str(layout.path / "adapter_model.safetensors"),
    )
    again = _convert(layout, tiny_model_dir)
    assert all(torch.equal(again.tensors[k], res.tensors[k]) for k in res.tensors)


def test_default_instructions_are_the_papers_cvit_list(
    tmp_path: Path, tiny_model_dir: Path, instruction_encoder
) -> None:
    """With no instruction file the CVIT list names the rows; texts whose MiniLM embeddings
    are the rows (as the paper computed them) score cosine 1."""
    cvit = cvit_instructions()
    assert [s.task for s in cvit] == [
        "scienceqa",
        "textvqa",
        "flickr30k",
        "imagenet",
        "gqa",
        "vqav2",
        "places365",
    ]
    emb = instruction_encoder.encode([s.text for s in cvit])
    layout = write_reference_checkpoint(tmp_path / "ref", ins_emb=emb, ins_type=5)
    res = convert_reference_checkpoint(
        layout.path, tiny_model_dir, encoder=instruction_encoder.encode
    )
    assert res.manifest.tasks == ["scienceqa", "textvqa", "flickr30k", "imagenet", "gqa", "vqav2"]
    assert [t["text"] for t in res.manifest.instruction_types] == [s.text for s in cvit]
    assert res.instruction_similarity is not None and min(res.instruction_similarity) > 0.9999
    # A table with fewer rows takes the list's first rows (task ids are CVIT order).
    short = write_reference_checkpoint(tmp_path / "short", ins_emb=emb[:3], ins_type=0)
    assert [
        t["name"]
        for t in convert_reference_checkpoint(short.path, tiny_model_dir).manifest.instruction_types
    ] == ["scienceqa", "textvqa", "flickr30k"]


def test_instruction_files(tmp_path: Path) -> None:
    j = tmp_path / "ins.json"
    j.write_text(json.dumps({"instructions": [{"task": "a", "text": "Do A."}, "Do B."]}))
    assert read_instruction_file(j) == [
        InstructionSpec("a", "Do A."),
        InstructionSpec("task1", "Do B."),
    ]
    t = tmp_path / "ins.txt"
    t.write_text("What is it?\\nAnswer briefly.\n\nDescribe it.\n")
    assert read_instruction_file(t) == [
        InstructionSpec("task0", "What is it?\nAnswer briefly."),
        InstructionSpec("task1", "Describe it."),
    ]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"task": "x"}]))
    with pytest.raises(ReferenceCheckpointError, match="'text'"):
        read_instruction_file(bad)


# -- non_lora_trainables.bin -----------------------------------------------------------------------
def _projector(base: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if "multi_modal_projector" in k}


def _non_lora(base: Path, change: bool) -> dict[str, torch.Tensor]:
    proj = _projector(base)
    out = {}
    for i, name in (("0", "linear_1"), ("2", "linear_2")):
        for kind in ("weight", "bias"):
            t = proj[f"multi_modal_projector.{name}.{kind}"].clone()
            out[f"base_model.model.model.mm_projector.{i}.{kind}"] = (
                t + 0.25 if change and kind == "weight" else t
            )
    return out


def test_non_lora_trainables_equal_to_the_base_are_accepted(
    ref: ReferenceLayout, tiny_model_dir: Path
) -> None:
    torch.save(_non_lora(tiny_model_dir, change=False), ref.path / "non_lora_trainables.bin")
    res = _convert(ref, tiny_model_dir)
    assert (
        res.patched_base is None
        and res.manifest.training["imported_from"]["non_lora_trainables"] == "equal to the base"
    )


def test_trained_projector_is_refused_or_patched_into_a_base_copy(
    ref: ReferenceLayout, tiny_model_dir: Path, tmp_path: Path
) -> None:
    trained = _non_lora(tiny_model_dir, change=True)
    torch.save(trained, ref.path / "non_lora_trainables.bin")
    with pytest.raises(ReferenceCheckpointError, match="own projector weights.*--patch-base"):
        _convert(ref, tiny_model_dir)
    res = _convert(ref, tiny_model_dir, patched_base_dir=tmp_path / "patched")
    assert res.patched_base == tmp_path / "patched"
    patched = _projector(res.patched_base)
    assert torch.equal(
        patched["multi_modal_projector.linear_1.weight"],
        trained["base_model.model.model.mm_projector.0.weight"],
    )
    assert torch.equal(
        patched["multi_modal_projector.linear_2.bias"],
        _projector(tiny_model_dir)["multi_modal_projector.linear_2.bias"],
    )
    assert (
        res.manifest.base_model["fingerprint"]
        == base_model_fingerprint(res.patched_base)
        != base_model_fingerprint(tiny_model_dir)
    )
    assert res.manifest.base_model["patched_from"]["fingerprint"] == base_model_fingerprint(
        tiny_model_dir
    )
    load_llava(res.patched_base)  # a complete model folder
    with pytest.raises(ReferenceCheckpointError, match="already exists"):
        _convert(ref, tiny_model_dir, patched_base_dir=tmp_path / "patched")


def test_non_lora_trainables_with_other_weights_are_refused(
    ref: ReferenceLayout, tiny_model_dir: Path
) -> None:
    torch.save(
        {"base_model.model.model.embed_tokens.weight": torch.zeros(3)},
        ref.path / "non_lora_trainables.bin",
    )
    with pytest.raises(ReferenceCheckpointError, match="other than the projector"):
        _convert(ref, tiny_model_dir)


# -- refusals --------------------------------------------------------------------------------------
class Evil:
    """Unpickling this would run a command; `weights_only=True` must refuse it."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/smolora-reference-import-was-unpickled")

LAYER0 = "base_model.model.model.layers.0.mlp.gate_proj"


def _drop_expert(r: ReferenceLayout) -> None:
    for k in [k for k in r.state if ".loraB.3." in k and k.startswith(LAYER0)]:
        del r.state[k]


def _conflict(r: ReferenceLayout) -> None:
    r.state[f"{LAYER0}.lora_A.loraA.1.weight"] = r.state[f"{LAYER0}.lora_A.loraA.1.weight"] + 1


def _unknown(r: ReferenceLayout) -> None:
    r.state[f"{LAYER0}.lora_magnitude_vector.weight"] = torch.ones(3)


def _attention(r: ReferenceLayout) -> None:
    for k in [k for k in r.state if k.startswith(LAYER0)]:
        r.state[k.replace("mlp.gate_proj", "self_attn.q_proj")] = r.state[k]


def _wrong_shape(r: ReferenceLayout) -> None:
    r.state[f"{LAYER0}.lora_vu_gate.weight"] = torch.zeros(2, 65)


def _partial_layers(r: ReferenceLayout) -> None:
    for k in [k for k in r.state if ".layers.1.mlp.up_proj." in k]:
        del r.state[k]


def _extra_layer(r: ReferenceLayout) -> None:
    for k in [k for k in r.state if k.startswith(LAYER0)]:
        r.state[k.replace("layers.0.", "layers.7.")] = r.state[k]


def _nan(r: ReferenceLayout) -> None:
    t = r.state[f"{LAYER0}.lora_fc_A.weight"].clone()
    t[0, 0] = float("nan")
    r.state[f"{LAYER0}.lora_fc_A.weight"] = t


def _int_tensor(r: ReferenceLayout) -> None:
    r.state[f"{LAYER0}.lora_fc_B.weight"] = torch.zeros(1, 128, dtype=torch.int64)


def _odd_experts(r: ReferenceLayout) -> None:
    r.config["expert_num"] = 3


def _rank_not_divisible(r: ReferenceLayout) -> None:
    r.config["r"] = 18


def _no_table(r: ReferenceLayout) -> None:
    del r.config["ins_emb"]


def _table_path(r: ReferenceLayout) -> None:
    r.config["ins_emb"] = "playground/ins_emb_single.pkl"


def _wide_table(r: ReferenceLayout) -> None:
    r.config["ins_emb"] = torch.zeros(5, 768).tolist()


def _ins_type_outside(r: ReferenceLayout) -> None:
    r.config["ins_type"] = 5


def _no_expert_num(r: ReferenceLayout) -> None:
    del r.config["expert_num"]


def _targets_elsewhere(r: ReferenceLayout) -> None:
    r.config["target_modules"] = ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_drop_expert, r"missing lora_B\.loraB\.3\.weight"),
        (_conflict, "two names with different tensors"),
        (_unknown, "not SMoLoRA reference keys"),
        (_attention, "cannot route: model.layers.0.self_attn.q_proj"),
        (_wrong_shape, r"lora_vu_gate\.weight: shape \[2, 65\], expected \[2, 64\]"),
        (_partial_layers, r"up_proj is adapted in some decoder layers but not in layers \[1\]"),
        (_extra_layer, r"decoder layers \[7\], but the base has 2"),
        (_nan, "NaN"),
        (_int_tensor, "not floating point"),
        (_odd_experts, "must be even"),
        (_rank_not_divisible, "not a positive multiple of expert_num"),
        (_no_table, "no 'ins_emb'"),
        (_table_path, "is a file name"),
        (_wide_table, "768 dims.*384"),
        (_ins_type_outside, "ins_type=5 is not a row"),
        (_no_expert_num, "not a SMoLoRA adapter"),
        (_targets_elsewhere, "not from the same run"),
    ],
)
def test_refusals(
    ref: ReferenceLayout,
    tiny_model_dir: Path,
    corrupt: Callable[[ReferenceLayout], None],
    message: str,
) -> None:
    corrupt(ref)
    ref.save()
    with pytest.raises(ReferenceCheckpointError, match=message):
        _convert(ref, tiny_model_dir)


def test_pickled_objects_are_never_unpickled(ref: ReferenceLayout, tiny_model_dir: Path) -> None:
    MARKER.unlink(missing_ok=True)
    torch.save({**ref.state, "evil": Evil()}, ref.path / "adapter_model.bin")
    with pytest.raises(
        ReferenceCheckpointError, match="pickled objects other than tensors.*never unpickled"
    ):
        _convert(ref, tiny_model_dir)
    assert not MARKER.exists()
    torch.save([torch.zeros(2)], ref.path / "adapter_model.bin")
    with pytest.raises(ReferenceCheckpointError, match="not a state dict"):
        _convert(ref, tiny_model_dir)
    (ref.path / "adapter_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ReferenceCheckpointError, match="not a readable torch.save file"):
        _convert(ref, tiny_model_dir)


def test_instruction_counts_and_names_must_match_the_table(
    ref: ReferenceLayout, tiny_model_dir: Path
) -> None:
    with pytest.raises(
        ReferenceCheckpointError, match="4 instructions given, but ins_emb has 5 rows"
    ):
        _convert(ref, tiny_model_dir, instructions=SPECS[:4])
    with pytest.raises(
        ReferenceCheckpointError, match="3 task names given, but ins_emb has 5 rows"
    ):
        _convert(ref, tiny_model_dir, tasks=["a", "b", "c"])
    with pytest.raises(ReferenceCheckpointError, match=r"task names \['a'\] repeat"):
        _convert(ref, tiny_model_dir, tasks=["a", "a", "b", "c", "d"])
    ref.config["ins_emb"] = torch.zeros(9, 384).tolist()
    ref.save()
    with pytest.raises(ReferenceCheckpointError, match="9 rows but the default CVIT list has 7"):
        convert_reference_checkpoint(ref.path, tiny_model_dir)


def test_missing_files_and_non_llava_base(
    ref: ReferenceLayout, tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ReferenceCheckpointError, match="no config.json"):
        _convert(ref, tmp_path)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 64})
    )
    with pytest.raises(ReferenceCheckpointError, match="must be an HF LLaVA folder"):
        _convert(ref, tmp_path / "llama")
    (ref.path / "adapter_model.bin").unlink()
    with pytest.raises(ReferenceCheckpointError, match="no adapter_model.bin"):
        _convert(ref, tiny_model_dir)
    shutil.rmtree(ref.path)
    with pytest.raises(ReferenceCheckpointError, match="not a folder"):
        _convert(ref, tiny_model_dir)
