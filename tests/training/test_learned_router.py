"""The learned SMoLoRA router's training rules (`training/methods/smolora.py`): which
experts a task may train, teacher-forced VU routes, and fusion vectors frozen after task 1."""

from __future__ import annotations

from pathlib import Path

import torch

from smolora.adapters.instructions import InstructionEncoder
from smolora.adapters.tiny_llava import load_llava
from smolora.training.config import AdapterSizes, RunConfig
from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.mini_cvit import load_split
from smolora.training.methods import build_method


def test_a_task_reusing_an_instruction_trains_only_its_own_vu_expert(
    base_dir: Path, data_root: Path, tmp_path: Path
) -> None:
    run = RunConfig(
        method="smolora_learned",
        data_root=data_root,
        base_dir=base_dir,
        out_dir=tmp_path,
        adapter=AdapterSizes(rank=8, alpha=16, num_experts=4, lora_rank=4, lora_alpha=8),
    )
    model, processor = load_llava(base_dir)
    method = build_method(run, InstructionEncoder())
    method.attach(model)
    enc = ExampleEncoder(processor)
    textvqa = load_split(data_root, "single", "textvqa", "train", limit=4)
    gqa = load_split(data_root, "single", "gqa", "train", limit=4)
    assert {e.instruction for e in textvqa} == {e.instruction for e in gqa}  # the same template
    half = 2

    method.prepare_task(0, "textvqa", textvqa, probe=None)
    layers = method.smodel.layers
    for name, layer in layers.items():
        if layer.image_side:  # projector: IF expert only, its VU experts never train
            assert method.trainable_experts(name) == [half]
        else:
            assert method.trainable_experts(name) == [0, half]

    method.prepare_task(1, "gqa", gqa, probe=None)
    method.begin_task(1, "gqa")
    text = [n for n, layer in layers.items() if not layer.image_side]
    for name, layer in layers.items():
        # GQA keeps TextVQA's IF expert (same instruction) and may not change it.
        assert method.trainable_experts(name) == ([] if layer.image_side else [1]), name
        assert not layer.fuse_vu.requires_grad and not layer.fuse_if.requires_grad
    assert all(p.requires_grad for layer in layers.values() for p in (layer.lora_A, layer.lora_B))

    with torch.no_grad():  # non-zero B everywhere, so that every routed expert gets gradient
        for layer in layers.values():
            layer.lora_B.normal_(0.0, 0.01)
    model.train()
    batch = enc.collate_train(gqa)
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with method.scope(batch) as set_mask:
        set_mask(tensors["attention_mask"])
        out = model(**tensors)
        ctx = method._ctx
        assert ctx is not None
    out.loss.backward()
    for name in text:  # teacher-forced VU route: GQA's assigned expert for every request
        assert ctx.routes[name].vu_expert.tolist() == [1] * len(gqa)
        assert ctx.routes[name].if_expert.tolist() == [half] * len(gqa)
    for name, layer in layers.items():
        for param in (layer.lora_A, layer.lora_B):
            g = param.grad
            assert g is not None
            nonzero = [e for e in range(4) if torch.count_nonzero(g[e]) > 0]
            assert nonzero == method.trainable_experts(name), name
