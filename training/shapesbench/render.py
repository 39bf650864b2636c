"""Scenes: sampling them (deterministically from a numpy Generator) and rendering them exactly.

Rendering is exact supersampled rasterisation, not a drawing library: every pixel is covered by a
4 x 4 grid of sample points at sub-pixel centres, each tested against the ideal shape, and the
pixel is ``coverage * colour`` over the black background, rounded to uint8. Object interiors are
therefore exactly the palette colour and edges are antialiased; the result does not depend on any
library's polygon rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .spec import (
    ALL_PAIRS,
    CATEGORIES,
    COLORS,
    COUNT_WORDS,
    HELD_OUT,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    MAX_SIZE,
    MIN_GAP,
    MIN_SIZE,
    RELATIONS,
    TRAIN_PAIRS,
    Prompt,
    format_prompt,
    parse_prompt,
    relation_holds,
)

SUPERSAMPLING = 4
MARGIN = 2  # px between any object's bounding box and the canvas edge
POSITION_RATIO = 2.0  # rendered position scenes: offset along the axis >= 2 x offset across it


@dataclass(frozen=True)
class SceneObject:
    """One object: its bounding box is the square of side ``size`` centred at (cx, cy), in pixel
    coordinates where pixel (i, j) covers [j, j+1) x [i, i+1) (x right, y down)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    @property
    def center(self) -> tuple[float, float]:
        return (self.cx, self.cy)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "center": [self.cx, self.cy], "size": self.size}


@dataclass
class Scene:
    """The objects of one picture and its caption (one of the exact prompt forms)."""

    objects: list[SceneObject]
    caption: str
    category: str
    held_out: bool = False
    relation: str | None = field(default=None)

    def to_dict(self) -> dict:
        return {
            "caption": self.caption,
            "category": self.category,
            "held_out": self.held_out,
            "relation": self.relation,
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objects = [SceneObject(o["shape"], o["color"], o["center"][0], o["center"][1], o["size"]) for o in d["objects"]]
        return cls(objects, d["caption"], d["category"], bool(d.get("held_out", False)), d.get("relation"))


# -- geometry ---------------------------------------------------------------------------------


def inside(shape: str, box: tuple[float, float, float, float], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether points (x, y) lie inside ``shape`` inscribed in ``box`` = (x0, y0, x1, y1).

    circle: the inscribed ellipse; square: the box; triangle: apex at the top centre, base along
    the bottom edge (upright, isosceles; as tall as it is wide when the box is square)."""
    x0, y0, x1, y1 = box
    if shape == "square":
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    cx, rx, ry = (x0 + x1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if shape == "circle":
        cy = (y0 + y1) / 2
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    if shape == "triangle":
        depth = (y - y0) / (y1 - y0)  # 0 at the apex, 1 at the base
        return (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= rx * depth)
    raise ValueError(f"unknown shape {shape!r}; choose one of circle, square, triangle")


def coverage(
    shape: str,
    box: tuple[float, float, float, float],
    height: int = IMAGE_SIZE,
    width: int = IMAGE_SIZE,
    samples: int = SUPERSAMPLING,
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Fraction of each pixel covered by the shape, on the pixels of its box (clipped to the canvas).

    Returns (coverage array, (row slice, column slice)) so callers paste it into a canvas."""
    x0, y0, x1, y1 = box
    c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), width)
    r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), height)
    offsets = (np.arange(samples) + 0.5) / samples
    xs = (np.arange(c0, c1)[:, None] + offsets[None, :]).reshape(-1)
    ys = (np.arange(r0, r1)[:, None] + offsets[None, :]).reshape(-1)
    hit = inside(shape, box, xs[None, :], ys[:, None]).astype(np.float64)
    cov = hit.reshape(r1 - r0, samples, c1 - c0, samples).mean(axis=(1, 3))
    return cov, (slice(r0, r1), slice(c0, c1))


def render_scene(scene: Scene) -> Image.Image:
    """The 128 x 128 RGB picture of a scene: black background, flat palette colours, antialiased edges."""
    canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float64)
    for obj in scene.objects:
        if obj.color not in COLORS:
            raise ValueError(f"unknown colour {obj.color!r}; choose one of {', '.join(COLORS)}")
        cov, where = coverage(obj.shape, obj.box)
        color = np.asarray(COLORS[obj.color], dtype=np.float64)
        region = canvas[where]
        canvas[where] = region * (1.0 - cov[..., None]) + cov[..., None] * color
    return Image.fromarray(np.rint(canvas).astype(np.uint8), mode="RGB")


# -- sampling ---------------------------------------------------------------------------------


def _separated(a: tuple, b: tuple, gap: float = MIN_GAP) -> bool:
    """Boxes (x0, y0, x1, y1) at least ``gap`` px apart along x or along y."""
    return max(a[0] - b[2], b[0] - a[2]) >= gap or max(a[1] - b[3], b[1] - a[3]) >= gap


