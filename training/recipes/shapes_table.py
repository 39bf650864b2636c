"""The ShapesBench tables of docs/results.md from the reports of ``shapes_eval.sh``.

    .venv/bin/python training/recipes/shapes_table.py runs/shapes/eval

Two tables: the recipe's products (and the earlier runs they replaced), then the trials: runs
outside the recipe, each one change against a recipe run at equal steps or compute. Which runs, and
what each one is, are listed in docs/results-runs.json (their history belongs with the results).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = Path(__file__).resolve().parents[2] / "docs" / "results-runs.json"
CATEGORIES = ("single", "two", "count", "position")


def runs(kind: str) -> list[tuple[str, str, str]]:
    """(report, label, decoder) of each run of ``kind`` ("rows" or "trials") in docs/results-runs.json."""
    entries = json.loads(RUNS.read_text())[kind]
    return [(e["report"], e["label"], e["decoder"]) for e in entries if "report" in e]


def table(folder: Path, rows: list[tuple[str, str, str]]) -> str:
    lines = [
        "| model | decoder | steps | guidance | " + " | ".join(CATEGORIES)
        + " | **overall** | held-out | eval s/image (batch 50, 1 thread, shared CPU) |",
        "|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|",
    ]
    for name, label, decoder in rows:
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
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/shapes/eval")
    print(table(folder, runs("rows")), "", "Trials:", "", table(folder, runs("trials")), sep="\n")
