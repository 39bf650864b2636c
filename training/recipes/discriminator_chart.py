"""The discriminator's accuracy through LADD runs, as a PNG (docs/results.md's chart).

    .venv/bin/python training/recipes/discriminator_chart.py docs/images/ladd-discriminator-accuracy.png \
        runs/shapes/ladd runs/shapes/ladd-noadv runs/shapes/ladd-baseline

Reads each run's metrics.csv (``d_accuracy``: the share of logits on the right side of 0, 0.5 is
chance) and draws one line per run with PIL, so it needs nothing beyond the project's packages.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = [(230, 90, 60), (60, 120, 230), (90, 170, 90), (150, 90, 200)]
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 760, 380, 60, 20, 40, 50
LOW, HIGH = 0.4, 0.9


def accuracy(run: Path) -> list[tuple[int, float]]:
    metrics = run / "metrics.csv"
    if not metrics.is_file():
        sys.exit(f"{run}: no metrics.csv (a LADD run's folder, such as runs/shapes/ladd, has one)")
    rows = csv.DictReader(metrics.open())
    points = [(int(r["step"]), float(r["value"])) for r in rows if r["metric"] == "d_accuracy"]
    if not points:
        sys.exit(f"{metrics}: no d_accuracy rows (is {run} a LADD run?)")
    return points


def chart(runs: list[Path]) -> Image.Image:
    curves = {run.name: accuracy(run) for run in runs}
    last = max(step for points in curves.values() for step, _ in points)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)

    def xy(step: float, value: float) -> tuple[float, float]:
        x = LEFT + (WIDTH - LEFT - RIGHT) * step / last
        return x, TOP + (HEIGHT - TOP - BOTTOM) * (HIGH - value) / (HIGH - LOW)

    for tick in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        y = xy(0, tick)[1]
        draw.line([(LEFT, y), (WIDTH - RIGHT, y)], fill=(150, 150, 150) if tick == 0.5 else (225, 225, 225))
        draw.text((LEFT - 34, y - 7), f"{tick:.1f}", fill="black", font=font)
    for k in range(5):
        step = round(last * k / 4)
        draw.text((xy(step, LOW)[0] - 10, HEIGHT - BOTTOM + 6), str(step), fill="black", font=font)
    draw.text((WIDTH // 2 - 30, HEIGHT - 22), "step", fill="black", font=font)
    draw.text((LEFT, 10), "LADD discriminator accuracy (0.5 = chance)", fill="black", font=font)
    for k, (name, points) in enumerate(curves.items()):
        color = COLORS[k % len(COLORS)]
        line = [xy(step, min(max(value, LOW), HIGH)) for step, value in points]
        draw.line(line, fill=color, width=2)
        for x, y in line:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        draw.rectangle([LEFT + 12, TOP + 8 + 18 * k, LEFT + 28, TOP + 18 + 18 * k], fill=color)
        draw.text((LEFT + 34, TOP + 5 + 18 * k), name, fill="black", font=font)
    return image


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: discriminator_chart.py OUT.png RUN_DIR [RUN_DIR ...]")
    chart([Path(p) for p in sys.argv[2:]]).save(sys.argv[1], optimize=True)
