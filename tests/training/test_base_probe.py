"""The base probe reads facts from descriptions and scores exactly the fact's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smolora.adapters.tiny_llava import load_llava
from smolora.training.base_probe import fact_spans, probe_facts
from smolora.training.data.collate import ExampleEncoder
from smolora.training.data.mini_cvit import load_pretrain


def test_fact_spans_of_each_sentence_form():
    text = (
        "This is a night scene. There is a large red square at the top left. "
        "There is a blue star in the middle. A sign says open."
    )
    got = [(name, text[a:b]) for name, a, b in fact_spans(text)]
    assert got == [
        ("scene", "night"),
        ("size", "large"),
        ("colour", "red"),
        ("shape", "square"),
        ("position", "top left"),
        ("colour", "blue"),
        ("shape", "star"),
        ("sign", "open"),
    ]
    cover = "This is a green book cover. The title is Deep Sea. There is a red ring at the top."
    assert [(n, cover[a:b]) for n, a, b in fact_spans(cover)] == [
        ("cover", "green"),
        ("title", "Deep Sea"),
        ("colour", "red"),
        ("shape", "ring"),
        ("position", "top"),
    ]


class _Oracle(torch.nn.Module):
    """The real model's forward, with logits replaced by a one-hot of the token `shift`
    positions ahead: shift 1 is a model that always predicts the next token right."""

    def __init__(self, model: torch.nn.Module, shift: int) -> None:
        super().__init__()
        self.model, self.shift = model, shift

    def forward(self, **kw):
        out = self.model(**kw)
        ids = kw["input_ids"]
        target = torch.roll(ids, -self.shift, dims=1)
        out.logits = torch.nn.functional.one_hot(target, out.logits.shape[-1]).float()
        return out


@pytest.mark.parametrize("shift, expected", [(1, 100.0), (0, 0.0)])
def test_probe_scores_the_facts_tokens(data_root: Path, base_dir: Path, shift, expected):
    model, processor = load_llava(base_dir)
    encoder = ExampleEncoder(processor)
    examples = load_pretrain(data_root)[:8]
    result = probe_facts(_Oracle(model, shift), encoder, examples, batch_size=3)
    n = sum(len(fact_spans(e.answer)) for e in examples)
    assert result["all"]["n"] == n > 0
    for name, row in result.items():
        assert row["accuracy"] == expected, name


def test_probe_of_a_real_base_is_a_percentage(data_root: Path, base_dir: Path):
    model, processor = load_llava(base_dir)
    result = probe_facts(model, ExampleEncoder(processor), load_pretrain(data_root)[:6])
    assert 0.0 <= result["all"]["accuracy"] <= 100.0
    assert result["all"]["n"] == sum(v["n"] for k, v in result.items() if k != "all")


def test_probe_command(data_root: Path, base_dir: Path, capsys):
    import json

    from smolora.training.cli import main

    # The fixture base held nothing out: the command says so instead of probing trained data.
    assert main(["probe-base", "--base", str(base_dir), "--data", str(data_root)]) == 2
    assert "no held-out descriptions" in capsys.readouterr().err
    args = ["probe-base", "--base", str(base_dir), "--data", str(data_root), "--heldout", "4"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["heldout"] == 4 and out["trained_on"] is True
    assert out["facts"]["all"]["n"] > 0
