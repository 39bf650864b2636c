"""Evaluate a text-to-image pipeline on ShapesBench: a fixed prompt list, generation, judging, a report."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import judging as judge_module
from .judging import judge
from .render import sample_prompt
from .spec import CATEGORIES, HELD_OUT_PAIRS, IMAGE_SIZE, OPPOSITE, SPEC_VERSION, parse_prompt, relation_holds


def evaluation_prompts(n: int = 600, seed: int = 0, n_held_out: int | None = None) -> list[dict]:
    """The fixed evaluation list: ``n`` prompts without held-out compositions, then ``n_held_out``
    (default ``n // 4``) prompts that each contain at least one. Both blocks cycle through the
    categories single, two, count, position, so each category gets n/4 prompts (+-1).

    Prompt ``j`` of a block is drawn with ``numpy.random.default_rng([seed, block, j])``."""
    if n < len(CATEGORIES):
        raise ValueError(f"n must be at least {len(CATEGORIES)} (one prompt per category), got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    n_held_out = n // 4 if n_held_out is None else n_held_out
    if n_held_out < 0:
        raise ValueError(f"n_held_out must be >= 0, got {n_held_out}")
    items = []
    for block, (count, held_out) in enumerate(((n, False), (n_held_out, True))):
        for j in range(count):
            category = CATEGORIES[j % len(CATEGORIES)]
            prompt = sample_prompt(np.random.default_rng([seed, block, j]), category, held_out=held_out)
            items.append({"prompt": prompt.text, "category": category, "held_out": held_out})
    return items


# What each record counts towards: the GenEval-style rule, the strict rule, extra objects drawn.
_RULES = {
    "correct": lambda r: r["correct"],
    "exact": lambda r: r["exact"],
    "with_extras": lambda r: r["extra_objects"] > 0,
}


def _summary(records: list[dict]) -> dict:
    """Per category and overall (the mean of the categories present): ``accuracy`` by the GenEval-style
    rule, ``exact`` (the share with exactly the requested objects and nothing else) and
    ``extra_rate`` (the share with at least one object beyond the requested ones)."""
    counts = {}
    for category in CATEGORIES:
        mine = [r for r in records if r["category"] == category]
        counts[category] = {name: sum(rule(r) for r in mine) for name, rule in _RULES.items()} | {"total": len(mine)}

    def shares(name: str) -> tuple[dict, float | None]:
        per = {c: n[name] / n["total"] if n["total"] else None for c, n in counts.items()}
        present = [a for a in per.values() if a is not None]
        return per, (sum(present) / len(present) if present else None)

    (accuracy, overall), (exact, exact_overall), (extra_rate, extra_overall) = map(
        shares, ("correct", "exact", "with_extras")
    )
    return {
        "accuracy": accuracy, "overall": overall,
        "exact": exact, "exact_overall": exact_overall,
        "extra_rate": extra_rate, "extra_rate_overall": extra_overall,
        "counts": counts,
    }  # fmt: skip


def composition_breakdown(records: list[dict]) -> dict:
    """Which held-out composition fails: for each held-out (colour, shape) pair, the held-out records
    whose prompt names it (``total``) and how many of those were judged correct. A prompt naming two
    held-out pairs counts for both, so the totals can add up to more than the records."""
    named = [(r["correct"], parse_prompt(r["prompt"]).objects) for r in records]
    breakdown = {}
    for color, shape in HELD_OUT_PAIRS:
        mine = [correct for correct, objects in named if (color, shape) in objects]
        breakdown[f"{color} {shape}"] = {"correct": int(sum(mine)), "total": len(mine)}
    return breakdown


def relation_breakdown(records: list[dict]) -> dict:
    """Why position prompts fail: of the ``position`` records where each named object was detected
    exactly once (``pairs``), how many have the asked relation (``asked``), how many its opposite
    (``opposite``: the right axis, the objects swapped); the rest sit off both (diagonal)."""
    pairs = asked = opposite = 0
    for r in records:
        if r["category"] != "position":
            continue
        prompt = parse_prompt(r["prompt"])
        centers = [
            [d["center"] for d in r["details"].get("detections", []) if (d["color"], d["shape"]) == tuple(obj)]
            for obj in prompt.objects
        ]
        if any(len(c) != 1 for c in centers):
            continue
        a, b = centers[0][0], centers[1][0]
        pairs += 1
        asked += relation_holds(prompt.relation, a, b)
        opposite += relation_holds(OPPOSITE[prompt.relation], a, b)
    return {"position_prompts": sum(r["category"] == "position" for r in records), "pairs": pairs,
            "asked": asked, "opposite": opposite}


def evaluate(
    pipeline,
    n: int = 600,
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    batch_size: int = 16,
    progress: bool = True,
    n_held_out: int | None = None,
    on_image: Callable[[int, dict, Image.Image], None] | None = None,
) -> dict:
    """Generate every prompt of ``evaluation_prompts(n, seed, n_held_out)`` with ``pipeline`` and judge it.

    Image ``i`` of the list starts from the portable noise of seed ``seed + i``; ``steps`` and
    ``guidance_scale`` default to the model's. The report (JSON-ready): ``accuracy`` per category and
    ``overall`` (the mean of the four) on the main block, beside them the strict ``exact`` /
    ``exact_overall`` and the ``extra_rate`` / ``extra_rate_overall`` (see ``_summary``), the
    same under ``held_out`` for the held-out block (with ``compositions``: see
    ``composition_breakdown``), and ``records`` (one per prompt: prompt, category, seed, correct,
    exact, extra_objects, judge details).
    ``on_image(i, record, image)`` sees every generated image (e.g. to save or tile them)."""
    from tqdm import tqdm

    from snapgen.request import GenerationRequest

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = evaluation_prompts(n, seed, n_held_out)
    native = (IMAGE_SIZE, IMAGE_SIZE)
    height, width = native if native in pipeline.resolutions else pipeline.default_size
    # The whole run as one request, resolved before anything is generated: bad settings fail now.
    request = pipeline.resolve(GenerationRequest(
        [it["prompt"] for it in items], seed=seed, steps=steps, guidance_scale=guidance_scale, height=height,
        width=width,
    ))  # fmt: skip

    start = time.perf_counter()
    records = []
    with tqdm(total=len(items), unit="img", desc="shapesbench", disable=not progress) as bar:
        for lo, chunk in zip(range(0, len(items), batch_size), request.chunks(batch_size)):
            batch = items[lo : lo + batch_size]
            seeds = chunk.seeds
            images = pipeline.run(chunk, output_type="pil").images
            for k, (item, image, noise_seed) in enumerate(zip(batch, images, seeds)):
                result = judge(image, item["prompt"])
                record = {
                    "index": lo + k, **item, "seed": noise_seed, "correct": result.correct,
                    "exact": result.exact, "extra_objects": len(result.extras),
                }  # fmt: skip
                record["details"] = result.details
                records.append(record)
                if on_image is not None:
                    on_image(lo + k, record, image)
            bar.update(len(batch))

    main = _summary([r for r in records if not r["held_out"]])
    held_records = [r for r in records if r["held_out"]]
    held = {**_summary(held_records), "compositions": composition_breakdown(held_records)}
    return {
        "benchmark": "shapesbench",
        "spec_version": SPEC_VERSION,
        "model": str(getattr(pipeline, "model_dir", "") or "") or None,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "seed": seed,
        "resolution": [height, width],
        "n": n,
        "n_held_out": len(records) - n,
        **main,
        "held_out": held,
        "relations": relation_breakdown([r for r in records if not r["held_out"]]),
        "judge": {
            "max_angle_deg": judge_module.MAX_ANGLE_DEG,
            "min_alpha": judge_module.MIN_ALPHA,
            "max_alpha": judge_module.MAX_ALPHA,
            "min_area": judge_module.MIN_AREA,
            "max_side": judge_module.MAX_SIDE,
            "min_iou": judge_module.MIN_IOU,
            "max_aspect": judge_module.MAX_ASPECT,
        },
        "seconds": round(time.perf_counter() - start, 3),
        "records": records,
    }


def sample_grid(cells: list[tuple[Image.Image, str, bool | None]], columns: int = 4, scale: int = 2) -> Image.Image:
    """Tile (image, caption, correct) cells: each image enlarged ``scale`` x (nearest), its caption
    below, prefixed "[ok]" (green) or "[x]" (red) when ``correct`` is known."""
    if not cells:
        raise ValueError("no images to tile")
    try:
        font = ImageFont.load_default(size=13)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    cell_w = IMAGE_SIZE * scale
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    char_w = max(1, probe.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    wrap = max(8, int((cell_w - 8) / char_w))
    line_h = int(probe.textbbox((0, 0), "Ag", font=font)[3]) + 3
    texts = []
    for _, caption, correct in cells:
        mark = "" if correct is None else ("[ok] " if correct else "[x] ")
        texts.append((textwrap.wrap(mark + caption, wrap) or [""], correct))
    text_h = max(len(lines) for lines, _ in texts) * line_h + 6
    rows = (len(cells) + columns - 1) // columns
    pad = 4
    grid = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_w + text_h + pad) + pad), (32, 32, 32))
    draw = ImageDraw.Draw(grid)
    for k, ((image, _, _), (lines, correct)) in enumerate(zip(cells, texts)):
        x = pad + (k % columns) * (cell_w + pad)
        y = pad + (k // columns) * (cell_w + text_h + pad)
        tile = image.convert("RGB").resize((cell_w, cell_w), Image.Resampling.NEAREST)
        grid.paste(tile, (x, y))
        color = (230, 230, 230) if correct is None else ((90, 220, 90) if correct else (240, 90, 90))
        for li, line in enumerate(lines):
            draw.text((x + 2, y + cell_w + 3 + li * line_h), line, fill=color, font=font)
    return grid
