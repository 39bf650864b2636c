"""The ShapesBench table of docs/results.md from the reports of ``shapes_eval.sh``.

    .venv/bin/python training/recipes/shapes_table.py runs/shapes/eval
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [  # report name, what it is
    ("teacher", "teacher (SD3 MMDiT)"),
    ("pretrain", "student, no KD"),
    ("pretrain4", "student, no KD (not step-distilled)"),
    ("kd", "student, multi-level KD"),
    ("ladd4", "LADD student (default)"),
    ("ladd8", "LADD student"),
]
CATEGORIES = ("single", "two", "count", "position")


def table(folder: Path) -> str:
    lines = [
        "| model | steps | guidance | " + " | ".join(CATEGORIES)
        + " | **overall** | held-out | eval s/image (batch 50, 1 thread, shared CPU) |",
        "|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|",
    ]
    for name, label in ROWS:
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        cells = [f"{100 * r['accuracy'][c]:.1f}" for c in CATEGORIES]
        per_image = r["seconds"] / (r["n"] + r["n_held_out"])
        lines.append(
            f"| {label} | {r['steps']} | {r['guidance_scale']:g} | " + " | ".join(cells)
            + f" | **{100 * r['overall']:.1f}** | {100 * r['held_out']['overall']:.1f} | {per_image:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/shapes/eval")))
