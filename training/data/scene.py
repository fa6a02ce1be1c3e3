"""Procedural scenes for mini-CVIT: what is in a picture, and how it is drawn with Pillow.

A `Scene` is a small symbolic description (a background scene, up to a few coloured shapes
on a 3x3 grid, an optional sign carrying a word, or a book cover with a title). Task
generators (`tasks.py`) ask questions about the symbols; `render_scene` draws them; the
generic `describe` text is what the base model is pre-trained on (`training/pretrain.py`).

Everything is deterministic given a `random.Random`. This module knows nothing about tasks,
instructions, tokenizers or files.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (245, 215, 30),
    "purple": (150, 60, 195),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "ring",
    "hexagon",
)
SIZES: tuple[str, ...] = ("small", "large")
#: Background scenes: (top colour, bottom colour, horizon as a fraction of the height, texture).
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int], float, str]] = {
    "beach": ((150, 200, 240), (235, 215, 170), 0.5, "none"),
    "forest": ((70, 120, 70), (45, 85, 45), 0.35, "trees"),
    "desert": ((250, 225, 170), (215, 175, 110), 0.4, "dunes"),
    "city": ((175, 180, 195), (110, 110, 120), 0.55, "buildings"),
    "snow": ((200, 215, 235), (245, 245, 250), 0.45, "none"),
    "night": ((20, 25, 60), (35, 35, 70), 0.7, "stars"),
    "field": ((160, 205, 240), (150, 195, 95), 0.45, "none"),
    "ocean": ((170, 210, 240), (40, 90, 160), 0.4, "waves"),
}
WORDS: tuple[str, ...] = (
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
NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
#: Grid cells (row, col) of a 3x3 layout and their names.
CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene.

    Attributes:
        shape: one of `SHAPES`.
        colour: one of `COLOURS`.
        size: "small", "large", or "huge" (a single centred object).
        cell: (row, col) in the 3x3 grid.
    """

    shape: str
    colour: str
    size: str
    cell: tuple[int, int]

    @property
    def name(self) -> str:
        """E.g. "red circle"."""
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """The symbolic content of one picture.

    Attributes:
        background: one of `BACKGROUNDS`.
        objects: shapes, in reading order of their cells.
        sign: a word written on a white sign in the bottom row, or None.
        cover: (cover colour, title) when the picture is a book cover instead of a scene.
        jitter: per-object pixel offsets (fractions of a cell) so pictures are not identical.
    """

    background: str
    objects: list[SceneObject] = field(default_factory=list)
    sign: str | None = None
    cover: tuple[str, str] | None = None
    jitter: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        self.objects = sorted(self.objects, key=lambda o: o.cell)
        if not self.jitter:
            self.jitter = [(0.0, 0.0)] * len(self.objects)

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        """How many objects match the shape and/or colour."""
        return sum(
            (shape is None or o.shape == shape) and (colour is None or o.colour == colour)
            for o in self.objects
        )

    def find(self, shape: str | None = None, colour: str | None = None) -> list[SceneObject]:
        """The objects matching the shape and/or colour."""
        return [
            o
            for o in self.objects
            if (shape is None or o.shape == shape) and (colour is None or o.colour == colour)
        ]


def sample_scene(
    rng: random.Random,
    min_objects: int = 1,
    max_objects: int = 4,
    sign: bool | None = None,
    distinct_shapes: bool = False,
    repeat_shapes: bool = False,
) -> Scene:
    """Draw a random scene.

    Args:
        rng: source of randomness.
        min_objects, max_objects: inclusive bounds on the number of shapes.
        sign: force a sign on (True) or off (False); None draws it with probability 0.3.
        distinct_shapes: every object has a different shape.
        repeat_shapes: favour repeated shapes (for counting questions).

    Returns:
        A `Scene`.
    """
    has_sign = rng.random() < 0.3 if sign is None else sign
    rows = (0, 1) if has_sign else (0, 1, 2)
    cells = [(r, c) for r in rows for c in range(3)]
    n = rng.randint(min_objects, min(max_objects, len(cells)))
    chosen = rng.sample(cells, n)
    shapes = rng.sample(SHAPES, n) if distinct_shapes else None
    pool = rng.sample(SHAPES, 2) if repeat_shapes else SHAPES
    objects = []
    for i, cell in enumerate(chosen):
        shape = shapes[i] if shapes else rng.choice(pool)
        objects.append(SceneObject(shape, rng.choice(tuple(COLOURS)), rng.choice(SIZES), cell))
    objects.sort(key=lambda o: o.cell)
    jitter = [(rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)) for _ in objects]
    return Scene(
        background=rng.choice(tuple(BACKGROUNDS)),
        objects=objects,
        sign=rng.choice(WORDS) if has_sign else None,
        jitter=jitter,
    )


