"""The mini-CVIT tasks: what each asks, how it is answered and scored, and its instructions.

Six upstream tasks in the paper's CVIT order, each an analogue of one CVIT dataset, plus the
unseen tasks (three zero-shot, one few-shot). Every task has one single-type instruction
(the first of its five multi-type paraphrases) and two held-out paraphrases used only at
test time. As in CVIT, several short-answer tasks share the single-type instruction
"Answer the question using a single word or phrase." and the two caption tasks share theirs.

`make_item` turns a random source into one (scene, question, answer, references) item; it
does not render images or write files (see `mini_cvit.py`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from smolora.training.data.scene import (
    BACKGROUNDS,
    CELL_NAMES,
    COLOURS,
    SHAPES,
    Scene,
    article,
    number_word,
    plural,
    sample_cover,
    sample_scene,
    sample_single_object,
)

AnswerFormat = Literal["letter", "short", "caption"]
Metric = Literal["accuracy", "cider"]
TaskKind = Literal["upstream", "zeroshot", "fewshot"]

SHORT = "Answer the question using a single word or phrase."
CAPTION = "Provide a one-sentence caption for the provided image."


@dataclass(frozen=True)
class TaskSpec:
    """One mini-CVIT task.

    Attributes:
        name: short id used in files and checkpoints ("sqa", "textvqa", ...).
        analogue: the CVIT dataset it mirrors.
        kind: "upstream" (in the training sequence), "zeroshot" or "fewshot" (unseen).
        metric: "accuracy" (normalised exact match) or "cider" (CIDEr-D).
        answer_format: the format MIF checks: "letter", "short" or "caption".
        templates: the five multi-type instructions; `templates[0]` is the single-type one.
        heldout: two paraphrases never trained on (instruction-robustness test).
        max_new_tokens: generation budget at evaluation.
    """

    name: str
    analogue: str
    kind: TaskKind
    metric: Metric
    answer_format: AnswerFormat
    templates: tuple[str, ...]
    heldout: tuple[str, ...]
    max_new_tokens: int

    def __post_init__(self) -> None:
        if len(self.templates) != 5 or len(self.heldout) != 2:
            raise ValueError(f"{self.name}: needs 5 templates and 2 held-out paraphrases")
        if set(self.templates) & set(self.heldout):
            raise ValueError(f"{self.name}: a held-out paraphrase is also a training template")

    @property
    def single_template(self) -> str:
        return self.templates[0]


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "sqa",
            "ScienceQA",
            "upstream",
            "accuracy",
            "letter",
            (
                "Answer with the option's letter from the given choices directly.",
                "Select the correct answer from the given choices and respond with the letter of "
                "the chosen option.",
                "Choose the right option and reply with its letter only.",
                "Pick the correct choice and answer with just its letter.",
                "From the options above, give the letter of the correct answer.",
            ),
            (
                "Respond only with the letter that marks the correct option.",
                "Which option is correct? Reply with the option letter alone.",
            ),
            3,
        ),
        TaskSpec(
            "textvqa",
            "TextVQA",
            "upstream",
            "accuracy",
            "short",
            (
                SHORT,
                "Capture the essence of your response in a single word or a concise phrase.",
                "Read the text in the image and reply with it.",
                "Respond with the written word only.",
                "Give the text you can read, as one word.",
            ),
            (
                "What text appears in the picture? Reply with just that word.",
                "Transcribe the written word briefly.",
            ),
            4,
        ),
        TaskSpec(
            "caption",
            "Flickr30k",
            "upstream",
            "cider",
            "caption",
            (
                CAPTION,
                "Describe the image briefly in one sentence.",
                "Write a short caption for this picture.",
                "Summarise the scene in a single sentence.",
                "Give a one-sentence description of the photo.",
            ),
            (
                "Caption this image with one sentence.",
                "In one short sentence, say what the picture shows.",
            ),
            24,
        ),
        TaskSpec(
            "imagenet",
            "ImageNet",
            "upstream",
            "accuracy",
            "short",
            (
                "What is the object in the image? Answer the question using a single word or "
                "phrase.",
                "Identify the object in the picture and name its category in one word.",
                "Which class does the main object belong to? Reply with the class name.",
                "Name the object shown in the image.",
                "Classify the object in the photo with a single word.",
            ),
            (
                "What category is the pictured object? One word, please.",
                "Tell me the class of the object you see.",
            ),
            4,
        ),
        TaskSpec(
            "gqa",
            "GQA",
            "upstream",
            "accuracy",
            "short",
            (
                SHORT,
                "Reason about the objects and their relations, then answer in a word or two.",
                "Answer this compositional question with a short phrase.",
                "Look at where the objects are and give a brief answer.",
                "Respond with a single word that answers the question.",
            ),
            (
                "Think about the spatial layout and reply in one word.",
                "Briefly answer the question about the scene.",
            ),
            4,
        ),
        TaskSpec(
            "vqav2",
            "VQAv2",
            "upstream",
            "accuracy",
            "short",
            (
                SHORT,
                "Answer the visual question with one word or number.",
                "Give a short answer to the question about the image.",
                "Reply with a word or a number only.",
                "Look at the picture and answer the question concisely.",
            ),
            ("Provide a one-word answer to the question.", "Respond briefly with just the answer."),
            4,
        ),
        TaskSpec(
            "vizwiz",
            "VizWiz",
            "zeroshot",
            "accuracy",
            "short",
            (
                "When the provided information is insufficient, respond with 'Unanswerable'. "
                + SHORT,
                "If the image cannot answer the question, reply 'unanswerable'; otherwise answer "
                "briefly.",
                "Answer in a word or phrase, or say 'unanswerable' when the picture does not show "
                "it.",
                "Reply briefly; say 'unanswerable' if the question cannot be answered from the "
                "image.",
                "Give a short answer, or 'unanswerable' when it is not visible.",
            ),
            (
                "Say 'unanswerable' if you cannot tell from the picture, else answer in one word.",
                "Answer in one word; if the image lacks the information, answer 'unanswerable'.",
            ),
            4,
        ),
        TaskSpec(
            "textcaps",
            "TextCaps",
            "zeroshot",
            "cider",
            "caption",
            (
                CAPTION,
                "Describe the image in one sentence, including any text it shows.",
                "Write a one-sentence caption that mentions the written words.",
                "Caption the picture and say what the sign reads.",
                "Give a single-sentence description including the text in the image.",
            ),
            (
                "Describe this picture and its text in one sentence.",
                "One sentence: what does the image show and say?",
            ),
            24,
        ),
        TaskSpec(
            "ocrvqa",
            "OCR-VQA",
            "zeroshot",
            "accuracy",
            "short",
            (
                SHORT,
                "Read the cover and answer with a single word.",
                "Answer the question about the book cover briefly.",
                "Reply with the word printed on the cover.",
                "Give a one-word answer from the text on the cover.",
            ),
            ("What does the cover say? Answer in one word.", "Respond with the title only."),
            4,
        ),
        TaskSpec(
            "places",
            "Places365",
            "fewshot",
            "accuracy",
            "short",
            (
                "What is the scene in the image? " + SHORT,
                "Classify the scene shown in the picture with one word.",
                "Where was this picture taken? Answer with the scene category.",
                "Name the type of place in the image.",
                "Which scene category is this? Reply in one word.",
            ),
            ("What kind of place is this? One word.", "Tell me the scene category of the image."),
            4,
        ),
    )
}

UPSTREAM_ORDER: tuple[str, ...] = ("sqa", "textvqa", "caption", "imagenet", "gqa", "vqav2")
ZERO_SHOT: tuple[str, ...] = ("vizwiz", "textcaps", "ocrvqa")
FEW_SHOT: tuple[str, ...] = ("places",)
LETTERS = "ABCD"


@dataclass
class TaskItem:
    """One generated question about one scene.

    Attributes:
        scene: the picture's content.
        question: the question text shown before the instruction ("" when the instruction
            is the question, as for the object-classification task).
        answer: the training target.
        references: all acceptable answers for scoring (captions have several).
    """

    scene: Scene
    question: str
    answer: str
    references: list[str]


# --------------------------------------------------------------------------------------
# Task generators
# --------------------------------------------------------------------------------------
def _options(rng: random.Random, correct: str, pool: list[str], n: int) -> tuple[str, str]:
    """Options text ("A. x\\nB. y") and the correct letter."""
    distract = rng.sample([p for p in pool if p != correct], n - 1)
    opts = distract + [correct]
    rng.shuffle(opts)
    letter = LETTERS[opts.index(correct)]
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(opts)), letter


def _unique_shape(rng: random.Random, scene: Scene):
    unique = [o for o in scene.objects if scene.count(shape=o.shape) == 1]
    return rng.choice(unique) if unique else None


def _sqa(rng: random.Random) -> TaskItem:
    while True:
        scene = sample_scene(rng, 1, 4, sign=False)
        kind = rng.choice(("colour", "shape", "count", "where", "larger"))
        n = rng.choice((3, 4))
        if kind == "colour" and (o := _unique_shape(rng, scene)):
            opts, letter = _options(rng, o.colour, list(COLOURS), n)
            q = f"What is the colour of the {o.shape}?"
        elif kind == "shape":
            unique = [o for o in scene.objects if scene.count(colour=o.colour) == 1]
            if not unique:
                continue
            o = rng.choice(unique)
            opts, letter = _options(rng, o.shape, list(SHAPES), n)
            q = f"Which shape is {o.colour}?"
        elif kind == "count":
            opts, letter = _options(rng, str(len(scene.objects)), [str(i) for i in range(1, 7)], n)
            q = "How many shapes are in the picture?"
        elif kind == "where" and (o := _unique_shape(rng, scene)):
            opts, letter = _options(rng, CELL_NAMES[o.cell], list(CELL_NAMES.values()), n)
            q = f"Where is the {o.shape}?"
        elif kind == "larger":
            large = [o for o in scene.objects if o.size == "large"]
            small = [o for o in scene.objects if o.size == "small"]
            if not large or not small:
                continue
            a, b = rng.choice(large), rng.choice(small)
            if (
                a.name == b.name
                or scene.count(a.shape, a.colour) > 1
                or scene.count(b.shape, b.colour) > 1
            ):
                continue
            opts, letter = _options(rng, f"the {a.name}", [f"the {a.name}", f"the {b.name}"], 2)
            q = "Which object is larger?"
        else:
            continue
        return TaskItem(scene, f"{q}\n{opts}", letter, [letter])


def _textvqa(rng: random.Random) -> TaskItem:
    scene = sample_scene(rng, 0, 3, sign=True)
    q = rng.choice(
        (
            "What is written on the sign?",
            "What does the sign say?",
            "What word is shown in the image?",
        )
    )
    return TaskItem(scene, q, scene.sign or "", [scene.sign or ""])


_WHERE = {
    "beach": "on a beach",
    "forest": "in a forest",
    "desert": "in a desert",
    "city": "in a city",
    "snow": "in the snow",
    "night": "at night",
    "field": "in a field",
    "ocean": "over the ocean",
}


def _groups(scene: Scene) -> str:
    """ "a red circle, two blue stars and a green square"."""
    seen: dict[str, int] = {}
    for o in scene.objects:
        seen[o.name] = seen.get(o.name, 0) + 1
    phrases = []
    for name, n in seen.items():
        colour, shape = name.split(" ")
        phrases.append(
            f"{article(colour)} {name}"
            if n == 1
            else f"{number_word(n)} {colour} {plural(shape, n)}"
        )
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def caption_references(scene: Scene) -> list[str]:
    """Three reference captions; the first is the training target."""
    g, bg, where = _groups(scene), scene.background, _WHERE[scene.background]
    be = "is" if len(scene.objects) == 1 else "are"
    return [
        _cap(f"{g} {where}."),
        _cap(f"{article(bg)} {bg} scene with {g}."),
        _cap(f"there {be} {g} {where}."),
    ]


def _caption(rng: random.Random) -> TaskItem:
    scene = sample_scene(rng, 1, 3, sign=False)
    refs = caption_references(scene)
    return TaskItem(scene, "", refs[0], refs)


def _imagenet(rng: random.Random) -> TaskItem:
    scene = sample_single_object(rng)
    return TaskItem(scene, "", scene.objects[0].shape, [scene.objects[0].shape])


_RELATIONS = {
    "to the left of": lambda a, b: a.cell[1] < b.cell[1],
    "to the right of": lambda a, b: a.cell[1] > b.cell[1],
    "above": lambda a, b: a.cell[0] < b.cell[0],
    "below": lambda a, b: a.cell[0] > b.cell[0],
}


def _gqa(rng: random.Random) -> TaskItem:
    while True:
        scene = sample_scene(rng, 2, 3, sign=False, distinct_shapes=True)
        a, b = rng.sample(scene.objects, 2)
        kind = rng.choice(("verify", "which_shape", "which_colour", "same_colour"))
        rel = rng.choice(tuple(_RELATIONS))
        if kind == "verify":
            axis = 1 if "left" in rel or "right" in rel else 0
            if a.cell[axis] == b.cell[axis]:
                continue
            ans = "yes" if _RELATIONS[rel](a, b) else "no"
            q = f"Is the {a.shape} {rel} the {b.shape}?"
        elif kind in ("which_shape", "which_colour"):
            hits = [o for o in scene.objects if o is not b and _RELATIONS[rel](o, b)]
            if len(hits) != 1:
                continue
            if kind == "which_shape":
                ans, q = hits[0].shape, f"What shape is {rel} the {b.shape}?"
            else:
                ans, q = hits[0].colour, f"What colour is the shape {rel} the {b.shape}?"
        else:
            ans = "yes" if a.colour == b.colour else "no"
            q = f"Are the {a.shape} and the {b.shape} the same colour?"
        return TaskItem(scene, q, ans, [ans])


def _vqav2(rng: random.Random) -> TaskItem:
    while True:
        scene = sample_scene(rng, 1, 5, sign=False, repeat_shapes=rng.random() < 0.5)
        kind = rng.choice(("count_shape", "count_colour", "colour", "exists"))
        if kind == "count_shape":
            shape = rng.choice(scene.objects).shape
            ans, q = str(scene.count(shape=shape)), f"How many {plural(shape, 2)} are there?"
        elif kind == "count_colour":
            colour = rng.choice(scene.objects).colour
            ans, q = str(scene.count(colour=colour)), f"How many {colour} shapes are there?"
        elif kind == "colour" and (o := _unique_shape(rng, scene)):
            ans, q = o.colour, f"What colour is the {o.shape}?"
        elif kind == "exists":
            if rng.random() < 0.5:
                o = rng.choice(scene.objects)
                shape, colour = o.shape, o.colour
            else:
                shape, colour = rng.choice(SHAPES), rng.choice(tuple(COLOURS))
            ans = "yes" if scene.count(shape, colour) else "no"
            q = f"Is there {article(colour)} {colour} {shape}?"
        else:
            continue
        return TaskItem(scene, q, ans, [ans])


def _vizwiz(rng: random.Random) -> TaskItem:
    while True:
        scene = sample_scene(rng, 1, 3)
        if rng.random() < 0.5:
            if scene.sign is None and rng.random() < 0.5:
                return TaskItem(scene, "What does the sign say?", "unanswerable", ["unanswerable"])
            absent = [s for s in SHAPES if scene.count(shape=s) == 0]
            return TaskItem(
                scene, f"What colour is the {rng.choice(absent)}?", "unanswerable", ["unanswerable"]
            )
        if scene.sign is not None and rng.random() < 0.3:
            return TaskItem(scene, "What does the sign say?", scene.sign, [scene.sign])
        if o := _unique_shape(rng, scene):
            return TaskItem(scene, f"What colour is the {o.shape}?", o.colour, [o.colour])


def _textcaps(rng: random.Random) -> TaskItem:
    scene = sample_scene(rng, 0, 2, sign=True)
    w, where, bg = scene.sign, _WHERE[scene.background], scene.background
    refs = [
        f"A sign that says {w} {where}.",
        _cap(f"{article(bg)} {bg} scene with a sign reading {w}."),
        f"The word {w} on a sign {where}.",
    ]
    return TaskItem(scene, "", refs[0], refs)


def _ocrvqa(rng: random.Random) -> TaskItem:
    scene = sample_cover(rng)
    assert scene.cover is not None
    colour, title = scene.cover
    if rng.random() < 0.7:
        return TaskItem(scene, "What is the title of this book?", title, [title])
    return TaskItem(scene, "What colour is the book cover?", colour, [colour])


def _places(rng: random.Random) -> TaskItem:
    scene = sample_scene(rng, 0, 2, sign=False)
    return TaskItem(scene, "", scene.background, [scene.background])


_GENERATORS = {
    "sqa": _sqa,
    "textvqa": _textvqa,
    "caption": _caption,
    "imagenet": _imagenet,
    "gqa": _gqa,
    "vqav2": _vqav2,
    "vizwiz": _vizwiz,
    "textcaps": _textcaps,
    "ocrvqa": _ocrvqa,
    "places": _places,
}


def make_item(task: str, rng: random.Random) -> TaskItem:
    """Generate one item of `task`.

    Raises:
        KeyError: for an unknown task name.
    """
    try:
        gen = _GENERATORS[task]
    except KeyError:
        raise KeyError(f"unknown mini-CVIT task {task!r}; known: {sorted(_GENERATORS)}") from None
    return gen(rng)


def places_item(rng: random.Random, background: str) -> TaskItem:
    """A scene-classification item with a chosen background (balanced few-shot pools)."""
    scene = sample_scene(rng, 0, 2, sign=False)
    scene.background = background
    return TaskItem(scene, "", background, [background])


def all_backgrounds() -> tuple[str, ...]:
    return tuple(BACKGROUNDS)
