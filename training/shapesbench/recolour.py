"""Image-to-image on ShapesBench: recolour a rendered shape by prompt.

For each (colour, shape) pair a scene of one object is rendered; the model is asked, from that picture,
for the same shape in the next colour of the palette. Reported per strength: how often the judge sees
the new colour, how often the old one survives, and how much of the layout is kept (the intersection
over union of the pictures' foreground masks). A working image-to-image recolours often at moderate
strength while keeping the layout, keeps the input near 0, and ignores it at 1.

    python -m training.shapesbench.recolour [--model DIR] [--strength 0 0.5 1]
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from .judging import judge
from .render import render_scene, scene_for_prompt
from .spec import COLORS, SHAPES

FOREGROUND = 60  # a pixel brighter than this in any channel is part of a shape (the background is black)


def recolour_check(pipeline, strength: float, seed: int = 0) -> dict:
    """Recolour every (colour, shape) pair once at ``strength``; image i uses noise seed ``seed + i``."""
    colors = list(COLORS)
    recoloured = kept_old = 0
    ious = []
    pairs = list(itertools.product(colors, SHAPES))
    for i, (color, shape) in enumerate(pairs):
        target = colors[(colors.index(color) + 1) % len(colors)]
        source = render_scene(scene_for_prompt(np.random.default_rng(seed + i), f"a {color} {shape}"))
        out = pipeline(f"a {target} {shape}", seeds=seed + i, image=source, strength=strength).images[0]
        recoloured += judge(out, f"a {target} {shape}").correct
        kept_old += judge(out, f"a {color} {shape}").correct
        a, b = np.asarray(source).max(-1) > FOREGROUND, np.asarray(out).max(-1) > FOREGROUND
        ious.append(float((a & b).sum() / max(1, (a | b).sum())))
    n = len(pairs)
    return {"strength": strength, "pairs": n, "recoloured": recoloured / n, "old_colour_kept": kept_old / n,
            "layout_iou": float(np.mean(ious))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from snapgen.model_dir import load_pipeline

    parser = argparse.ArgumentParser(prog="python -m training.shapesbench.recolour", description=__doc__)
    parser.add_argument("--model", help="model directory (default: the embedded default model)")
    parser.add_argument("--strength", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    args = parser.parse_args(argv)
    pipeline = load_pipeline(args.model)
    for strength in args.strength:
        print(json.dumps(recolour_check(pipeline, strength)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
