"""The contract between the training loop and a stage of the recipe.

The loop (``training/loop.py``) owns everything common: seeding, the data loader, data
parallelism (gradients averaged over processes, see ``training/distributed.py``), optimizers
(AdamW, one per entry of ``trainable_modules``), LR warm-up, gradient clipping, mixed precision,
gradient checkpointing, checkpoints and resume, logging (TensorBoard + CSV) and progress bars.
A stage only says which modules train and what their losses are.

Per training step the loop does, for each ``name`` in ``trainable_modules()`` (in order):
    loss, metrics = stage.loss(name, batch, step)       # under autocast when precision != fp32
    zero that optimizer's grads; backward; average grads over processes; clip; step
then ``stage.on_step_end(step)`` (EMA updates, caches cleared). ``step`` is the number of
steps completed before this one (0 for the first). A GAN stage returns e.g.
``{"generator": g, "discriminator": d}`` and caches the generator output between the two
calls of one step.

While ``loss(name, ...)`` runs, only ``name``'s parameters require grad (the others' are
switched off and back on), so a generator loss can run through the discriminator without
filling the discriminator's gradients, and gradients still flow through it to the generator.
A loss that does not require grad (e.g. a GAN term before it is switched on) skips that
optimizer for this step. Stages call their modules directly: there is no DDP wrapper.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

Batch = dict[str, Any]
"""``pixels``: (B, 3, H, W) float in [-1, 1]; ``captions``: list[str]; ``labels``: (B,) long, optional;
``indices``: (B,) long dataset indices (map-style data). A stage whose ``prepare_dataset`` swaps
in cached latents gets ``latents`` (and e.g. ``text_ids``) instead of ``pixels``."""


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
        self.resolution = config.data.resolution_at(0)  # the current training resolution (pixels)

    @abstractmethod
    def trainable_modules(self) -> dict[str, nn.Module]:
        """Optimizer name -> module whose parameters it updates (the loop averages their gradients over processes)."""

    @abstractmethod
    def loss(self, name: str, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The scalar loss for optimizer ``name`` and the numbers to log."""

    def state_modules(self) -> dict[str, nn.Module]:
        """Modules saved in checkpoints (safetensors) besides the trainable ones, e.g. EMA copies."""
        return {}

    def optimizer_options(self, name: str) -> dict[str, Any]:
        """Overrides of the config's ``optim`` fields for optimizer ``name`` (e.g. a discriminator's lr)."""
        return {}

    def prepare_dataset(self, dataset, resolution: int):
        """Called before training and whenever the resolution changes (progressive resolution);
        returns the dataset to train on, e.g. precomputed latents of a small fixed dataset."""
        self.resolution = resolution
        return dataset

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
