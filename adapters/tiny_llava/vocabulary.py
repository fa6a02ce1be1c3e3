"""The text domain the embedded tokenizer is trained on.

A deterministic corpus of the words and phrases our procedurally generated tasks use
(colours, shapes, counts, positions, scenes, letters, digits, instruction templates). The
tokenizer is byte-level BPE, so text outside this corpus still encodes (as smaller pieces);
the corpus only decides which pieces get whole-word tokens.
"""

from __future__ import annotations

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "gray", "brown", "pink", "cyan")
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "ring", "bar", "heart", "hexagon")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SIZES = ("small", "large", "big", "tiny", "medium")
POSITIONS = ("left", "right", "top", "bottom", "center", "above", "below", "next", "to", "of", "beside", "corner")
SCENES = ("beach", "forest", "desert", "city", "snow", "night", "sky", "field", "ocean", "room", "road", "garden")
FUNCTION_WORDS = (
    "a", "an", "the", "is", "are", "there", "this", "that", "what", "which", "where", "how", "many",
    "in", "on", "at", "and", "or", "with", "no", "yes", "not", "image", "picture", "photo", "shown",
    "shape", "shapes", "colour", "color", "object", "objects", "word", "text", "written", "letter",
    "number", "count", "scene", "background", "answer", "question", "options", "option", "describe",
    "caption", "sentence", "single", "phrase", "using", "briefly", "letter", "from", "given", "choices",
    "choose", "correct", "read", "identify", "class", "category", "unanswerable", "it", "of", "do", "you",
    "see", "can", "be", "has", "have", "more", "than", "fewer", "same", "different", "largest", "smallest",
)
TEMPLATES = (
    "Answer with the option's letter from the given choices directly.",
    "Answer the question using a single word or phrase.",
    "Provide a one-sentence caption for the provided image.",
    "What is the object in the image? Answer the question using a single word or phrase.",
    "Describe the image briefly in one sentence.",
    "Read the text in the image.",
    "How many shapes are there?",
    "What colour is the shape?",
    "USER: ASSISTANT:",
)


def corpus() -> list[str]:
    """Training lines for the BPE tokenizer, in a fixed order (the result is deterministic)."""
    lines: list[str] = list(TEMPLATES)
    words = COLOURS + SHAPES + NUMBERS + SIZES + POSITIONS + SCENES + FUNCTION_WORDS
    lines.append(" ".join(words))
    lines.append(" ".join(w.capitalize() for w in words))
    for c in COLOURS:
        for s in SHAPES:
            lines.append(f"A {c} {s} on the left of a small {s}.")
    lines.append(" ".join(chr(ord("A") + i) for i in range(26)))
    lines.append(" ".join(str(i) for i in range(100)))
    lines.append("(A) (B) (C) (D) A. B. C. D. Options: ? , . ' \"")
    return lines