def _random_object(rng: np.random.Generator, shape: str, color: str, max_size: int = MAX_SIZE) -> SceneObject:
    size = int(rng.integers(MIN_SIZE, max_size + 1))
    x0 = int(rng.integers(MARGIN, IMAGE_SIZE - MARGIN - size + 1))
    y0 = int(rng.integers(MARGIN, IMAGE_SIZE - MARGIN - size + 1))
    return SceneObject(shape, color, x0 + size / 2, y0 + size / 2, float(size))


def _place(rng: np.random.Generator, pairs: list[tuple[str, str]], relation: str | None = None) -> list[SceneObject]:
    """Random non-overlapping placement (rejection sampling); for a relation, object 0 is
    ``relation`` object 1 with the offset along the axis at least twice the offset across it."""
    for restart in range(1000):
        # Crowded scenes that keep failing get smaller objects (still >= MIN_SIZE).
        max_size = MAX_SIZE if restart < 20 else MIN_SIZE + 10
        objects: list[SceneObject] = []
        for color, shape in pairs:
            for _ in range(200):
                candidate = _random_object(rng, shape, color, max_size)
                if not all(_separated(candidate.box, o.box) for o in objects):
                    continue
                if (
                    relation is not None
                    and objects
                    and not relation_holds(relation, objects[0].center, candidate.center, POSITION_RATIO)
                ):
                    continue
                objects.append(candidate)
                break
            else:
                break
        if len(objects) == len(pairs):
            return objects
    raise RuntimeError(f"could not place {pairs} (relation {relation!r})")  # not reached in practice


def scene_for_prompt(rng: np.random.Generator, prompt: str | Prompt, held_out: bool | None = None) -> Scene:
    """A random scene showing exactly what ``prompt`` says (and nothing else)."""
    parsed = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    pairs = [parsed.objects[0]] * parsed.count if parsed.category == "count" else list(parsed.objects)
    objects = _place(rng, pairs, parsed.relation)
    return Scene(
        objects=objects,
        caption=format_prompt(parsed),
        category=parsed.category,
        held_out=parsed.held_out if held_out is None else held_out,
        relation=parsed.relation,
    )


def _pick(rng: np.random.Generator, pool, exclude=()) -> tuple[str, str]:
    pool = [p for p in pool if p not in exclude]
    return pool[int(rng.integers(len(pool)))]


def sample_prompt(rng: np.random.Generator, category: str, held_out: bool = False) -> Prompt:
    """A random prompt of ``category``. ``held_out=False``: no held-out composition anywhere;
    ``held_out=True``: at least one object is a held-out composition. Objects of two-object and
    position prompts are distinct (colour, shape) pairs."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; choose one of {', '.join(CATEGORIES)}")
    pool = HELD_OUT_PAIRS if held_out else TRAIN_PAIRS
    if category == "single":
        return Prompt("single", (_pick(rng, pool),))
    if category == "count":
        word = list(COUNT_WORDS)[int(rng.integers(len(COUNT_WORDS)))]
        return Prompt("count", (_pick(rng, pool),), count=COUNT_WORDS[word])
    if held_out:
        first = _pick(rng, HELD_OUT_PAIRS)
        second = _pick(rng, ALL_PAIRS, exclude=(first,))
        pair = (first, second) if rng.random() < 0.5 else (second, first)
    else:
        first = _pick(rng, TRAIN_PAIRS)
        pair = (first, _pick(rng, TRAIN_PAIRS, exclude=(first,)))
    if category == "two":
        return Prompt("two", pair)
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    return Prompt("position", pair, relation=relation)


def sample_scene(rng: np.random.Generator, category: str, held_out: bool = False) -> Scene:
    """A random scene and caption of ``category`` (see ``sample_prompt`` for ``held_out``)."""
    scene = scene_for_prompt(rng, sample_prompt(rng, category, held_out))
    assert held_out == any((o.color, o.shape) in HELD_OUT for o in scene.objects)
    return scene


SPLITS = ("train", "heldout")


def category_weights(categories: dict[str, float] | None) -> np.ndarray:
    """Normalised weights over ``CATEGORIES`` (equal when None); unknown or negative entries raise."""
    if categories is None:
        return np.full(len(CATEGORIES), 1.0 / len(CATEGORIES))
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown ShapesBench categories {unknown}; choose from {', '.join(CATEGORIES)}")
    weights = np.array([float(categories.get(c, 0.0)) for c in CATEGORIES])
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f"category weights {categories} must be non-negative numbers with a positive sum")
    return weights / weights.sum()


def scene_at(seed: int, index: int, split: str = "train", categories: dict[str, float] | None = None) -> Scene:
    """Scene ``index`` of the stream ``seed``: drawn with ``numpy.random.default_rng([seed, index])``.

    split "train": no held-out composition anywhere (images or captions); "heldout": every scene
    has at least one held-out composition."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    weights = category_weights(categories)
    rng = np.random.default_rng([seed, index])
    category = CATEGORIES[int(rng.choice(len(CATEGORIES), p=weights))]
    return sample_scene(rng, category, held_out=split == "heldout")
