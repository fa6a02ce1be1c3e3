"""The text domain the embedded tokenizer is trained on.

A deterministic corpus of the words and phrases our procedurally generated tasks use
(colours, shapes, counts, positions, scenes, letters, digits, instruction templates). The
tokenizer is byte-level BPE, so text outside this corpus still encodes (as smaller pieces);
the corpus only decides which pieces get whole-word tokens.
"""

from __future__ import annotations

COLOURS = (
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "black",
    "white",
    "gray",
    "brown",
    "pink",
    "cyan",
)
SHAPES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "ring",
    "bar",
    "heart",
    "hexagon",
)
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SIZES = ("small", "large", "big", "tiny", "medium")
POSITIONS = (
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "above",
    "below",
    "next",
    "to",
    "of",
    "beside",
    "corner",
)
SCENES = (
    "beach",
    "forest",
    "desert",
    "city",
    "snow",
    "night",
    "sky",
    "field",
    "ocean",
    "room",
    "road",
    "garden",
)
FUNCTION_WORDS = (
    "a",
    "an",
    "the",
    "is",
    "are",
    "there",
    "this",
    "that",
    "what",
    "which",
    "where",
    "how",
    "many",
    "in",
    "on",
    "at",
    "and",
    "or",
    "with",
    "no",
    "yes",
    "not",
    "image",
    "picture",
    "photo",
    "shown",
    "shape",
    "shapes",
    "colour",
    "color",
    "object",
    "objects",
    "word",
    "text",
    "written",
    "letter",
    "number",
    "count",
    "scene",
    "background",
    "answer",
    "question",
    "options",
    "option",
    "describe",
    "caption",
    "sentence",
    "single",
    "phrase",
    "using",
    "briefly",
    "letter",
    "from",
    "given",
    "choices",
    "choose",
    "correct",
    "read",
    "identify",
    "class",
    "category",
    "unanswerable",
    "it",
    "of",
    "do",
    "you",
    "see",
    "can",
    "be",
    "has",
    "have",
    "more",
    "than",
    "fewer",
    "same",
    "different",
    "largest",
    "smallest",
)
#: Words written on signs and book covers in mini-CVIT (training/data/scene.py).
SIGN_WORDS = (
    "cat",
    "dog",
    "sun",
    "bus",
    "stop",
    "open",
    "sale",
    "book",
    "milk",
    "taxi",
    "park",
    "exit",
    "fish",
    "cake",
    "moon",
    "tree",
    "bird",
    "shop",
    "home",
    "bank",
    "road",
    "gold",
    "rain",
    "wind",
)
#: Further words of mini-CVIT questions, captions and descriptions.
TASK_WORDS = (
    "ring",
    "hexagon",
    "unanswerable",
    "title",
    "cover",
    "sign",
    "says",
    "reading",
    "scene",
    "larger",
    "left",
    "right",
    "above",
    "below",
    "same",
    "colour",
    "shapes",
    "middle",
    "there",
    "Is",
    "Are",
    "What",
    "Which",
    "How",
    "Where",
    "This",
    "There",
    "The",
    "A",
    "night",
    "snow",
    "ocean",
    "over",
)
#: mini-CVIT instruction templates (training/data/tasks.py), so they tokenize compactly.
MINI_CVIT_TEMPLATES = (
    "Answer with the option's letter from the given choices directly.",
    "Select the correct answer from the given choices and respond with the letter of the chosen "
    "option.",
    "Choose the right option and reply with its letter only.",
    "Pick the correct choice and answer with just its letter.",
    "From the options above, give the letter of the correct answer.",
    "Capture the essence of your response in a single word or a concise phrase.",
    "Read the text in the image and reply with it.",
    "Describe the image briefly in one sentence.",
    "Write a short caption for this picture.",
    "Identify the object in the picture and name its category in one word.",
    "When the provided information is insufficient, respond with 'Unanswerable'.",
    "What is the scene in the image?",
    "What is the title of this book?",
    "What colour is the book cover?",
    "What is written on the sign?",
    "What does the sign say?",
    "This is a beach scene. There is a large red circle at the top left. A sign says stop.",
    "Describe the image. What is in this picture? Tell me about the image. What do you see?",
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
    lines: list[str] = list(TEMPLATES) + list(MINI_CVIT_TEMPLATES)
    words = (
        COLOURS
        + SHAPES
        + NUMBERS
        + SIZES
        + POSITIONS
        + SCENES
        + FUNCTION_WORDS
        + SIGN_WORDS
        + TASK_WORDS
    )
    lines.append(" ".join(words))
    lines.append(" ".join(w.capitalize() for w in words))
    for c in COLOURS:
        for s in SHAPES:
            lines.append(f"A {c} {s} on the left of a small {s}.")
    lines.append(" ".join(chr(ord("A") + i) for i in range(26)))
    lines.append(" ".join(str(i) for i in range(100)))
    lines.append("(A) (B) (C) (D) A. B. C. D. Options: ? , . ' \"")
    return lines
