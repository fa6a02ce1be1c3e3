"""MiniLM instruction embeddings and the instruction-type table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from smolora.adapters.instructions import EMBED_DIM, InstructionTable, InstructionType

VQA = "Answer the question using a single word or phrase."
VQA_PARAPHRASE = "Answer with one word or a short phrase."
CAPTION = "Provide a one-sentence caption for the provided image."
MCQ = "Answer with the option's letter from the given choices directly."


def test_embedding_is_384d_deterministic_and_unnormalised(instruction_encoder) -> None:
    a = instruction_encoder.encode([VQA, CAPTION])
    instruction_encoder._cache.clear()
    b = instruction_encoder.encode([CAPTION, VQA])
    assert a.shape == (2, EMBED_DIM) and a.dtype == torch.float32
    assert torch.allclose(a[0], b[1], atol=1e-6) and torch.allclose(a[1], b[0], atol=1e-6)
    assert not torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-2), (
        "the contract says no L2 normalisation"
    )


def test_batching_does_not_change_embeddings(instruction_encoder) -> None:
    instruction_encoder._cache.clear()
    together = instruction_encoder.encode(
        [VQA, "A much longer instruction that pads the other one in the batch, surely."]
    )
    instruction_encoder._cache.clear()
    alone = instruction_encoder.encode([VQA])
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-5)


def test_mean_pooling_matches_longhand(instruction_encoder) -> None:
    tok, model = instruction_encoder.tokenizer, instruction_encoder.model
    batch = tok([CAPTION], return_tensors="pt")
    with torch.no_grad():
        want = model(**batch).last_hidden_state[0].mean(0)
    instruction_encoder._cache.clear()
    torch.testing.assert_close(instruction_encoder.encode([CAPTION])[0], want, atol=1e-5, rtol=1e-5)


def test_similar_instructions_are_closer_than_unrelated(instruction_encoder) -> None:
    e = instruction_encoder.encode([VQA, VQA_PARAPHRASE, CAPTION, MCQ])
    sim = lambda i, j: float(F.cosine_similarity(e[i], e[j], dim=0))  # noqa: E731
    assert sim(0, 1) > sim(0, 2) and sim(0, 1) > sim(0, 3)


def test_table_nearest_and_roundtrip(instruction_encoder) -> None:
    texts = {"vqa": VQA, "caption": CAPTION, "mcq": MCQ}
    emb = instruction_encoder.encode(list(texts.values()))
    table = InstructionTable(
        [
            InstructionType(n, t, f"task_{n}", tuple(float(x) for x in e))
            for (n, t), e in zip(texts.items(), emb)
        ]
    )
    best, sim = table.nearest(instruction_encoder.encode([VQA_PARAPHRASE])[0])
    assert best is not None and best.name == "vqa" and 0.5 < sim <= 1.0
    again = InstructionTable.from_list(table.to_list())
    assert [t.name for t in again.types] == ["vqa", "caption", "mcq"]
    assert again.get("mcq") == table.get("mcq")
    assert InstructionTable().nearest(emb[0]) == (None, 0.0)
