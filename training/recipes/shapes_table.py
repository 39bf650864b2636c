"""The ShapesBench table of docs/results.md from the reports of ``shapes_eval.sh``.

    .venv/bin/python training/recipes/shapes_table.py runs/shapes/eval
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [  # report name, what it is, the decoder its pictures came from
    ("teacher", "teacher (SD3 MMDiT)", "full"),
    ("pretrain", "student, no KD", "tiny v1"),
    ("pretrain-fulldec", "student, no KD", "full"),
    ("pretrain4", "student, no KD (not step-distilled)", "tiny v1"),
    ("pretrain4-fulldec", "student, no KD (not step-distilled)", "full"),
    ("pretrain4-dec2", "student, no KD (not step-distilled)", "tiny v2"),
    ("pretrain-dec2", "student, no KD", "tiny v2"),
    ("kd", "student, multi-level KD", "tiny v1"),
    ("ladd4", "LADD student", "tiny v1"),
    ("ladd8", "LADD student", "tiny v1"),
    ("ladd4-dec2", "**LADD student: the default**", "tiny v2"),
    ("ladd8-dec2", "LADD student", "tiny v2"),
]
CATEGORIES = ("single", "two", "count", "position")


def table(folder: Path) -> str:
    lines = [
        "| model | decoder | steps | guidance | " + " | ".join(CATEGORIES)
        + " | **overall** | held-out | eval s/image (batch 50, 1 thread, shared CPU) |",
        "|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|",
    ]
    for name, label, decoder in ROWS:
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        cells = [f"{100 * r['accuracy'][c]:.1f}" for c in CATEGORIES]
        per_image = r["seconds"] / (r["n"] + r["n_held_out"])
        lines.append(
            f"| {label} | {decoder} | {r['steps']} | {r['guidance_scale']:g} | " + " | ".join(cells)
            + f" | **{100 * r['overall']:.1f}** | {100 * r['held_out']['overall']:.1f} | {per_image:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/shapes/eval")))
