"""Stage ``autoencoder``: a SmallAutoencoder (small encoder + full decoder) for a small domain.

Loss: ``mse(decode(encode(x)), x) + perceptual_weight * perceptual(...)``. Latents are
deterministic (no KL term): the flow model only needs a fixed, smooth latent space, and its
scale is fixed at export instead: ``shift_factor = mean`` and ``scaling_factor = 1 / std`` of
the raw latents over ``stats_items`` training images, so diffusion latents
``(z - shift) * scale`` have zero mean and unit variance (SD3's convention).

The real recipe skips this stage and points the other stages at SD3's ``AutoencoderKL`` (a
local diffusers directory); see docs/training.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.data import IterableDataset

from snapgen.models.autoencoder import SmallAutoencoder

from ..data import build_dataset, build_eval_dataset, collate, fixed_batch
from ..ema import EMA
from ..logger import save_grid
from ..losses import build_perceptual, psnr
from .base import Batch, Stage, StageOptions


class AutoencoderOptions(StageOptions):
    # SmallAutoencoder keyword arguments (latent_channels, block_out_channels, ...).
    model: dict[str, Any] = Field(default_factory=dict)
    perceptual_weight: float = Field(0.0, ge=0)
    perceptual: str = "random"  # random | lpips (see training/losses.py)
    stats_items: int = Field(1024, gt=0)  # images for the latent mean/std at export
    eval_items: int = Field(8, gt=0)  # held-out images for the PSNR and reconstruction grid


class AutoencoderStage(Stage):
    name = "autoencoder"
    Options = AutoencoderOptions

    def __init__(self, config, options: AutoencoderOptions, device):
        super().__init__(config, options, device)
        try:
            self.model = SmallAutoencoder(**options.model).to(device)
        except TypeError as e:
            raise ValueError(f"stage_options.model: {e}") from None
        self.ema = EMA(self.model, config.ema) if config.ema else None
        self.perceptual = build_perceptual(options.perceptual).to(device) if options.perceptual_weight else None
        self._eval_batch = None

    def trainable_modules(self):
        return {"autoencoder": self.model}

    def state_modules(self):
        return {"ema": self.ema.module} if self.ema else {}

    def check_compatible(self) -> None:
        factor = self.model.config.downsample_factor
        for resolution in self.config.data.resolutions():
            if resolution % factor:
                raise ValueError(f"resolution {resolution} is not a multiple of the autoencoder's factor {factor}")

    def loss(self, name: str, batch: Batch, step: int):
        x = batch["pixels"]
        recon = self.model(x)
        mse = F.mse_loss(recon.float(), x.float())
        loss = mse
        metrics = {"loss_mse": mse.item()}
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, x)
            loss = loss + self.options.perceptual_weight * perceptual
            metrics["loss_perceptual"] = perceptual.item()
        metrics["loss"] = loss.item()
        metrics["psnr"] = psnr(recon.detach().clamp(-1, 1), x).item()
        return loss, metrics

    def on_step_end(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step)

    def _final_model(self) -> SmallAutoencoder:
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, step: int, out_dir: Path) -> dict[str, float]:
        if self._eval_batch is None:
            dataset = build_eval_dataset(self.config.data, self.resolution)
            self._eval_batch = fixed_batch(dataset, self.options.eval_items)
        model = self._final_model().eval()
        x = self._eval_batch["pixels"].to(self.device)
        recon = model(x)
        save_grid(torch.cat([x, recon]), out_dir / "samples" / f"step_{step:08d}.png", columns=len(x))
        return {"psnr": psnr(recon, x).item()}

    @torch.no_grad()
    def export(self, out_dir: Path) -> Path:
        model = self._final_model().eval()
        dataset = build_dataset(self.config.data, self.config.data.resolutions()[-1])
        latents = []
        if isinstance(dataset, IterableDataset):  # a stream: its first stats_items samples
            latents.append(model.encode(fixed_batch(dataset, self.options.stats_items)["pixels"].to(self.device)))
        else:
            n = min(self.options.stats_items, len(dataset))
            for start in range(0, n, 64):
                items = [dataset[i] for i in range(start, min(n, start + 64))]
                latents.append(model.encode(collate(items)["pixels"].to(self.device)))
        z = torch.cat(latents).float()
        mean, std = z.mean().item(), z.std().item()
        model.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
        path = out_dir / "autoencoder"
        model.save_pretrained(path, safe_serialization=True)
        return path
