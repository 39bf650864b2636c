"""The judge's accuracy on degraded renders: ``python -m training.shapesbench.robustness [--n 250]``.

Renders ``n`` scenes per category (every fifth one held-out), degrades each picture, and prints
the fraction the judge still calls correct, per degradation. The table in docs/shapesbench.md
comes from this script.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image, ImageFilter

from .judging import judge
from .render import render_scene, sample_scene
from .spec import CATEGORIES


def blur(image: Image.Image, sigma: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(sigma))


def noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise of standard deviation ``sigma`` (of 255) per channel."""
    a = np.asarray(image, dtype=np.float32) + rng.normal(0.0, sigma, np.asarray(image).shape)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def color_shift(image: Image.Image, amount: float, rng: np.random.Generator) -> Image.Image:
    """Every channel of the whole picture (background included) offset by one uniform draw in +-amount."""
    a = np.asarray(image, dtype=np.float32) + rng.uniform(-amount, amount, 3)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


DEGRADATIONS = {
    "clean": lambda im, rng: im,
    "gaussian blur sigma 1": lambda im, rng: blur(im, 1.0),
    "gaussian blur sigma 1.5": lambda im, rng: blur(im, 1.5),
    "gaussian blur sigma 2": lambda im, rng: blur(im, 2.0),
    "gaussian blur sigma 2.5": lambda im, rng: blur(im, 2.5),
    "additive gaussian noise sigma 15": lambda im, rng: noise(im, 15, rng),
    "additive gaussian noise sigma 25": lambda im, rng: noise(im, 25, rng),
    "additive gaussian noise sigma 35": lambda im, rng: noise(im, 35, rng),
    "additive gaussian noise sigma 50": lambda im, rng: noise(im, 50, rng),
    "jpeg quality 50": lambda im, rng: jpeg(im, 50),
    "jpeg quality 30": lambda im, rng: jpeg(im, 30),
    "jpeg quality 25": lambda im, rng: jpeg(im, 25),
    "jpeg quality 10": lambda im, rng: jpeg(im, 10),
    "colour shift +-20 per channel": lambda im, rng: color_shift(im, 20, rng),
    "colour shift +-25 per channel": lambda im, rng: color_shift(im, 25, rng),
    "colour shift +-30 per channel": lambda im, rng: color_shift(im, 30, rng),
    "colour shift +-40 per channel": lambda im, rng: color_shift(im, 40, rng),
    "blur 1 + noise 15 + jpeg 50": lambda im, rng: jpeg(noise(blur(im, 1.0), 15, rng), 50),
}


def sweep(n_per_category: int = 250, seed: int = 0, names=None, on_result=None) -> dict[str, float]:
    """Judge accuracy per degradation over ``4 * n_per_category`` scenes; ``on_result(name, accuracy)``
    is called as each degradation finishes."""
    scenes = [
        sample_scene(np.random.default_rng([seed, i, k]), category, held_out=i % 5 == 0)
        for i in range(n_per_category)
        for k, category in enumerate(CATEGORIES)
    ]
    pictures = [render_scene(s) for s in scenes]
    results = {}
    for name in names or DEGRADATIONS:
        rng = np.random.default_rng([seed, 1])
        degrade = DEGRADATIONS[name]
        correct = sum(judge(degrade(p, rng), s.caption).correct for p, s in zip(pictures, scenes))
        results[name] = correct / len(scenes)
        if on_result is not None:
            on_result(name, results[name])
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=250, help="scenes per category")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sweep(args.n, args.seed, on_result=lambda name, acc: print(f"{name:36s} {100 * acc:6.2f} %", flush=True))


if __name__ == "__main__":
    main()
