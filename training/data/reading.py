"""Reading exercises for the base alignment: a multiple-choice question about a passage,
answered with the option's letter.

A real LLaVA's language model arrives at the alignment already able to read a passage and
pick an option by its letter. The embedded language model starts from random weights and
the alignment shows it only descriptions, so it has no way to point at an option: trained on
ScienceQA it answers the most frequent letter whatever the question. Reading exercises are
meant to teach it that generic skill. The passage is a picture's own description, written
into the prompt; the picture stays in the prompt too, as every example has one. The question
asks what the passage says, with two to four options in random order (so the right letter
says nothing beyond how many options there are). The instructions are worded unlike any
task's templates, so no task's prompt is seen before its own training. A share of the
exercises are option lookups instead: a letter to predict for each option asked for, the
plainest form of pointing at an option.
"""

from __future__ import annotations

import random
from dataclasses import replace

from smolora.training.data.cvit_json import Example
from smolora.training.data.scene import BACKGROUNDS, CELL_NAMES, COLOURS, SHAPES, parse_description

LETTERS = "ABCD"
#: The share of exercises that are option lookups (`_lookup_exercise`).
LOOKUP_SHARE = 0.7
#: Options a lookup asks for (drawn with repetition): a letter to predict for each.
LOOKUP_QUERIES = 8

#: How a reading exercise asks for the letter (none of them is a task template).
READING_INSTRUCTIONS: tuple[str, ...] = (
    "Reply with the letter of the option the passage supports.",
    "Going by the passage, which option is right? Give its letter.",
    "Say which option the passage backs up, by its letter.",
)


def _choices(rng: random.Random, right: str, pool: list[str]) -> tuple[str, str]:
    """Options text (one per line, "A. ...") and the right one's letter."""
    wrong = [p for p in pool if p != right]
    n = rng.randint(2, min(len(LETTERS), len(wrong) + 1))
    options = [right, *rng.sample(wrong, n - 1)]
    rng.shuffle(options)
    text = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return text, LETTERS[options.index(right)]


def _lookup_exercise(ex: Example, rng: random.Random) -> Example:
    """Two to four options of one kind of word; the answer is each one's letter, asked for in
    a shuffled order ("C A B"). The plainest form of pointing at an option, with a letter to
    predict for every option rather than one per exercise."""
    vocab = rng.choice((list(COLOURS), list(SHAPES), list(BACKGROUNDS), list(CELL_NAMES.values())))
    words = rng.sample(vocab, rng.randint(2, len(LETTERS)))
    asked = [rng.choice(words) for _ in range(LOOKUP_QUERIES)]
    options = "\n".join(f"{LETTERS[i]}. {w}" for i, w in enumerate(words))
    instruction = f"Give the letter of each option, in this order: {', '.join(asked)}."
    answer = " ".join(LETTERS[words.index(w)] for w in asked)
    return replace(
        ex,
        id=f"{ex.id}|lookup",
        task="reading",
        prompt=f"{options}\n{instruction}",
        instruction=instruction,
        answer=answer,
        references=(answer,),
    )


def reading_exercise(ex: Example, rng: random.Random) -> Example | None:
    """A multiple-choice question about `ex`'s description (its answer), or None when the
    description states nothing to ask about.

    The question is one of: a word the passage uses (a colour, shape or scene, the wrong
    options being words of the same kind it does not use); the colour or the position of a
    shape the passage names once; the kind of scene.
    """
    if rng.random() < LOOKUP_SHARE:
        return _lookup_exercise(ex, rng)
    facts = parse_description(ex.answer)
    objects = list(facts.objects)
    once = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    kinds = (["word"] if objects else []) + (["colour", "where"] if once else [])
    kinds += ["scene"] if facts.background is not None else []
    if not kinds:
        return None
    kind = rng.choice(kinds)
    if kind == "colour":
        o = rng.choice(once)
        question = f"In the passage, what colour is the {o.shape}?"
        options, letter = _choices(rng, o.colour, list(COLOURS))
    elif kind == "where":
        o = rng.choice(once)
        question = f"In the passage, where is the {o.shape}?"
        options, letter = _choices(rng, CELL_NAMES[o.cell], list(CELL_NAMES.values()))
    elif kind == "scene":
        question = "What kind of scene does the passage describe?"
        options, letter = _choices(rng, str(facts.background), list(BACKGROUNDS))
    else:
        o = rng.choice(objects)
        right, vocab = rng.choice(((o.colour, list(COLOURS)), (o.shape, list(SHAPES))))
        used = {p.colour for p in objects} | {p.shape for p in objects}
        question = "Which of these words does the passage use?"
        options, letter = _choices(rng, right, [w for w in vocab if w not in used])
    instruction = rng.choice(READING_INSTRUCTIONS)
    prompt = f"Passage: {ex.answer}\n{question}\n{options}\n{instruction}"
    return replace(
        ex,
        id=f"{ex.id}|reading",
        task="reading",
        prompt=prompt,
        instruction=instruction,
        answer=letter,
        references=(letter,),
    )
