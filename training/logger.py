"""Run logs: ``metrics.csv`` (long format), TensorBoard, the loss-curve PNG and image grids.

``metrics.csv`` has one row per number, ``step,metric,value``, so metrics that appear only at
some steps (evaluations) need no empty columns and a resumed run appends to the same file.
On resume, rows after the checkpoint's step are dropped first (those steps are trained again),
and TensorBoard purges them the same way, so the curves continue without a fork.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw

METRICS = "metrics.csv"
LOSS_CURVE = "loss.png"


class RunLogger:
    def __init__(self, out_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            self._write_header([r for r in rows if int(r[0]) <= resume_step])
        elif resume_step is None or not self.path.is_file():
            self._write_header([])
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 (open for the run's lifetime)
        self.csv = csv.writer(self.file)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events at and after it: keep the checkpoint step's own rows.
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge)

    def _write_header(self, rows: list[list[str]]) -> None:
        with open(self.path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "metric", "value"])
            writer.writerows(rows)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.csv.writerow([step, name, f"{value:.6g}"])
            if self.tb is not None:
                self.tb.add_scalar(name, value, step)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            series[row["metric"]].append((int(row["step"]), float(row["value"])))
    return dict(series)


def plot_losses(csv_path: Path, png_path: Path) -> Path | None:
    """Plot every ``loss*`` series against the step; None when there is nothing to plot.

    matplotlib is used when installed; otherwise (as on the project's CPU machines) a plain PIL
    line chart with the same content is drawn, so every run still gets its curve.
    """
    series = {k: v for k, v in read_metrics(csv_path).items() if k.startswith("loss") and len(v) > 1}
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_with_pil(series, png_path)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in sorted(series.items()):
        ax.plot([s for s, _ in points], [v for _, v in points], label=name)
    ax.set_xlabel("step")
    ax.set_yscale("log" if all(v > 0 for p in series.values() for _, v in p) else "linear")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def _plot_with_pil(series: dict[str, list[tuple[int, float]]], png_path: Path) -> Path:
    width, height, margin = 800, 450, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [s for p in series.values() for s, _ in p]
    values = [v for p in series.values() for _, v in p if math.isfinite(v)]
    log = all(v > 0 for v in values)
    tf = math.log10 if log else (lambda v: v)
    x0, x1 = min(steps), max(steps) or 1
    y0, y1 = tf(min(values)), tf(max(values))
    if y1 == y0:
        y1 = y0 + 1.0

    def xy(step: int, value: float) -> tuple[float, float]:
        x = margin + (step - x0) / max(x1 - x0, 1) * (width - 2 * margin)
        y = height - margin - (tf(value) - y0) / (y1 - y0) * (height - 2 * margin)
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.text((margin, height - margin + 8), str(x0), fill="black")
    draw.text((width - margin - 40, height - margin + 8), f"step {x1}", fill="black")
    draw.text((4, margin - 4), f"{max(values):.4g}", fill="black")
    draw.text((4, height - margin - 8), f"{min(values):.4g}" + (" (log)" if log else ""), fill="black")
    for i, (name, points) in enumerate(sorted(series.items())):
        color = _COLORS[i % len(_COLORS)]
        draw.line([xy(s, v) for s, v in points if math.isfinite(v)], fill=color, width=2)
        draw.text((width - margin - 150, margin + 6 + 14 * i), name, fill=color)
    image.save(png_path)
    return png_path


def save_grid(images: torch.Tensor, path: Path, columns: int | None = None) -> Path:
    """(N, 3, H, W) images in [-1, 1] -> one PNG grid."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, _, h, w = images.shape
    columns = columns or min(n, 8)
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * w, rows * h))
    for i in range(n):
        tile = Image.fromarray(images[i].permute(1, 2, 0).numpy())
        grid.paste(tile, ((i % columns) * w, (i // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
