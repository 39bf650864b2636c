"""The ShapesBench judge: a classical detector (no neural nets) and the per-category rules.

Detection, in order (the constants below are the documented thresholds):

1. The image is converted to RGB; other sizes are resized to 128 x 128 (box filter).
2. A 3 x 3 median filter per channel removes pixel noise and JPEG ringing.
3. Each pixel gets the palette colour whose direction in RGB space is closest (largest cosine),
   if the angle is at most ``MAX_ANGLE_DEG`` and the pixel's brightness along that colour is
   ``MIN_ALPHA``..``MAX_ALPHA`` times the palette colour's. Brightness scaling is allowed because an
   antialiased or blurred edge is the colour blended with the black background; the 0.5 floor puts
   the detected boundary where an edge is half covered, i.e. on the true outline.
4. Connected components (4-connectivity) of equal colour; holes inside a component are filled;
   components under ``MIN_AREA`` px are specks, and components whose box is wider or taller than
   ``MAX_SIDE`` px are washes of colour, not objects (spec objects are at most 40 px); both are
   ignored.
5. Shape: the component's bounding box must have an aspect ratio within ``MAX_ASPECT``; the ideal
   circle, square and upright triangle inscribed in that box are rasterised and the one with the
   highest intersection-over-union with the component wins if that IoU is at least ``MIN_IOU``;
   otherwise the shape is "unknown" (it never matches a prompt).
6. An object's centre is the centre of its bounding box (as in the render metadata); for a
   triangle, of the fitted box, which may reach above the detected tip.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .render import coverage
from .spec import COLORS, IMAGE_SIZE, SHAPES, parse_prompt, relation_holds

MAX_ANGLE_DEG = 15.0
MIN_ALPHA = 0.5
MAX_ALPHA = 1.4
MIN_AREA = 50
MAX_SIDE = 80
MIN_IOU = 0.7
MAX_ASPECT = 1.6
TRIANGLE_TOPS = (0.0, 0.05, 0.1, 0.15, 0.2)

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float32)
_NORMS = np.linalg.norm(_PALETTE, axis=1)
_UNITS = _PALETTE / _NORMS[:, None]


@dataclass
class Detection:
    color: str
    shape: str  # circle, square, triangle or "unknown"
    cx: float
    cy: float
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    iou: float

    @property
    def center(self) -> tuple[float, float]:
        return (self.cx, self.cy)

    def to_dict(self) -> dict:
        return {
            "color": self.color,
            "shape": self.shape,
            "center": [round(self.cx, 2), round(self.cy, 2)],
            "area": self.area,
            "box": list(self.box),
            "iou": round(self.iou, 3),
        }


@dataclass
class JudgeResult:
    correct: bool  # the GenEval-style rule: the requested objects are there, extras ignored
    category: str
    details: dict = field(default_factory=dict)
    # The strict rule: correct, and the picture holds exactly the requested objects, nothing else.
    exact: bool = False
    extras: list[str] = field(default_factory=list)  # detected objects beyond the requested ones


# -- image processing -------------------------------------------------------------------------


def _as_array(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


_MEDIAN9 = "12457801346712457803584736142547426442"  # pairs of indices, read two digits at a time


def _median3(a: np.ndarray) -> np.ndarray:
    """3 x 3 median per channel, edges replicated."""
    h, w = a.shape[:2]
    p = np.pad(a, ((1, 1), (1, 1), (0, 0)), mode="edge")
    v = [p[i : i + h, j : j + w] for i in range(3) for j in range(3)]

    def order(i, j):  # compare-exchange: v[i] <= v[j]
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])

    # The 19-exchange median-of-9 network (Paeth); the median ends in v[4].
    for k in range(0, len(_MEDIAN9), 2):
        order(int(_MEDIAN9[k]), int(_MEDIAN9[k + 1]))
    return v[4]


def color_labels(pixels: np.ndarray) -> np.ndarray:
    """Palette index per pixel (-1: background or an off-palette colour) of a float (H, W, 3) image."""
    norm = np.linalg.norm(pixels, axis=-1)
    proj = pixels @ _UNITS.T  # (H, W, 6): length along each palette direction
    cos = proj / np.maximum(norm, 1e-6)[..., None]
    best = np.argmax(cos, axis=-1)
    best_cos = np.take_along_axis(cos, best[..., None], -1)[..., 0]
    alpha = np.take_along_axis(proj, best[..., None], -1)[..., 0] / _NORMS[best]
    ok = (best_cos >= np.cos(np.deg2rad(MAX_ANGLE_DEG))) & (alpha >= MIN_ALPHA) & (alpha <= MAX_ALPHA)
    return np.where(ok, best, -1)


def label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative class; returns a component id per pixel (-1 off).

    Min-label propagation with pointer jumping: every pixel repeatedly takes the smallest id among
    itself and its same-class neighbours, then the id of the pixel that id names."""
    h, w = classes.shape
    on = classes >= 0
    big = h * w
    ids = np.where(on, np.arange(big).reshape(h, w), big)
    same_down = on[:-1] & (classes[:-1] == classes[1:])
    same_right = on[:, :-1] & (classes[:, :-1] == classes[:, 1:])
    while True:
        new = ids.copy()
        np.minimum(new[1:], np.where(same_down, ids[:-1], big), out=new[1:])
        np.minimum(new[:-1], np.where(same_down, ids[1:], big), out=new[:-1])
        np.minimum(new[:, 1:], np.where(same_right, ids[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_right, ids[:, 1:], big), out=new[:, :-1])
        flat = np.append(new.ravel(), big)
        new = np.where(on, flat[flat[new]], big)  # pointer jumping (twice)
        if np.array_equal(new, ids):
            break
        ids = new
    return np.where(on, ids, -1)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the background regions of ``mask`` that do not reach its border."""
    padded = np.pad(~mask, 1, constant_values=True)
    comp = label_components(np.where(padded, 0, -1))
    outside = comp[0, 0]
    return mask | (comp[1:-1, 1:-1] != outside)


def _classify(mask: np.ndarray) -> tuple[str, float, float]:
    """Best-fitting shape inscribed in the mask's own (tight) box: (shape, IoU, top), where the fitted
    box reaches ``top`` px above the mask (a triangle whose tip was blurred away)."""
    h, w = mask.shape
    if max(h, w) > MAX_ASPECT * min(h, w):
        return "unknown", 0.0, 0.0
    best, best_iou, best_top = "unknown", 0.0, 0.0
    m = mask.astype(np.float64)
    for shape in SHAPES:
        # A blurred or median-filtered apex loses its tip, so the triangle may reach above the box.
        for top in TRIANGLE_TOPS if shape == "triangle" else (0.0,):
            cov, _ = coverage(shape, (0.0, -top * h, float(w), float(h)), height=h, width=w, samples=2)
            iou = float(np.minimum(m, cov).sum() / np.maximum(m, cov).sum())
            if iou > best_iou:
                best, best_iou, best_top = shape, iou, top * h
    return (best if best_iou >= MIN_IOU else "unknown"), best_iou, best_top


def detect(image) -> list[Detection]:
    """All objects in a picture (PIL image or uint8 HWC array), specks removed, largest first."""
    pixels = _median3(_as_array(image))
    classes = color_labels(pixels)
    comps = label_components(classes)
    detections = []
    ids, counts = np.unique(comps[comps >= 0], return_counts=True)
    for cid, count in zip(ids, counts):
        if count < MIN_AREA:
            continue
        ys, xs = np.nonzero(comps == cid)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        if max(x1 - x0, y1 - y0) > MAX_SIDE:
            continue
        mask = _fill_holes(comps[y0:y1, x0:x1] == cid)
        shape, iou, top = _classify(mask)
        color = _NAMES[int(classes[ys[0], xs[0]])]
        cx, cy = (x0 + x1) / 2, (y0 - top + y1) / 2
        detections.append(Detection(color, shape, cx, cy, int(mask.sum()), (x0, y0, x1, y1), iou))
    detections.sort(key=lambda d: (-d.area, d.cy, d.cx))
    return detections


# -- the rules --------------------------------------------------------------------------------


def judge(image, prompt: str) -> JudgeResult:
    """Whether ``image`` shows ``prompt`` (one of the exact prompt forms; others raise ValueError).

    single: at least one object of the colour and shape. two: each requested object present (a
    pair requested twice needs two). count: exactly N objects of the colour and shape. position:
    both present, and the largest object of the first kind is in the relation to the largest of
    the second kind, by centres, within 45 degrees of the relation's axis. Other objects in the
    picture are ignored, as in GenEval.

    ``exact`` is the strict rule: ``correct``, and the detected objects are exactly the requested
    multiset (a second red circle beside "a red circle", or any object of another colour or
    shape, fails it; so does a blob whose shape the detector cannot name). ``extras`` lists the
    detected objects beyond the requested ones, whether or not the prompt was satisfied."""
    parsed = parse_prompt(prompt)
    detections = detect(image)

    def matching(pair):
        return [d for d in detections if (d.color, d.shape) == pair]

    requested = Counter(parsed.objects)
    found = {f"{c} {s}": len(matching((c, s))) for c, s in requested}
    details: dict = {"found": found, "detections": [d.to_dict() for d in detections]}
    if parsed.category in ("single", "two"):
        missing = [f"{c} {s}" for (c, s), k in requested.items() if len(matching((c, s))) < k]
        correct = not missing
        if missing:
            details["reason"] = f"missing: {', '.join(missing)}"
    elif parsed.category == "count":
        n = found[f"{parsed.objects[0][0]} {parsed.objects[0][1]}"]
        correct = n == parsed.count
        if not correct:
            details["reason"] = f"found {n}, wanted {parsed.count}"
    else:
        a_pair, b_pair = parsed.objects
        a_list, b_list = matching(a_pair), matching(b_pair)
        if a_pair == b_pair:
            pairs = [(a_list[0], a_list[1]), (a_list[1], a_list[0])] if len(a_list) >= 2 else []
        else:
            pairs = [(a_list[0], b_list[0])] if a_list and b_list else []
        if not pairs:
            correct = False
            missing = [f"{c} {s}" for (c, s), k in requested.items() if len(matching((c, s))) < k]
            details["reason"] = f"missing: {', '.join(missing)}"
        else:
            correct = any(relation_holds(parsed.relation, a.center, b.center) for a, b in pairs)
            a, b = pairs[0]
            details["centers"] = [[round(a.cx, 2), round(a.cy, 2)], [round(b.cx, 2), round(b.cy, 2)]]
            if not correct:
                details["reason"] = f"relation {parsed.relation!r} does not hold by centres"
    expected = Counter({parsed.objects[0]: parsed.count}) if parsed.category == "count" else requested
    detected = Counter((d.color, d.shape) for d in detections)
    extras = sorted(f"{c} {s}" for (c, s), k in (detected - expected).items() for _ in range(k))
    exact = bool(correct) and detected == expected
    details["extras"] = extras
    return JudgeResult(correct=bool(correct), category=parsed.category, details=details, exact=exact, extras=extras)