def sample_single_object(rng: random.Random) -> Scene:
    """One huge object near the centre (the object-classification pictures)."""
    obj = SceneObject(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), "huge", (1, 1))
    return Scene(
        rng.choice(tuple(BACKGROUNDS)),
        [obj],
        jitter=[(rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3))],
    )


def sample_cover(rng: random.Random) -> Scene:
    """A book cover: a solid colour, a title word, and a small shape as its emblem."""
    colour = rng.choice(tuple(COLOURS))
    emblem = SceneObject(
        rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != colour]), "small", (0, 1)
    )
    return Scene(rng.choice(tuple(BACKGROUNDS)), [emblem], cover=(colour, rng.choice(WORDS)))


# --------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------
def article(word: str) -> str:
    """ "a" or "an" for the word that follows."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "es" if shape.endswith(("x", "s")) else shape + "s"


def describe(scene: Scene) -> str:
    """The generic, multi-sentence description the base model is aligned on.

    It states everything visible (scene, every object with size and position, the sign)
    but in no task's answer format.
    """
    if scene.cover is not None:
        colour, title = scene.cover
        emblem = scene.objects[0]
        return (
            f"This is {article(colour)} {colour} book cover. The title is {title}. "
            f"There is {article(emblem.colour)} {emblem.colour} {emblem.shape} at the top."
        )
    parts = [f"This is {article(scene.background)} {scene.background} scene."]
    for o in scene.objects:
        phrase = o.name if o.size == "huge" else f"{o.size} {o.name}"
        where = "in the middle" if o.size == "huge" else f"at the {CELL_NAMES[o.cell]}"
        parts.append(f"There is {article(phrase)} {phrase} {where}.")
    if scene.sign:
        parts.append(f"A sign says {scene.sign}.")
    return " ".join(parts)


#: The sentence forms of `describe` and the facts each states, in group order.
DESCRIPTION_FORMS: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = (
    (re.compile(r"This is an? (\w+) scene\."), ("scene",)),
    (re.compile(r"This is an? (\w+) book cover\."), ("cover",)),
    (
        re.compile(
            r"There is an? (?:(small|large) )?(\w+) (\w+) (?:at the ([a-z ]+)|in the middle)\."
        ),
        ("size", "colour", "shape", "position"),
    ),
    (re.compile(r"A sign says (\w+)\."), ("sign",)),
    (re.compile(r"The title is ([^.]+)\."), ("title",)),
)
_CELLS = {name: cell for cell, name in CELL_NAMES.items()}


@dataclass(frozen=True)
class DescribedFacts:
    """What a `describe` text states (its inverse): `objects` as `SceneObject`s (a huge
    object "in the middle" sits in the centre cell), the background (None for a book
    cover, whose description does not name one), the sign word and the cover's colour and
    title."""

    background: str | None
    objects: tuple[SceneObject, ...]
    sign: str | None = None
    cover: tuple[str, str] | None = None


def parse_description(text: str) -> DescribedFacts:
    """The facts of a description written by `describe`.

    Raises:
        ValueError: if an object sentence names an unknown shape, colour or position.
    """
    background = sign = cover_colour = title = None
    objects = []
    for pattern, _names in DESCRIPTION_FORMS:
        for m in pattern.finditer(text):
            if pattern is DESCRIPTION_FORMS[0][0]:
                background = m.group(1)
            elif pattern is DESCRIPTION_FORMS[1][0]:
                cover_colour = m.group(1)
            elif pattern is DESCRIPTION_FORMS[2][0]:
                size, colour, shape, where = m.groups()
                if shape not in SHAPES or colour not in COLOURS:
                    raise ValueError(f"unknown object {colour!r} {shape!r} in {text!r}")
                if where is not None and where not in _CELLS:
                    raise ValueError(f"unknown position {where!r} in {text!r}")
                if where is None:  # a huge object, alone in the middle
                    obj = SceneObject(shape, colour, "huge", (1, 1))
                else:  # a book cover's emblem has no size word: it is small
                    obj = SceneObject(shape, colour, size or "small", _CELLS[where])
                objects.append((m.start(), obj))
            elif pattern is DESCRIPTION_FORMS[3][0]:
                sign = m.group(1)
            else:
                title = m.group(1)
    cover = (cover_colour, title) if cover_colour is not None and title is not None else None
    return DescribedFacts(background, tuple(o for _, o in sorted(objects)), sign, cover)


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------
def _polygon(
    cx: float, cy: float, r: float, n: int, phase: float = -math.pi / 2
) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(phase + 2 * math.pi * k / n),
            cy + r * math.sin(phase + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    r: float,
    fill: tuple[int, int, int],
) -> None:
    """Draw one filled shape of radius `r` centred at (cx, cy) with a dark outline."""
    outline = (25, 25, 25)
    w = max(1, int(r / 6))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=w)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, int(r * 0.45)))
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill, outline=outline, width=w)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.1, 3), fill=fill, outline=outline, width=w)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4), fill=fill, outline=outline, width=w)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill, outline=outline, width=w)
    elif shape == "star":
        draw.polygon(_star(cx, cy, r * 1.15), fill=fill, outline=outline, width=w)
    elif shape == "cross":
        t = r * 0.35
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _background(draw: ImageDraw.ImageDraw, name: str, size: int, rng: random.Random) -> None:
    top, bottom, horizon, texture = BACKGROUNDS[name]
    h = int(size * horizon)
    draw.rectangle((0, 0, size, h), fill=top)
    draw.rectangle((0, h, size, size), fill=bottom)
    if texture == "trees":
        for _ in range(5):
            x = rng.uniform(0, size)
            draw.polygon(
                [(x, h - size * 0.2), (x - size * 0.06, h + 2), (x + size * 0.06, h + 2)],
                fill=(30, 70, 35),
            )
    elif texture == "buildings":
        x = 0.0
        while x < size:
            w = rng.uniform(0.1, 0.2) * size
            draw.rectangle(
                (x, h - rng.uniform(0.1, 0.3) * size, x + w - 2, h), fill=(130, 135, 150)
            )
            x += w
    elif texture == "stars":
        for _ in range(12):
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            draw.point((x, y), fill=(240, 240, 200))
    elif texture == "waves":
        for k in range(4):
            y = h + (k + 1) * (size - h) / 5
            draw.line((0, y, size, y), fill=(90, 140, 200), width=max(1, size // 64))
    elif texture == "dunes":
        draw.ellipse(
            (-size * 0.2, h - size * 0.05, size * 0.6, h + size * 0.15), fill=(225, 185, 120)
        )


def render_scene(scene: Scene, image_size: int = 64, seed: int = 0) -> Image.Image:
    """Draw a scene as an RGB picture.

    Drawn at twice the size and downsampled (anti-aliasing); `seed` only moves background
    texture, so the symbolic content fully decides every answer.

    Args:
        scene: what to draw.
        image_size: output side in pixels.
        seed: texture randomness.

    Returns:
        A `image_size` x `image_size` RGB image.
    """
    s = image_size * 2
    rng = random.Random(seed)
    img = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(img)
    if scene.cover is not None:
        colour, title = scene.cover
        draw.rectangle((0, 0, s, s), fill=COLOURS[colour])
        draw.rectangle(
            (s * 0.06, s * 0.06, s * 0.94, s * 0.94), outline=(250, 250, 250), width=max(1, s // 48)
        )
        emblem = scene.objects[0]
        draw_shape(draw, emblem.shape, s / 2, s * 0.25, s * 0.1, COLOURS[emblem.colour])
        _text(draw, title.upper(), s / 2, s * 0.62, s * 0.2, (250, 250, 250))
        return img.resize((image_size, image_size), Image.Resampling.LANCZOS)
    _background(draw, scene.background, s, rng)
    cell = s / 3
    for o, (jx, jy) in zip(scene.objects, scene.jitter):
        if o.size == "huge":
            cx, cy, r = s / 2 + jx * cell, s / 2 + jy * cell, s * 0.28
        else:
            r = cell * (0.38 if o.size == "large" else 0.24)
            cx, cy = (o.cell[1] + 0.5 + jx) * cell, (o.cell[0] + 0.5 + jy) * cell
        draw_shape(draw, o.shape, cx, cy, r, COLOURS[o.colour])
    if scene.sign:
        top = 2 * cell + cell * 0.12
        draw.rectangle(
            (s * 0.1, top, s * 0.9, s - cell * 0.12),
            fill=(250, 250, 250),
            outline=(30, 30, 30),
            width=max(1, s // 64),
        )
        _text(
            draw, scene.sign.upper(), s / 2, (top + s - cell * 0.12) / 2, cell * 0.6, (10, 10, 10)
        )
    return img.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _text(
    draw: ImageDraw.ImageDraw,
    text: str,
    cx: float,
    cy: float,
    height: float,
    fill: tuple[int, int, int],
) -> None:
    font = ImageFont.load_default(size=max(6, int(height)))
    draw.text((cx, cy), text, fill=fill, font=font, anchor="mm")
