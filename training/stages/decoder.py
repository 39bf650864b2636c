"""Stage ``decoder``: SnapGen's tiny decoder, trained against a frozen encoder.

For images ``x`` and raw latents ``z = E(x)`` of the frozen encoder, the tiny decoder ``D``
minimises (the paper: MSE + LPIPS + adversarial, on 256 px patches)

    mse_weight * |D(z) - x|^2 + perceptual_weight * P(D(z), x) + adversarial_weight * hinge_G(C(crop(D(z))))

and a PatchGAN discriminator ``C`` minimises ``hinge_D(C(crop(x)), C(crop(D(z))))`` on the same
random ``crop_size`` window of real and decoded images. ``P`` is LPIPS when its package and
weights are installed, otherwise the fixed random-feature distance of ``training/losses.py``
(LPIPS weights are not available offline here). The adversarial terms start at
``adversarial_start`` steps, once the reconstruction is roughly right (a GAN on a blank
decoder mostly learns to fool an equally blank critic).

Reported: PSNR of the tiny decoder against the images and against the frozen full decoder,
and of the full decoder against the images, on held-out images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from snapgen.model_dir import latent_factor
from snapgen.models.autoencoder import load_decoder, load_encoder
from snapgen.models.tiny_decoder import TinyDecoder

from ..data import build_eval_dataset, fixed_batch
from ..ema import EMA
from ..inputs import check_model_dir
from ..logger import save_grid
from ..losses import build_perceptual, hinge_d_loss, hinge_g_loss, psnr
from .base import Batch, Stage, StageOptions


class DecoderOptions(StageOptions):
    encoder: str  # frozen autoencoder directory (SmallAutoencoder, or SD3's AutoencoderKL)
    full_decoder: str | None = None  # reference decoder for PSNR; default: the encoder's own
    # compact: TinyDecoder.for_latents (small domains); paper: TinyDecoder's 1.4 M default layout.
    layout: Literal["compact", "paper"] = "compact"
    model: dict[str, Any] = Field(default_factory=dict)  # TinyDecoder keyword overrides
    mse_weight: float = Field(1.0, ge=0)
    perceptual_weight: float = Field(0.1, ge=0)
    perceptual: str = "random"  # random | lpips
    adversarial_weight: float = Field(0.05, ge=0)
    adversarial_start: int = Field(0, ge=0)
    crop_size: int = Field(64, gt=0)  # pixels; the paper uses 256 px patches at 1024 px
    disc_channels: int = Field(32, gt=0)
    disc_layers: int = Field(3, gt=0)
    disc_lr: float | None = Field(None, gt=0)  # default: optim.lr
    eval_items: int = Field(8, gt=0)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): strided 4x4 convs, one logit per overlapping patch.

    GroupNorm instead of BatchNorm: the statistics then don't depend on the (per-process) batch.
    """

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for _ in range(1, layers):
            blocks += [nn.Conv2d(width, width * 2, 4, 2, 1), nn.GroupNorm(math.gcd(32, width * 2), width * 2),
                       nn.LeakyReLU(0.2)]
            width *= 2
        blocks.append(nn.Conv2d(width, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def random_crop_pair(a: torch.Tensor, b: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random window (one per batch) of two image batches."""
    h, w = a.shape[-2:]
    size = min(size, h, w)
    top = int(torch.randint(0, h - size + 1, (1,)))
    left = int(torch.randint(0, w - size + 1, (1,)))
    return a[..., top : top + size, left : left + size], b[..., top : top + size, left : left + size]


class DecoderStage(Stage):
    name = "decoder"
    Options = DecoderOptions

    def __init__(self, config, options: DecoderOptions, device):
        super().__init__(config, options, device)
        self.encoder = load_encoder(check_model_dir(options.encoder, "encoder")).to(device)
        enc_cfg = self.encoder.model.config
        self.latent_channels = int(enc_cfg.latent_channels)
        self.factor = latent_factor(self.encoder.model)
        # The tiny decoder takes the same raw latents as the full one and stores the encoder's
        # latent normalisation, so a pipeline can swap one decoder for the other.
        kwargs = {"scaling_factor": self.encoder.scaling_factor, "shift_factor": self.encoder.shift_factor,
                  **options.model}
        try:
            if options.layout == "compact":
                self.decoder = TinyDecoder.for_latents(self.latent_channels, self.factor, **kwargs)
            else:
                self.decoder = TinyDecoder(latent_channels=self.latent_channels, upsample_factor=self.factor, **kwargs)
        except TypeError as e:
            raise ValueError(f"stage_options.model: {e}") from None
        self.decoder.to(device)
        self.discriminator = PatchDiscriminator(options.disc_channels, options.disc_layers).to(device)
        self.ema = EMA(self.decoder, config.ema) if config.ema else None
        self.perceptual = build_perceptual(options.perceptual).to(device) if options.perceptual_weight else None
        full = options.full_decoder or options.encoder
        self.full_decoder_path = check_model_dir(full, "full_decoder")
        self._full_decoder = None
        self._crops = None  # (real, fake) crops of this step, for the discriminator's turn
        self._eval_batch = None

    def trainable_modules(self):
        return {"decoder": self.decoder, "discriminator": self.discriminator}

    def state_modules(self):
        return {"ema": self.ema.module} if self.ema else {}

    def optimizer_options(self, name: str) -> dict[str, Any]:
        if name == "discriminator" and self.options.disc_lr:
            return {"lr": self.options.disc_lr}
        return {}

    def check_compatible(self) -> None:
        for resolution in self.config.data.resolutions():
            if resolution % self.factor:
                raise ValueError(f"resolution {resolution} is not a multiple of the encoder's factor {self.factor}")

    def _adversarial(self, step: int) -> bool:
        return self.options.adversarial_weight > 0 and step >= self.options.adversarial_start

    def loss(self, name: str, batch: Batch, step: int):
        if name == "discriminator":
            if self._crops is None:
                return torch.zeros((), device=self.device), {}
            real, fake = self._crops
            self._crops = None
            d_loss = hinge_d_loss(self.discriminator(real), self.discriminator(fake))
            return d_loss, {"loss_disc": d_loss.item()}

        x = batch["pixels"]
        with torch.no_grad():
            z = self.encoder.encode(x.to(self.encoder.dtype))
        recon = self.decoder(z.to(x.dtype))
        o = self.options
        mse = F.mse_loss(recon.float(), x.float())
        loss = o.mse_weight * mse
        metrics = {"loss_mse": mse.item()}
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, x)
            loss = loss + o.perceptual_weight * perceptual
            metrics["loss_perceptual"] = perceptual.item()
        if self._adversarial(step):
            real, fake = random_crop_pair(x, recon, o.crop_size)
            g_adv = hinge_g_loss(self.discriminator(fake))
            loss = loss + o.adversarial_weight * g_adv
            metrics["loss_adv"] = g_adv.item()
            self._crops = (real, fake.detach())
        metrics["loss"] = loss.item()
        metrics["psnr"] = psnr(recon.detach().clamp(-1, 1), x).item()
        return loss, metrics

    def on_step_end(self, step: int) -> None:
        self._crops = None
        if self.ema is not None:
            self.ema.update(self.decoder, step)

    def _final_decoder(self) -> TinyDecoder:
        return self.ema.module if self.ema is not None else self.decoder

    def evaluate(self, step: int, out_dir: Path) -> dict[str, float]:
        if self._eval_batch is None:
            dataset = build_eval_dataset(self.config.data, self.resolution)
            self._eval_batch = fixed_batch(dataset, self.options.eval_items)
            self._full_decoder = load_decoder(self.full_decoder_path).to(self.device)
        x = self._eval_batch["pixels"].to(self.device)
        z = self.encoder.encode(x)
        tiny = self._final_decoder().eval()(z)
        full = self._full_decoder.decode(z)
        save_grid(torch.cat([x, full, tiny]), out_dir / "samples" / f"step_{step:08d}.png", columns=len(x))
        return {
            "psnr_tiny_vs_image": psnr(tiny, x).item(),
            "psnr_tiny_vs_full": psnr(tiny, full).item(),
            "psnr_full_vs_image": psnr(full, x).item(),
        }

    def export(self, out_dir: Path) -> Path:
        path = out_dir / "decoder"
        self._final_decoder().save_pretrained(path, safe_serialization=True)
        return path
