"""Multi-level knowledge distillation with timestep-aware scaling (SnapGen's KD objective).

For a batch of clean latents ``x0``, noise ``eps`` and flow times ``t_i`` drawn from ``p`` (the
training's logit-normal ``t = sigmoid(m + s n)``, through ``shift_time`` if the run shifts it),
the student ``S`` and the frozen teacher ``T`` both see ``x_t = (1 - t) x0 + t eps``. Per
sample ``i`` (means over channels and pixels):

    L_task,i = |v_S - (eps - x0)|^2                      rectified flow (the task)
    L_out,i  = |v_S - v_T|^2                             output KD
    L_feat,i = |P(f_S) - resize(f_T)|^2                  feature KD

``f_S`` is the student's last decoder feature map, ``P`` a light projector (conv3x3 - SiLU -
conv1x1) to the teacher's channels, and ``resize`` brings the teacher's last-layer map to the
student's resolution (bilinear up, area down). Timestep-aware scaling combines them as

    a(t)    = p(t) / max_u p(u)                           in (0, 1], 1 at the mode of p
    r_k,i   = sg(L_task,i) / (sg(L_k,i) + delta)          k in {out, feat}; sg = stop-gradient
    L       = mean_i [ a(t_i) L_task,i + (1 - a(t_i)) sum_k w_k r_k,i L_k,i ]

with the weights ``w_k`` normalised to sum to 1 and ``delta`` = 1e-8.

Why: ``r_k,i L_k,i`` has the *value* of ``L_task,i`` whatever the raw scale of ``L_k`` (teacher
features of an MMDiT can be orders of magnitude larger than velocities), so the KD terms can
never swamp or vanish next to the task; only their gradient direction, ``L_task,i * grad log
L_k,i``, is new. The loss value therefore always equals the plain task loss, so runs with and
without KD log comparable numbers. ``a(t)`` hands the gradient to the teacher where ``p(t)`` is
small, i.e. near t = 0 and t = 1: there the task target ``eps - x0`` is dominated by what x_t
cannot reveal (the noise near t = 0, the image near t = 1), so the task loss is large and its
gradient noisy, while the teacher's velocity is an estimate of the conditional mean
``E[eps - x0 | x_t]``, a clean target. At the mode of ``p`` the objective is the task alone.

The ratio is computed per sample, i.e. per timestep (each sample has its own t), not per
batch, which would let one timestep set the scale for all the others.

Without timestep-aware scaling the objective is the plain sum
``L = mean_i [ L_task,i + sum_k w_k L_k,i ]`` with the raw weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from snapgen.flow import logit_normal_density

RATIO_EPS = 1e-8


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error over every dimension but the batch."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def output_kd_loss(student_velocity: torch.Tensor, teacher_velocity: torch.Tensor) -> torch.Tensor:
    """(B,) ``|v_S - v_T|^2``; the teacher is a target, never trained through."""
    return per_sample_mse(student_velocity, teacher_velocity.detach())


def resize_to(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear when enlarging (the teacher's patch grid is coarser), area when shrinking."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    if features.shape[-2] < size[0]:
        return F.interpolate(features, size=size, mode="bilinear", align_corners=False)
    return F.interpolate(features, size=size, mode="area")


class FeatureProjector(nn.Module):
    """Student features -> teacher channels: conv3x3 (mixes a neighbourhood, as the teacher's
    patches do) - SiLU - conv1x1 (to the teacher's width). Trained with the student, then dropped."""

    def __init__(self, student_channels: int, teacher_channels: int, hidden_channels: int | None = None):
        super().__init__()
        hidden = hidden_channels or student_channels
        self.net = nn.Sequential(
            nn.Conv2d(student_channels, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, teacher_channels, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def feature_kd_loss(projected_student: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """(B,) ``|P(f_S) - resize(f_T)|^2`` at the student's resolution."""
    target = resize_to(teacher_features.detach().float(), tuple(projected_student.shape[-2:]))
    return per_sample_mse(projected_student, target)


class TimestepAwareScaling:
    """``L = mean_i [ a(t_i) L_task,i + (1 - a(t_i)) sum_k w_k r_k,i L_k,i ]`` (module docstring).

    ``location``, ``scale`` and ``shift`` describe the distribution the flow times are drawn
    from: ``t = shift_time(sigmoid(location + scale n), shift)``.
    """

    def __init__(self, location: float = 0.0, scale: float = 1.0, shift: float = 1.0, grid: int = 20001):
        self.location, self.scale, self.shift = location, scale, shift
        # max_u p(u) on a dense grid: the logit-normal's mode has no closed form (and there are
        # two modes when scale > sqrt(2)).
        u = torch.linspace(0.0, 1.0, grid + 2, dtype=torch.float64)[1:-1]
        self.peak = float(self.density(u).max())

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """p(t): the logit-normal density, carried through ``shift_time`` when ``shift != 1``."""
        s = self.shift
        # u = shift_time^-1(t) = t / (s - (s - 1) t), and du/dt = s / (s - (s - 1) t)^2.
        denominator = s - (s - 1) * t
        return logit_normal_density(t / denominator, self.location, self.scale) * s / denominator**2

    def task_weight(self, t: torch.Tensor) -> torch.Tensor:
        """a(t) in (0, 1]; the KD weight is 1 - a(t)."""
        return (self.density(t.detach().double()) / self.peak).clamp(max=1.0).float()

    def __call__(
        self,
        t: torch.Tensor,
        task: torch.Tensor,
        kd: dict[str, torch.Tensor],
        weights: dict[str, float],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Combine per-sample ``task`` (B,) and KD terms ``kd[name]`` (B,) into the scalar loss."""
        a = self.task_weight(t).to(task.device)
        total_weight = sum(weights[name] for name in kd)
        if total_weight <= 0:
            raise ValueError("timestep-aware scaling needs a positive total KD weight")
        scaled_kd = torch.zeros_like(task)
        metrics = {"kd_task_weight": float(a.mean())}
        for name, term in kd.items():
            ratio = task.detach() / (term.detach() + RATIO_EPS)
            scaled_kd = scaled_kd + (weights[name] / total_weight) * ratio * term
            metrics[f"kd_ratio_{name}"] = float(ratio.mean())
        loss = (a * task + (1 - a) * scaled_kd).mean()
        return loss, metrics


def combine_losses(
    t: torch.Tensor,
    task: torch.Tensor,
    kd: dict[str, torch.Tensor],
    weights: dict[str, float],
    scaling: TimestepAwareScaling | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The KD objective: timestep-aware scaling when ``scaling`` is given, else the plain weighted sum.

    Always logs the raw (unscaled) means of every term, so runs stay comparable.
    """
    metrics = {"task": float(task.detach().mean())}
    metrics.update({f"kd_{name}": float(term.detach().mean()) for name, term in kd.items()})
    kd = {name: term for name, term in kd.items() if weights.get(name, 0.0) > 0}
    if not kd:
        return task.mean(), metrics
    if scaling is None:
        loss = task + sum(weights[name] * term for name, term in kd.items())
        return loss.mean(), metrics
    loss, scaled = scaling(t, task, kd, weights)
    metrics.update(scaled)
    return loss, metrics
