"""The fixed ShapesBench specification: canvas, palette, shapes, held-out compositions, prompt grammar.

Other tools read these images and prompts, so nothing here changes without a version bump
(``SPEC_VERSION``). The human-readable form is ``docs/shapesbench.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SPEC_VERSION = 1

IMAGE_SIZE = 128
BACKGROUND = (0, 0, 0)

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 30),
    "purple": (150, 50, 200),
    "white": (240, 240, 240),
}

MIN_SIZE = 20  # object bounding-box side, px
MAX_SIZE = 40
MIN_GAP = 4  # px between the bounding boxes of any two objects

CATEGORIES = ("single", "two", "count", "position")
COUNT_WORDS = {"two": 2, "three": 3, "four": 4}
NUMBER_WORDS = {n: w for w, n in COUNT_WORDS.items()}
RELATIONS = ("to the left of", "to the right of", "above", "below")
OPPOSITE = dict(zip(RELATIONS, ("to the right of", "to the left of", "below", "above")))  # the same axis, swapped

# Compositions that never appear in the training split (images or captions).
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("yellow", "square"), ("white", "circle")})
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p in HELD_OUT)


@dataclass(frozen=True)
class Prompt:
    """A parsed prompt. ``objects`` are (colour, shape) pairs in prompt order.

    single: one object; two: two objects; count: one object and ``count``; position: two
    objects and ``relation`` (object 0 is ``relation`` object 1).
    """

    category: str
    objects: tuple[tuple[str, str], ...]
    count: int | None = None
    relation: str | None = None

    @property
    def text(self) -> str:
        return format_prompt(self)

    @property
    def held_out(self) -> bool:
        return any(pair in HELD_OUT for pair in self.objects)


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_OBJ = rf"a ({_COLOR}) ({_SHAPE})"
_SINGLE = re.compile(rf"{_OBJ}")
_TWO = re.compile(rf"{_OBJ} and {_OBJ}")
_COUNT = re.compile(rf"({'|'.join(COUNT_WORDS)}) ({_COLOR}) ({_SHAPE})s")
_POSITION = re.compile(rf"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}")


def parse_prompt(prompt: str) -> Prompt:
    """Parse one of the four exact prompt forms; anything else raises ValueError naming the prompt."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt {prompt!r} is not a string")
    if m := _SINGLE.fullmatch(prompt):
        return Prompt("single", ((m[1], m[2]),))
    if m := _TWO.fullmatch(prompt):
        return Prompt("two", ((m[1], m[2]), (m[3], m[4])))
    if m := _COUNT.fullmatch(prompt):
        return Prompt("count", ((m[2], m[3]),), count=COUNT_WORDS[m[1]])
    if m := _POSITION.fullmatch(prompt):
        return Prompt("position", ((m[1], m[2]), (m[4], m[5])), relation=m[3])
    raise ValueError(
        f"prompt {prompt!r} is not a ShapesBench prompt; the forms are 'a COLOR SHAPE', "
        "'a COLOR SHAPE and a COLOR SHAPE', '{two|three|four} COLOR SHAPEs' and "
        "'a COLOR SHAPE {to the left of|to the right of|above|below} a COLOR SHAPE' "
        f"(colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; lower case, single spaces)"
    )


def format_prompt(prompt: Prompt) -> str:
    """The exact caption text of a parsed prompt (inverse of ``parse_prompt``)."""
    objs = [f"a {c} {s}" for c, s in prompt.objects]
    if prompt.category == "single":
        return objs[0]
    if prompt.category == "two":
        return f"{objs[0]} and {objs[1]}"
    if prompt.category == "count":
        color, shape = prompt.objects[0]
        return f"{NUMBER_WORDS[prompt.count]} {color} {shape}s"
    if prompt.category == "position":
        return f"{objs[0]} {prompt.relation} {objs[1]}"
    raise ValueError(f"unknown category {prompt.category!r}; choose one of {', '.join(CATEGORIES)}")


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], ratio: float = 1.0) -> bool:
    """Whether the object centred at ``a`` is ``relation`` the one centred at ``b`` (image coordinates,
    y down). The offset along the relation's axis must be positive and larger than ``ratio`` times the
    offset across it: with ``ratio=1`` (the judge) ``b`` lies within 45 degrees of the axis; the
    renderer uses ``ratio=2`` so that training pictures are unambiguous."""
    dx, dy = b[0] - a[0], b[1] - a[1]  # from a to b
    along, across = {
        "to the left of": (dx, dy),
        "to the right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return along > 0 and along > ratio * abs(across)
