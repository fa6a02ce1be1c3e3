"""Batching (labels, padding) and the generic greedy generator vs the reference oracle."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from smolora.adapters.instructions import InstructionEncoder
from smolora.adapters.reference_generate import ReferenceRequest, generate_batch
from smolora.adapters.smolora import RoutingContext, SMoLoRAConfig, SMoLoRAModel
from smolora.adapters.tiny_llava import load_llava
from smolora.training.data.collate import IGNORE_INDEX, ExampleEncoder
from smolora.training.data.mini_cvit import load_split
from smolora.training.data.tasks import TASKS
from smolora.training.evaluate import evaluate_task, greedy_generate, no_scope, score_predictions


def test_labels_cover_only_the_answer_and_eos(base_dir: Path, data_root: Path) -> None:
    _, processor = load_llava(base_dir)
    enc = ExampleEncoder(processor)
    examples = load_split(data_root, "single", "caption", "train", limit=3)
    batch = enc.collate_train(examples)
    for i, ex in enumerate(examples):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        target = ids[labels != IGNORE_INDEX]
        assert (
            enc.tokenizer.decode(target, skip_special_tokens=False).strip()
            == ex.answer + enc.eos_token
        )
        assert int((ids == enc.image_token_id).sum()) == enc.num_image_tokens
        assert mask[0] == 1  # right padding for training
    gen = enc.collate_generate(examples)
    assert bool((gen["attention_mask"][:, -1] == 1).all())  # left padding for generation
    assert gen["pixel_values"].shape[0] == len(examples)


def test_greedy_generate_matches_reference_for_smolora(base_dir: Path, data_root: Path) -> None:
    model, processor = load_llava(base_dir)
    smodel = SMoLoRAModel(
        model, SMoLoRAConfig(num_experts=4, rank=8, alpha=16, dropout=0.0), seed=1
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so that routing changes the outputs
        for layer in smodel.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
    enc = ExampleEncoder(processor)
    minilm = InstructionEncoder()
    examples = load_split(data_root, "single", "vqav2", "test", limit=3) + load_split(
        data_root, "single", "sqa", "test", limit=2
    )
    batch = enc.collate_generate(examples)
    u = minilm.encode(batch["instructions"])

    def scope(b):
        from contextlib import contextmanager

        @contextmanager
        def cm():
            ctx = RoutingContext(u, vu_routing="pinned")
            with smodel.routing(ctx):
                yield ctx.set_token_mask

        return cm()

    ours = greedy_generate(model, batch, scope, 6, processor.tokenizer.eos_token_id)
    reqs = []
    for ex, emb in zip(examples, u):
        with Image.open(ex.image) as im:
            reqs.append(ReferenceRequest(enc.prompt_text(ex), im.convert("RGB"), emb))
    ref = generate_batch(smodel, processor, reqs, 6, vu_routing="pinned")
    assert ours == [r.token_ids for r in ref]


def test_evaluate_task_scores_the_base(base_dir: Path, data_root: Path) -> None:
    model, processor = load_llava(base_dir)
    examples = load_split(data_root, "single", "caption", "test", limit=4)
    res = evaluate_task(model, ExampleEncoder(processor), examples, no_scope, batch_size=3)
    assert res.n == 4 and res.metric == "cider" and 0.0 <= res.score <= 100.0
    assert len(res.predictions) == 4


def test_score_predictions_by_hand(data_root: Path) -> None:
    examples = load_split(data_root, "single", "sqa", "test", limit=4)
    preds = [examples[0].answer, examples[1].answer + ".", "Z", "not a letter"]
    res = score_predictions(TASKS["sqa"], examples, preds)
    assert res.score == 50.0
    assert res.format_rate == 75.0
