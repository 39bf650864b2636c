"""The contract between the training loop and a stage of the recipe.

The loop (``training/loop.py``) owns everything common: seeding, the data loader, DDP wrapping,
optimizers (AdamW, one per entry of ``trainable_modules``), LR warm-up, gradient clipping, mixed
precision, checkpoints and resume, logging (TensorBoard + CSV) and progress bars. A stage only
says which modules train and what their losses are.

Per training step the loop does, for each ``name`` in ``trainable_modules()`` (in order):
    loss, metrics = stage.loss(name, batch, step)
    zero that optimizer's grads; backward; clip; step
then ``stage.on_step_end(step)`` (EMA updates, caches cleared). A GAN stage returns e.g.
``{"generator": g, "discriminator": d}`` and caches the generator output between the two
calls of one step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

Batch = dict[str, Any]
"""``pixels``: (B, 3, H, W) float in [-1, 1]; ``captions``: list[str]; ``labels``: (B,) long, optional."""


class StageOptions(BaseModel):
    """Base for each stage's own options (the ``stage_options:`` block of a YAML config)."""

    model_config = ConfigDict(extra="forbid")


class Stage(ABC):
    """One stage of the recipe. Subclasses set ``name`` and ``Options`` and register in ``stages/__init__.py``."""

    name: ClassVar[str]
    Options: ClassVar[type[StageOptions]]

    def __init__(self, config, options: StageOptions, device: torch.device):
        self.config = config  # the whole TrainConfig (seed, batch size, data, ...)
        self.options = options
        self.device = device

    @abstractmethod
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Optimizer name -> module whose parameters it updates (the loop wraps these in DDP)."""

    @abstractmethod
    def loss(self, name: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss for optimizer ``name`` and the numbers to log."""

    def state_modules(self) -> dict[str, nn.Module]:
        """Modules saved in checkpoints (safetensors) besides the trainable ones, e.g. EMA copies."""
        return {}

    def on_step_end(self, step: int) -> None:
        """Called once after all optimizers stepped (EMA update, cache clearing)."""

    def check_compatible(self) -> None:
        """Raise ValueError before training if the parts don't fit (e.g. teacher vs student latents)."""

    @torch.no_grad()
    def evaluate(self, step: int, out_dir: Path) -> dict[str, float]:
        """Optional periodic evaluation (sample grid, PSNR); returns numbers to log."""
        return {}

    @abstractmethod
    def export(self, out_dir: Path) -> Path:
        """Write the stage's product (a model directory or component) and return its path."""
