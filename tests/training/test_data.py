"""mini-CVIT generation (determinism, structure) and the LLaVA/CVIT JSON loader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from smolora.adapters.instructions import extract_instruction
from smolora.training.data.cvit_json import load_examples
from smolora.training.data.mini_cvit import (
    MiniCVITConfig,
    build_mini_cvit,
    few_shot_split,
    load_pretrain,
    load_split,
)
from smolora.training.data.tasks import TASKS, UPSTREAM_ORDER, ZERO_SHOT
from smolora.training.metrics import follows_format

TINY = MiniCVITConfig(
    seed=11, image_size=32, train_per_task=5, test_per_task=3, few_shot_max=2, pretrain_size=4
)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a = build_mini_cvit(tmp_path / "a", TINY, progress=False)
    b = build_mini_cvit(tmp_path / "b", TINY, progress=False)
    c = build_mini_cvit(
        tmp_path / "c", MiniCVITConfig(**{**TINY.__dict__, "seed": 12}), progress=False
    )
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_structure_of_a_build(data_root: Path) -> None:
    for task in UPSTREAM_ORDER:
        single = load_split(data_root, "single", task, "train")
        multi = load_split(data_root, "multi", task, "train")
        held = load_split(data_root, "multi", task, "test_heldout")
        spec = TASKS[task]
        assert {ex.instruction for ex in single} == {spec.single_template}
        assert {ex.instruction for ex in multi} <= set(spec.templates)
        assert {ex.instruction for ex in held} <= set(spec.heldout)
        # Both settings share pictures and answers; only the instruction differs.
        assert [(e.image, e.answer) for e in single] == [(e.image, e.answer) for e in multi]
        for ex in single:
            assert ex.image is not None and ex.image.is_file()
            assert ex.prompt.endswith(ex.instruction)
            assert follows_format(ex.answer, spec.answer_format, ex.references), (task, ex.answer)
    for task in ZERO_SHOT:
        assert load_split(data_root, "single", task, "test")


def test_multi_type_uses_several_templates(tmp_path: Path) -> None:
    root = build_mini_cvit(
        tmp_path,
        MiniCVITConfig(
            seed=0,
            image_size=32,
            train_per_task=60,
            test_per_task=3,
            few_shot_max=1,
            pretrain_size=1,
            tasks=("vqav2",),
        ),
        progress=False,
    )
    assert len({ex.instruction for ex in load_split(root, "multi", "vqav2", "train")}) == 5


def test_sqa_answers_are_letters_of_listed_options(data_root: Path) -> None:
    for ex in load_split(data_root, "single", "sqa", "train"):
        assert f"\n{ex.answer}. " in ex.prompt


def test_few_shot_split_is_balanced(data_root: Path) -> None:
    pool = load_split(data_root, "single", "places", "train")
    one = few_shot_split(pool, 1)
    assert len(one) == len({ex.answer for ex in pool}) == 8
    assert len(few_shot_split(pool, 2)) == 16


def test_pretrain_descriptions_have_no_task_format(data_root: Path) -> None:
    for ex in load_pretrain(data_root):
        assert ex.answer.startswith("This is")
        assert not follows_format(ex.answer, "caption") or ex.answer.count(".") == 1


def test_loader_reads_llava_training_records(tmp_path: Path) -> None:
    recs = [
        {
            "id": "q1",
            "image": "coco/1.jpg",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nWhat is the man holding?\n"
                    "Answer the question using a single word or phrase.",
                },
                {"from": "gpt", "value": "umbrella"},
            ],
        },
        {
            "id": "q2",
            "image": "sqa/2.png",
            "conversations": [
                {
                    "from": "human",
                    "value": "Which is a mammal?\nA. frog\nB. dog\n"
                    "Answer with the option's letter from the given choices directly.\n<image>",
                },
                {"from": "gpt", "value": "B"},
                {"from": "human", "value": "second turn is ignored"},
                {"from": "gpt", "value": "x"},
            ],
        },
    ]
    path = tmp_path / "vqav2" / "train.json"
    path.parent.mkdir()
    path.write_text(json.dumps(recs))
    ex = load_examples(path, image_root=tmp_path / "imgs")
    assert ex[0].task == "vqav2"
    assert ex[0].image == tmp_path / "imgs" / "coco/1.jpg"
    assert (
        ex[0].prompt
        == "What is the man holding?\nAnswer the question using a single word or phrase."
    )
    assert ex[0].instruction == "Answer the question using a single word or phrase."
    assert ex[0].answer == "umbrella" and ex[0].references == ("umbrella",)
    assert ex[1].instruction == "Answer with the option's letter from the given choices directly."
    assert ex[1].answer == "B"


def test_loader_reads_question_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "textvqa.jsonl"
    lines = [
        {
            "question_id": 7,
            "image": "a.png",
            "text": "what is written?\nAnswer the question using a single word or phrase.",
            "answer": "stop",
        },
        {
            "question_id": 8,
            "image": "b.png",
            "text": "<image>\ncaption?",
            "answers": ["x y.", "z w."],
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines))
    ex = load_examples(path, task="textvqa", image_root=tmp_path)
    assert ex[0].id == "7" and ex[0].answer == "stop"
    assert ex[1].references == ("x y.", "z w.") and ex[1].answer == "x y."


def test_loader_rejects_records_without_content(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"id": "1", "image": "a.png"}]))
    with pytest.raises(ValueError, match="neither"):
        load_examples(path)


def test_instruction_rule_prefers_known_templates() -> None:
    known = ["Answer the question using a single word or phrase."]
    prompt = "Is it red? Answer the question using a single word or phrase."
    assert extract_instruction(prompt, known=known).text == known[0]
    assert extract_instruction("line one\nline two\n").text == "line two"
