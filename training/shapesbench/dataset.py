"""``ShapesDataset``: ShapesBench as a map-style torch Dataset (item i is a pure function of (seed, i))."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .render import SPLITS, Scene, category_weights, render_scene, scene_at


def to_tensor(image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


class ShapesDataset(Dataset):
    """``length`` ShapesBench pictures; item i: ``{"pixels": (3, 128, 128) in [-1, 1], "caption", "category"}``.

    Deterministic: item i depends only on (seed, i), not on workers or access order.
    ``categories`` weights the mix, e.g. ``{"single": 1, "two": 2, "count": 1, "position": 2}``."""

    def __init__(self, length: int, seed: int, split: str = "train", categories: dict[str, float] | None = None):
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        category_weights(categories)  # validate now, not in a worker
        self.length, self.seed, self.split = int(length), int(seed), split
        self.categories = dict(categories) if categories is not None else None

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        return scene_at(self.seed, index % self.length, self.split, self.categories)

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {"pixels": to_tensor(render_scene(scene)), "caption": scene.caption, "category": scene.category}
