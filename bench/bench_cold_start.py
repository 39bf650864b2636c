"""Cold start of the ``snapgen`` command: every run is a new process, as a user types it.

Per run, for each tree: ``snapgen --help``, a rejected argument (``generate ... --steps 0``), and
``snapgen generate "a red circle" --out x.png`` of the embedded default model (with ``--timings`` where
the tree has it: checks / imports / load / text / U-Net / decode / write, in-process), then the same
generate under ``python -X importtime``, summed by package (each module's own import time). Wall times
are from the parent (fork/exec and interpreter exit included); medians of ``--runs`` runs.

``--base DIR`` also times another checkout (``git worktree add /tmp/cold-base HEAD``), run with
``PYTHONPATH=DIR`` and alternated with this tree run by run, so both see the same machine load.

Usage::

    .venv/bin/python bench/bench_cold_start.py --runs 7
    .venv/bin/python bench/bench_cold_start.py --runs 7 --base /tmp/cold-base --out docs/benchmarks.md

Raw numbers go to ``bench/results/cold_start.json``; ``--out FILE`` replaces (or appends) the section
between ``<!-- bench_cold_start:start -->`` and ``<!-- bench_cold_start:end -->``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name, publish, write_json

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "bench" / "results" / "cold_start.json"
START, END = "<!-- bench_cold_start:start -->", "<!-- bench_cold_start:end -->"
PROMPT = "a red circle"
PACKAGES = ("torch", "diffusers", "transformers", "snapgen", "scipy", "sympy", "numpy", "PIL")
STAGES = ("checks", "imports", "load", "text", "unet", "decode", "write", "total")


def _env(tree: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPGEN_")}
    env.pop("PYTHONPATH", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def _run(python: str, args: list[str], tree: Path | None, cwd: Path, importtime: bool = False):
    entry = "import sys; from snapgen.cli import main; sys.argv[0] = 'snapgen'; sys.exit(main())"
    command = [python, *(["-X", "importtime"] if importtime else []), "-c", entry, *args]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=_env(tree), timeout=600)
    return time.perf_counter() - start, result


def _import_seconds(stderr: str) -> dict[str, float]:
    """``-X importtime`` output -> seconds of each package's own import time (and the total)."""
    by_package: dict[str, float] = {}
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s+(\S+)", line)
        if match:
            top = match.group(2).partition(".")[0]
            key = top if top in PACKAGES else "other"
            by_package[key] = by_package.get(key, 0.0) + int(match.group(1)) / 1e6
    by_package["total"] = sum(by_package.values())
    return by_package


def _timings(stderr: str) -> dict[str, float]:
    line = next((x for x in stderr.splitlines() if x.startswith("timings: ")), "")
    return {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", line)}


def measure_once(python: str, tree: Path | None, work: Path, with_timings: bool) -> dict:
    out: dict = {}
    out["help_s"], result = _run(python, ["--help"], tree, work)
    assert result.returncode == 0, result.stderr
    out["reject_s"], result = _run(python, ["generate", PROMPT, "--steps", "0", "--out", "r.png"], tree, work)
    assert result.returncode == 2 and "--steps" in result.stderr, result.stderr
    args = ["generate", PROMPT, "--out", "x.png"]
    out["generate_s"], result = _run(python, args + (["--timings"] if with_timings else []), tree, work)
    assert result.returncode == 0, result.stderr
    out["stages"] = _timings(result.stderr)
    _, result = _run(python, args, tree, work, importtime=True)
    assert result.returncode == 0, result.stderr
    out["imports"] = _import_seconds(result.stderr)
    return out


def _median(runs: list[dict], *path: str) -> float | None:
    values = []
    for run in runs:
        value = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def section(results: dict) -> str:
    meta = results["meta"]
    lines = [
        START,
        "## Cold start of the `snapgen` command (bench/bench_cold_start.py)",
        "",
        f"Run {meta['date']} on {meta['cpu']} ({meta['cpus']} CPUs; load average before / after: "
        f"{meta['load_before']} / {meta['load_after']}), Python {meta['python']}; {meta['runs']} runs per tree"
        f"{', alternated with the base' if 'base' in results['trees'] else ''}, medians. Command: "
        f"`{meta['command']}`.",
        "",
        "| tree | `snapgen --help` s | rejected argument s | `generate` s (min-max) | imports s (importtime) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in results["trees"].items():
        gen = [r["generate_s"] for r in runs]
        imports = _fmt(_median(runs, "imports", "total"))
        lines.append(
            f"| {name} | {_fmt(_median(runs, 'help_s'))} | {_fmt(_median(runs, 'reject_s'))} | "
            f"{_fmt(statistics.median(gen))} ({min(gen):.2f}-{max(gen):.2f}) | {imports} |"
        )
    lines += ["", "Import time by package (each module's own time under `-X importtime`, which adds some), s:", ""]
    keys = [*PACKAGES, "other"]
    lines += ["| tree | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name, runs in results["trees"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(_median(runs, "imports", k)) for k in keys) + " |")
    staged = {name: runs for name, runs in results["trees"].items() if any(r["stages"] for r in runs)}
    if staged:
        lines += ["", "`generate --timings` (in-process; startup + exit = wall - total), s:", ""]
        lines += ["| tree | " + " | ".join(STAGES) + " | startup + exit |", "|---|" + "---:|" * (len(STAGES) + 1)]
        for name, runs in staged.items():
            outside = statistics.median(r["generate_s"] - r["stages"].get("total", 0.0) for r in runs)
            lines.append(
                f"| {name} | " + " | ".join(_fmt(_median(runs, "stages", k)) for k in STAGES) + f" | {outside:.2f} |"
            )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--base", type=Path, help="another checkout to compare with (run with PYTHONPATH at it)")
    parser.add_argument("--base-label", default="base")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--out", type=Path, help="markdown file to put the results section into")
    args = parser.parse_args()

    trees: dict[str, Path | None] = {}
    if args.base is not None:
        trees[args.base_label] = args.base.resolve()
    trees["this tree"] = None
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    # Run outside the repository: the working directory comes first on sys.path and would shadow --base.
    with tempfile.TemporaryDirectory(prefix="cold-start-") as work:
        with_timings = {}
        for name, tree in trees.items():
            _, result = _run(args.python, ["generate", "--help"], tree, Path(work))
            with_timings[name] = "--timings" in result.stdout
        for i in range(args.runs):
            for name, tree in trees.items():
                runs[name].append(measure_once(args.python, tree, Path(work), with_timings[name]))
                print(f"run {i + 1}/{args.runs} {name}: generate {runs[name][-1]['generate_s']:.2f} s", file=sys.stderr)
    results = {
        "meta": {
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cpu": cpu_name(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "runs": args.runs,
            "command": shlex.join(["python", "bench/bench_cold_start.py", *sys.argv[1:]]),
        },
        "trees": runs,
    }
    write_json(args.json, results)
    publish(section(results), args.out, START, END)


if __name__ == "__main__":
    main()
