"""``snapgen shapes render|judge`` and ``snapgen eval shapes``; heavy imports stay inside the commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METADATA = "metadata.jsonl"
INFO = "info.json"


def _int(name: str, minimum: int):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {value}")
        return value

    return parse


def add_commands(subparsers) -> None:
    shapes = subparsers.add_parser("shapes", help="ShapesBench: render the synthetic dataset, judge a picture")
    sub = shapes.add_subparsers(dest="shapes_command", required=True)

    p = sub.add_parser("render", help="write N pictures + captions + metadata.jsonl")
    p.add_argument("--n", type=_int("--n", 1), required=True, help="number of pictures")
    p.add_argument("--seed", type=_int("--seed", 0), default=0, help="picture i is drawn from (seed, i)")
    p.add_argument("--out", type=Path, required=True, help="output directory (must be new or empty)")
    p.add_argument("--split", default="train", help="train (no held-out compositions) or heldout")
    p.add_argument(
        "--categories",
        default=None,
        help="category weights, e.g. single=1,two=2,count=1,position=2 (default: equal)",
    )
    p.add_argument("--force", action="store_true", help="replace an earlier render in --out")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("judge", help="judge one picture against a ShapesBench prompt")
    p.add_argument("image", type=Path)
    p.add_argument("prompt")
    p.add_argument("--json", action="store_true", help="print the detections and verdict as JSON")
    p.set_defaults(func=cmd_judge)

    evaluate = subparsers.add_parser("eval", help="benchmarks of a model")
    sub = evaluate.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("shapes", help="ShapesBench: generate the fixed prompt list and judge it")
    p.add_argument("--model", type=Path, required=True, help="model directory")
    p.add_argument("--steps", type=_int("--steps", 1), required=True, help="sampling steps")
    p.add_argument("--n", type=_int("--n", 4), default=600, help="prompts in the main block (default 600)")
    p.add_argument("--n-held-out", type=_int("--n-held-out", 0), default=None, help="held-out prompts (default n/4)")
    p.add_argument("--seed", type=_int("--seed", 0), default=0, help="prompt list seed; image i uses noise seed+i")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--batch-size", type=_int("--batch-size", 1), default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grid", type=_int("--grid", 0), default=16, help="images in the sample grid (0: none)")
    p.add_argument("--out", type=Path, required=True, help="report path (.json); the grid goes next to it")
    p.set_defaults(func=cmd_eval_shapes)


def _cli_error():
    from snapgen.cli import CLIError

    return CLIError


def _parse_categories(text: str | None) -> dict[str, float] | None:
    CLIError = _cli_error()
    if text is None:
        return None
    from .render import category_weights

    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise CLIError(f"--categories {text!r}: write NAME=WEIGHT pairs, e.g. single=1,two=2") from None
    try:
        category_weights(weights)
    except ValueError as e:
        raise CLIError(f"--categories {text!r}: {e}") from None
    return weights


def cmd_render(args) -> None:
    from tqdm import tqdm

    from .render import SPLITS, render_scene, scene_at

    CLIError = _cli_error()
    if args.split not in SPLITS:
        raise CLIError(f"--split {args.split!r}: choose one of {', '.join(SPLITS)}")
    categories = _parse_categories(args.categories)
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.force:
            raise CLIError(f"--out {out}: directory is not empty; pass --force to replace an earlier render")
        if not (out / METADATA).is_file():
            raise CLIError(
                f"--out {out}: not empty and not a ShapesBench render (no {METADATA}); refusing to delete it"
            )

    from snapgen.model_dir import write_atomically

    def fill(tmp: Path) -> None:
        with open(tmp / METADATA, "w") as meta, tqdm(total=args.n, unit="img", desc="rendering", disable=None) as bar:
            for i in range(args.n):
                scene = scene_at(args.seed, i, args.split, categories)
                name = f"{i:06d}"
                render_scene(scene).save(tmp / f"{name}.png", format="PNG")
                (tmp / f"{name}.txt").write_text(scene.caption + "\n")
                meta.write(json.dumps({"index": i, "image": f"{name}.png", **scene.to_dict()}) + "\n")
                bar.update(1)
        info = {"benchmark": "shapesbench", "n": args.n, "seed": args.seed, "split": args.split}
        info["categories"] = categories
        from .spec import SPEC_VERSION

        info["spec_version"] = SPEC_VERSION
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")

    # Everything goes into a temporary sibling directory that replaces --out only when complete.
    write_atomically(out, fill)
    print(f"wrote {args.n} picture(s) with captions and {METADATA} to {out}")


def cmd_judge(args) -> None:
    from PIL import Image, UnidentifiedImageError

    from .judging import judge

    CLIError = _cli_error()
    if not args.image.is_file():
        raise CLIError(f"{args.image}: no such file")
    try:
        image = Image.open(args.image)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"{args.image}: not a readable image ({e})") from None
    try:
        result = judge(image, args.prompt)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.json:
        verdict = {"correct": result.correct, "exact": result.exact, "category": result.category}
        print(json.dumps({**verdict, **result.details}, indent=2))
    else:
        verdict = "correct" if result.correct else f"wrong ({result.details.get('reason', '')})"
        if result.extras:
            verdict += f"; not exact: also {', '.join(result.extras)}"
        print(f"{result.category}: {verdict}")
        for d in result.details["detections"]:
            print(f"  {d['color']} {d['shape']} at {d['center']} (area {d['area']}, iou {d['iou']})")


def cmd_eval_shapes(args) -> None:
    import math

    CLIError = _cli_error()
    out: Path = args.out
    if out.suffix.lower() != ".json":
        raise CLIError(f"--out {out}: the report is JSON; give a path ending in .json")
    if out.is_dir():
        raise CLIError(f"--out {out}: is a directory; give a .json file path")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise CLIError(f"--guidance {args.guidance}: must be a number >= 0")
    if not args.model.is_dir():
        raise CLIError(f"--model {args.model}: no such directory")

    from snapgen.model_dir import ModelDirectoryError, load_pipeline, write_file_atomically
    from snapgen.pipeline import InvalidRequestError

    from .evaluation import evaluate, sample_grid

    try:
        if (args.model / "teacher.json").is_file():  # a teacher stage's product
            from ..teacher import load_teacher_pipeline

            pipeline = load_teacher_pipeline(args.model, device=args.device)
        else:
            # Traced U-Net: the same images bit for bit (tests/test_tracing.py), so the same scores,
            # in about half the time.
            pipeline = load_pipeline(args.model, device=args.device).enable_unet_tracing()
    except (ModelDirectoryError, FileNotFoundError, ValueError) as e:
        raise CLIError(f"--model {args.model}: {e}") from None

    cells = []
    held_cells = args.grid // 4 if args.n_held_out != 0 else 0
    quota = {False: args.grid - held_cells, True: held_cells}

    def keep(i, record, image):
        # The grid: the first images of the main block, then the first of the held-out block.
        position = i - args.n if record["held_out"] else i
        if position < quota[record["held_out"]]:
            caption = ("held-out: " if record["held_out"] else "") + record["prompt"]
            cells.append((image.copy(), caption, record["correct"]))

    try:
        report = evaluate(
            pipeline,
            n=args.n,
            steps=args.steps,
            seed=args.seed,
            guidance_scale=args.guidance,
            batch_size=args.batch_size,
            n_held_out=args.n_held_out,
            on_image=keep if args.grid else None,
        )
    except InvalidRequestError as e:
        flag = {"guidance_scale": "--guidance", "seed": "--seed", "steps": "--steps"}.get(e.field, e.field)
        raise CLIError(f"{flag}: {e.message}") from None
    except ValueError as e:
        raise CLIError(str(e)) from None

    grid_path = out.with_name(out.stem + ".grid.png")
    if cells:
        report["grid"] = grid_path.name
    text = json.dumps(report, indent=2) + "\n"
    if cells:
        grid = sample_grid(cells)
        write_file_atomically(grid_path, lambda f: grid.save(f, format="PNG"))
    write_file_atomically(out, lambda f: f.write(text.encode()))

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    parts = ", ".join(f"{c} {pct(a)}" for c, a in report["accuracy"].items())
    print(f"ShapesBench overall {pct(report['overall'])} ({parts}); held-out {pct(report['held_out']['overall'])}")
    parts = ", ".join(f"{c} {pct(a)}" for c, a in report["exact"].items())
    held = report["held_out"]
    print(f"exact objects {pct(report['exact_overall'])} ({parts}); held-out {pct(held['exact_overall'])}; "
          f"images with extra objects {pct(report['extra_rate_overall'])}")
    compositions = report["held_out"]["compositions"]
    if any(c["total"] for c in compositions.values()):
        counts = ", ".join(f"{name} {c['correct']}/{c['total']}" for name, c in compositions.items())
        print(f"held-out compositions: {counts}")
    rel = report["relations"]
    if rel["position_prompts"]:
        print(f"position: each object drawn once in {rel['pairs']} of {rel['position_prompts']}; of those, "
              f"{rel['asked']} in the asked relation, {rel['opposite']} in its opposite")
    print(f"wrote {out}" + (f" and {grid_path}" if cells else ""))
