"""Text-skill exercises for the base alignment: repeat a list of words, point at an option
by its letter (and back), and answer a multiple-choice question about a passage.

A real LLaVA's language model arrives at the alignment already able to copy from its
prompt, find an option and name its letter. The embedded language model starts from random
weights, and an alignment on descriptions alone teaches it to read the picture and ignore
the prompt's words: trained on ScienceQA afterwards it answers the most frequent letter
whatever the question, and it cannot even be taught to repeat four words. These exercises
teach the generic skills ScienceQA's format needs, text-only before the alignment
(`language_pretrain.py`) and mixed into it (`PretrainConfig.reading_share`), in the order
they build on each other:

- `repeat`: repeat a list of words (copying from the prompt);
- `lookup`: give the letter of the option named (word -> letter);
- `option`: give the word of the option lettered (letter -> word);
- `question`: a multiple-choice question about the picture's description, written into
  the prompt as a passage, answered with a letter.

Words to copy appear in the prompt as the same tokens as in the answer (after a space, as
the answer's words), and options stand one per line after a heading line, so their letters
are the same tokens as in ScienceQA's options, whether or not a picture precedes the text.
The letters of an answer are other tokens (after a space): relating the two is part of
the skill, as it is for ScienceQA.

In the alignment the picture stays in the prompt, as every example there has one (the
language-model stage, `language_pretrain.py`, drops it). Options come in random order,
so a right letter says nothing beyond how many options there are. The instructions are
worded unlike any task's templates, so no task's prompt is seen before its own training.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import replace

from smolora.training.data.cvit_json import Example
from smolora.training.data.scene import (
    BACKGROUNDS,
    CELL_NAMES,
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    WORDS,
    parse_description,
)

LETTERS = "ABCD"
#: How often each kind of exercise is drawn.
KIND_WEIGHTS: dict[str, float] = {"repeat": 0.35, "lookup": 0.25, "option": 0.25, "question": 0.15}
#: Words a `repeat` exercise draws from (every single word a description uses).
REPEAT_WORDS: tuple[str, ...] = (
    *COLOURS,
    *SHAPES,
    *BACKGROUNDS,
    *SIZES,
    *NUMBER_WORDS,
    *WORDS,
)

#: How a reading exercise asks for the letter (none of them is a task template).
READING_INSTRUCTIONS: tuple[str, ...] = (
    "Reply with the letter of the option the passage supports.",
    "Going by the passage, which option is right? Give its letter.",
    "Say which option the passage backs up, by its letter.",
)


def _option_lines(words: list[str]) -> str:
    """One "A. word" line per option, lettered in order."""
    return "\n".join(f"{LETTERS[i]}. {w}" for i, w in enumerate(words))


def _choices(rng: random.Random, right: str, pool: list[str]) -> tuple[str, str]:
    """Options text (one per line, "A. ...") and the right one's letter."""
    wrong = [p for p in pool if p != right]
    n = rng.randint(2, min(len(LETTERS), len(wrong) + 1))
    options = [right, *rng.sample(wrong, n - 1)]
    rng.shuffle(options)
    return _option_lines(options), LETTERS[options.index(right)]


def _exercise(ex: Example, kind: str, prompt: str, instruction: str, answer: str) -> Example:
    return replace(
        ex,
        id=f"{ex.id}|{kind}",
        task="reading",
        prompt=prompt,
        instruction=instruction,
        answer=answer,
        references=(answer,),
    )


def exercise_kind(ex: Example) -> str:
    """The kind of a reading exercise (a key of `KIND_WEIGHTS`), from its id."""
    return ex.id.rsplit("|", 1)[-1]


def _repeat_exercise(ex: Example, rng: random.Random) -> Example:
    """Three to ten words drawn with repetition; the answer is the same words."""
    words = " ".join(rng.choice(REPEAT_WORDS) for _ in range(rng.randint(3, 10)))
    instruction = "Repeat these words exactly:"
    return _exercise(ex, "repeat", f"{instruction} {words}", instruction, words)


def _option_list(rng: random.Random) -> list[str]:
    """Two to four different words of one kind (colours, shapes, scenes or positions)."""
    vocab = rng.choice((list(COLOURS), list(SHAPES), list(BACKGROUNDS), list(CELL_NAMES.values())))
    return rng.sample(vocab, rng.randint(2, len(LETTERS)))


def _options_prompt(words: list[str], question: str) -> str:
    return f"Options:\n{_option_lines(words)}\n{question}"


def _lookup_exercise(ex: Example, rng: random.Random) -> Example:
    """Two to four options and one of them by its word; the answer is its letter, the shape
    of a ScienceQA answer."""
    words = _option_list(rng)
    word = rng.choice(words)
    instruction = f"Which option is {word}? Give its letter."
    prompt = _options_prompt(words, instruction)
    return _exercise(ex, "lookup", prompt, instruction, LETTERS[words.index(word)])


def _option_exercise(ex: Example, rng: random.Random) -> Example:
    """The converse of a lookup: one option by its letter; the answer is its word."""
    words = _option_list(rng)
    i = rng.randrange(len(words))
    instruction = f"Which word is option {LETTERS[i]}?"
    return _exercise(ex, "option", _options_prompt(words, instruction), instruction, words[i])


def reading_exercise(
    ex: Example, rng: random.Random, weights: Mapping[str, float] = KIND_WEIGHTS
) -> Example | None:
    """A text-skill exercise of a kind drawn by `weights` (keys of `KIND_WEIGHTS`; the
    description `ex.answer` is the passage of a `question`), or None when a question was
    drawn and the description states nothing to ask about."""
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    if kind == "repeat":
        return _repeat_exercise(ex, rng)
    if kind == "lookup":
        return _lookup_exercise(ex, rng)
    if kind == "option":
        return _option_exercise(ex, rng)
    if kind == "question":
        return _question_exercise(ex, rng)
    raise ValueError(f"unknown kind of exercise {kind!r}; known: {list(KIND_WEIGHTS)}")


def _question_exercise(ex: Example, rng: random.Random) -> Example | None:
    """A multiple-choice question about `ex`'s description: a word the passage uses (a
    colour, shape or scene, the wrong options being words of the same kind it does not use);
    the colour or the position of a shape the passage names once; the kind of scene."""
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
    return _exercise(ex, "question", prompt, instruction, letter)
