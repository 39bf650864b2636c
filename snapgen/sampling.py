"""Few-step Euler sampling of the rectified flow, with classifier-free guidance.

The schedule is a list of flow times ``1 = t_0 > t_1 > ... > t_N = 0``; the Euler update is

    x_{i+1} = x_i + (t_{i+1} - t_i) * v(x_i, t_i)

Guidance mixes an unconditional and a conditional prediction: ``v = v_u + g (v_c - v_u)``; at
``g = 1`` only the conditional prediction is needed, so the unconditional pass is skipped.

Step-distilled models (LADD) are trained for particular times; they store them in the sampler
config (``distilled_timesteps``) and those are used whenever the step count matches.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .flow import resolution_shift, shift_time
from .text import TextEmbeddings, concat_text

SAMPLER_CONFIG_NAME = "scheduler_config.json"
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# ``on_step(step, steps, latents)``: None to go on, or a tensor that replaces the latents.
StepCallback = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]
# A model call on noised latents, times and text: ``call(x, t, text) -> velocity``.
ModelCall = Callable[[torch.Tensor, torch.Tensor, TextEmbeddings], torch.Tensor]


@dataclass
class SamplerConfig(SchedulerMixin):
    """What a model directory says about how to sample it (``scheduler/scheduler_config.json``).

    A diffusers ``SchedulerMixin`` only so that ``DiffusionPipeline.from_pretrained`` loads it as a
    pipeline's ``scheduler`` (diffusers loads only classes derived from a base it knows); it keeps its own
    file format, through :meth:`from_pretrained` and :meth:`save_pretrained`.
    """

    default_steps: int = 28
    guidance_scale: float = 1.0
    shift: float = 1.0
    # When set, ``shift`` applies at this square resolution (pixels per side) and scales with
    # sqrt(pixel count) at other sizes (SD3's resolution-dependent shift).
    shift_base_resolution: int | None = None
    # step count (as a string key, JSON-style) -> the N flow times the model was distilled for.
    distilled_timesteps: dict[str, list[float]] = field(default_factory=dict)
    max_steps: int = 50

    def __post_init__(self):
        for steps, times in self.distilled_timesteps.items():
            if len(times) != int(steps):
                raise ValueError(f"distilled_timesteps[{steps!r}] has {len(times)} times, expected {steps}")
            if any(not 0 < t <= 1 for t in times) or any(a <= b for a, b in zip(times, times[1:])):
                raise ValueError(f"distilled_timesteps[{steps!r}] must decrease within (0, 1], got {times}")

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {"_class_name": "SnapGenFlowSampler", **asdict(self)}
        (directory / SAMPLER_CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> SamplerConfig:
        data = json.loads((Path(directory) / SAMPLER_CONFIG_NAME).read_text())
        data.pop("_class_name", None)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in {directory}/{SAMPLER_CONFIG_NAME}")
        return cls(**data)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None, **kwargs
    ) -> SamplerConfig:
        """:meth:`load` in diffusers' shape: a local directory, optionally its ``subfolder``; other keywords ignored."""
        directory = Path(pretrained_model_name_or_path)
        return cls.load(directory / subfolder if subfolder else directory)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """:meth:`save` in diffusers' shape (its keywords are ignored)."""
        self.save(save_directory)

    def timesteps(self, steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The ``steps + 1`` flow times, from 1 to 0, used for ``steps`` Euler steps."""
        if str(steps) in self.distilled_timesteps:
            return torch.tensor([*self.distilled_timesteps[str(steps)], 0.0], dtype=torch.float64)
        shift = self.shift
        if self.shift_base_resolution and height and width:
            shift = resolution_shift(height, width, self.shift_base_resolution, self.shift)
        return flow_timesteps(steps, shift)


def flow_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` evenly spaced times from 1 to 0, then shifted (float64, exact endpoints)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_time(t, shift)


def guided(velocity_fn: Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor], guidance_scale: float):
    """Wrap ``velocity_fn(x, t, with_uncond)`` into classifier-free guidance.

    With ``with_uncond`` the callee returns the conditional and unconditional predictions
    stacked along the batch (``[cond; uncond]``), from one batched model call.
    """
    if guidance_scale == 1.0:
        return lambda x, t: velocity_fn(x, t, False)

    def fn(x, t):
        cond, uncond = velocity_fn(x, t, True).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return fn


def cfg_velocity(call: ModelCall, cond: TextEmbeddings, uncond: TextEmbeddings | None = None):
    """The ``velocity_fn(x, t, with_uncond)`` that :func:`guided` wraps, from a model call.

    The unconditional prediction comes from the same call as the conditional one: ``x`` and
    ``t`` doubled, the text ``[cond; uncond]``. ``uncond`` may be None only when sampling
    without guidance (``guidance_scale == 1``), which never asks for it.
    """
    both = None if uncond is None else concat_text(cond, uncond)

    def velocity(x: torch.Tensor, t: torch.Tensor, with_uncond: bool) -> torch.Tensor:
        if not with_uncond:
            return call(x, t, cond)
        if both is None:
            raise ValueError("classifier-free guidance needs the unconditional text; uncond is None")
        return call(torch.cat([x, x]), torch.cat([t, t]), both)

    return velocity


@torch.no_grad()
def sample_euler(
    velocity: VelocityFn,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` at ``timesteps[0]`` to ``timesteps[-1]`` with Euler steps.

    ``timesteps`` is ``(steps + 1,)``, shared by the batch, or ``(steps + 1, batch)``: a schedule
    per sample (LADD's distillation target steps each sample through its own segment).
    ``on_step(i, n, x)`` runs after each step; raising from it stops sampling (how a server
    cancels a running job), returning a tensor replaces ``x`` (how a caller edits the latents).
    """
    x = noise
    n = len(timesteps) - 1
    for i in range(n):
        if timesteps.ndim == 1:
            t, t_next = float(timesteps[i]), float(timesteps[i + 1])
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
            step = t_next - t
        else:
            t_batch = timesteps[i].to(device=x.device, dtype=torch.float32)
            step = (timesteps[i + 1] - timesteps[i]).to(device=x.device, dtype=torch.float32)
            step = step.reshape(-1, *([1] * (x.ndim - 1)))
        v = velocity(x, t_batch)
        x = (x.float() + step * v.float()).to(noise.dtype)
        if on_step is not None:
            replaced = on_step(i + 1, n, x)
            if replaced is not None:
                x = replaced.to(device=x.device, dtype=x.dtype)
    return x
