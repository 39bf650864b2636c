"""The ShapesBench tables of docs/results.md from the reports of ``shapes_eval.sh``.

    .venv/bin/python training/recipes/shapes_table.py runs/shapes/eval
    .venv/bin/python training/recipes/shapes_table.py runs/shapes/eval recipe   # one group of runs

Without a group: two tables, the recipe's products (and the earlier runs they replaced), then the
trials: runs outside the recipe, each one change against a recipe run at equal steps or compute.
With one (a key of docs/results-runs.json): its table, then its exact-objects table per category.
Which runs, and what each one is, are listed in docs/results-runs.json (their history belongs with
the results).
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


def pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def table(folder: Path, rows: list[tuple[str, str, str]]) -> str:
    """One row per report found: the GenEval-style score per category and overall, the held-out
    score, then the strict exact-objects score (overall and held-out) and the share of pictures
    with extra objects (reports written before the strict rule existed show n/a there)."""
    lines = [
        "| model | decoder | steps | guidance | " + " | ".join(CATEGORIES)
        + " | **overall** | held-out | exact objects | exact, held-out | with extra objects"
        + " | eval s/image (batch 50, 1 thread, shared CPU) |",
        "|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, label, decoder in rows:
        path = folder / f"{name}.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        cells = [pct(r["accuracy"][c]) for c in CATEGORIES]
        per_image = r["seconds"] / (r["n"] + r["n_held_out"])
        held = r["held_out"]
        strict = [pct(r.get("exact_overall")), pct(held.get("exact_overall")), pct(r.get("extra_rate_overall"))]
        lines.append(
            f"| {label} | {decoder} | {r['steps']} | {r['guidance_scale']:g} | " + " | ".join(cells)
            + f" | **{pct(r['overall'])}** | {pct(r['held_out']['overall'])} | " + " | ".join(strict)
            + f" | {per_image:.3f} |"
        )  # fmt: skip
    return "\n".join(lines)


def exact_table(folder: Path, rows: list[tuple[str, str, str]]) -> str:
    """Per category, GenEval-style against exact objects (and the share with extra objects)."""
    lines = [
        "| model | steps | " + " | ".join(f"{c}: GenEval / exact / extras" for c in CATEGORIES) + " |",
        "|---|---|" + "---|" * len(CATEGORIES),
    ]
    for name, label, _ in rows:
        path = folder / f"{name}.json"
        if not path.is_file() or "exact" not in json.loads(path.read_text()):
            continue
        r = json.loads(path.read_text())
        cells = [f"{pct(r['accuracy'][c])} / {pct(r['exact'][c])} / {pct(r['extra_rate'][c])}" for c in CATEGORIES]
        lines.append(f"| {label} | {r['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/shapes/eval")
    kind = sys.argv[2] if len(sys.argv) > 2 else None
    if kind:  # one group: its table, then its per-category exact-objects table
        print(table(folder, runs(kind)), "", exact_table(folder, runs(kind)), sep="\n")
    else:
        print(table(folder, runs("rows")), "", "Trials:", "", table(folder, runs("trials")), sep="\n")
