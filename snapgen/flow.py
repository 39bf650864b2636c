"""Rectified flow, stated once.

A clean latent ``x0`` and Gaussian noise ``eps`` are joined by the straight path

    x_t = (1 - t) * x0 + t * eps,          t in [0, 1]  (t = 1 is pure noise)

whose velocity ``dx_t/dt = eps - x0`` is what the U-Net predicts. Sampling integrates
``dx/dt = v(x, t)`` from t = 1 down to t = 0 (see ``sampling.py``); a prediction ``v`` at
``x_t`` implies the clean estimate ``x0 = x_t - t * v``.

Training draws ``t`` from a logit-normal distribution, ``t = sigmoid(m + s * n)``, n ~ N(0, 1),
which puts most samples in the middle of the path where the velocity is hardest to predict
(SD3, and the SnapGen paper).

Larger images keep more signal at a given noise level, so the schedule is shifted towards
t = 1 by ``shift(t) = a t / (1 + (a - 1) t)``; SD3's resolution-dependent choice is
``a = a_base * sqrt(pixels / base_pixels)``.
"""

from __future__ import annotations

import math

import torch


def _broadcast(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The point ``x_t`` on the straight path from ``x0`` (t=0) to ``noise`` (t=1)."""
    t = _broadcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def predict_x0(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    return x_t - _broadcast(t, x_t) * velocity


def sample_logit_normal(
    n: int,
    location: float = 0.0,
    scale: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``n`` flow times from the logit-normal distribution (training only; uses torch's RNG)."""
    normal = torch.randn(n, generator=generator, device=device)
    return torch.sigmoid(location + scale * normal)


def logit_normal_density(t: torch.Tensor, location: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Density of the logit-normal distribution at ``t`` in (0, 1)."""
    t = t.clamp(1e-6, 1 - 1e-6)
    logit = torch.log(t / (1 - t))
    z = (logit - location) / scale
    return torch.exp(-0.5 * z * z) / (scale * math.sqrt(2 * math.pi) * t * (1 - t))


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Move flow times towards 1 (``shift > 1``) while keeping 0 and 1 fixed."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(height: int, width: int, base_resolution: int, base_shift: float = 1.0) -> float:
    """SD3's shift for an image of ``height x width`` pixels, ``base_shift`` at ``base_resolution``^2."""
    return base_shift * math.sqrt(height * width / float(base_resolution * base_resolution))
