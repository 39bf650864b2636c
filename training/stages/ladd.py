"""Stage ``ladd``: step distillation by latent adversarial diffusion distillation (SD3-Turbo).

The generator is the KD student (``init_from``: its model directory), trained to jump from any
point of an N-step schedule (N in ``student_steps``, 4 and 8) to a clean latent in one step.
The discriminator is the frozen teacher (``teacher``; SD3.5-Large-Turbo in the paper, the small
MMDiT here) read at a few of its blocks by small trainable heads (``training/discriminator.py``).
Per step, for real latents ``x0`` and captions ``c``:

    N ~ student_steps, k ~ U{0..N-1}, t = tau_N[k]          tau_N = flow_timesteps(N, sample_shift)[:-1]
    x_t = (1 - t) x0 + t eps,   x0_hat = x_t - t v_S(x_t, t, c)          one student step
        (student_inputs "rollout": x_t = the student's own k Euler steps from eps, without grad)
    t' ~ logit-normal(renoise_mean, renoise_std)                         high noise, as SD3-Turbo
    real = (1 - t') x0 + t' eps',   fake = (1 - t') x0_hat + t' eps'     same t' and eps'
    D(z) = heads(teacher blocks at (z, t', c), t')

    generator:      L_G = adv_weight * hinge_G(D(fake)) + distill_weight * |v_S - v*|^2
    v_T^g = v_T(x_t, t, '') + g (v_T(x_t, t, c) - v_T(x_t, t, ''))      g = distill_guidance (1: v_T)
    v*    = (x_t - Phi_K(x_t; t -> t_next)) / (t - t_next)               the teacher's K steps as one
    discriminator:  L_D = hinge_D(D(real), D(fake.detach()))

``Phi_K`` integrates the guided teacher flow v_T^g with K Euler steps from ``t`` to the next time
of the student's schedule (0 after the last), on the finer schedule ``flow_timesteps(N K)``, with
``K = round(distill_teacher_steps / N)``: for N = 4 and 28 teacher steps, exactly the 28-step
sampler's times. K = 1 (the default) makes ``v* = v_T^g(x_t, t, c)``, the teacher's velocity at the
student's point. The paper's output distillation reads a few-step teacher (SD3.5-Large-Turbo),
whose one step already spans the student's; without one, K > 1 makes the 28-step teacher's
several steps that target.

``student_inputs: rollout`` trains the student where it samples from: after its first step a
few-step sampler never sees data noised to ``t`` but its own earlier outputs, whose errors the
noised-data inputs never show it (DMD2's "backward simulation"). The distillation target then
starts from the student's state, so its later steps learn to correct what its earlier ones miss.

Re-noising both to the same high ``t'`` makes the discriminator judge the global layout (what a
few-step sampler gets wrong) rather than pixel noise, and gives real and fake overlapping
supports. The distillation term (output KD against ``distill_teacher``, default the teacher)
keeps the generator on the teacher's flow while the adversarial term sharpens it.

The generator's output is cached between the two optimizer calls of a step (``stages/base.py``).
The product is a model directory whose sampler stores the distilled schedules
(``distilled_timesteps`` for every N, ``default_steps`` = the first N), so ``load_pipeline``
samples at exactly the trained times.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from snapgen.flow import interpolate, predict_x0, sample_logit_normal
from snapgen.models.unet import SnapGenUNet
from snapgen.sampling import SamplerConfig, cfg_velocity, flow_timesteps, guided, sample_euler
from snapgen.text import concat_text

from ..config import ConfigError
from ..discriminator import LADDDiscriminator
from ..distillation import output_kd_loss
from ..inputs import check_model_dir
from ..losses import hinge_d_loss, hinge_g_loss
from ..teacher import load_teacher
from .base import Batch
from .kd import TeacherText, check_teacher, drop_captions
from .pretrain import FlowOptions, PretrainStage


class LADDOptions(FlowOptions):
    init_from: str  # the KD student: a model directory (or its unet/ folder)
    teacher: str  # the discriminator's frozen feature extractor
    distill_teacher: str | None = None  # target of the distillation term; default: the teacher
    teacher_text_encoder: str | None = None  # see the kd stage; default: the student's embeddings
    # What a separate distill_teacher reads; default: the student's embeddings (it is usually the
    # student's own parent). Without a distill_teacher the teacher's text serves both.
    distill_teacher_text_encoder: str | None = None
    student_steps: list[int] = Field(default_factory=lambda: [4, 8], min_length=1)
    disc_layers: list[int] | None = None  # teacher blocks with a head; default: up to 4, evenly spaced
    # "frozen": the heads read the frozen teacher. "trained": they read a copy of it that trains
    # with them (the discriminator's optimizer, disc_lr), so its features can learn what tells
    # real latents from the student's; the teacher itself stays frozen as the distillation target.
    disc_backbone: Literal["frozen", "trained"] = "frozen"
    disc_hidden: int = Field(64, gt=0)
    disc_lr: float | None = Field(None, gt=0)  # default: optim.lr
    adv_weight: float = Field(1.0, ge=0)
    distill_weight: float = Field(1.0, ge=0)
    # The distillation target is the teacher's guided velocity v_u + g (v_c - v_u): the student
    # samples without guidance, so it must learn the guided flow the teacher is evaluated with.
    distill_guidance: float = Field(1.0, ge=0)
    # Teacher steps over the whole schedule that the target spans (v* above); None: one per step.
    distill_teacher_steps: int | None = Field(None, gt=0)
    # Where the student's inputs x_t come from: noised data, or its own sampling trajectory.
    student_inputs: Literal["data", "rollout"] = "data"
    renoise_mean: float = 1.0  # t' = sigmoid(renoise_mean + renoise_std * n): mostly high noise
    renoise_std: float = Field(1.0, gt=0)
    # Few-step samplers are used without guidance; the export's defaults.
    cfg_dropout: float = Field(0.0, ge=0, le=1)
    default_steps: int | None = Field(None, gt=0)  # default: student_steps[0]
    guidance_scale: float = Field(1.0, ge=0)
    sample_steps: int | None = Field(None, gt=0)  # default: student_steps[0]

    @model_validator(mode="after")
    def _check(self) -> LADDOptions:
        if self.conditioning != "text":
            raise ValueError("LADD is text-conditional: the teacher reads captions")
        if self.distill_teacher_text_encoder and not self.distill_teacher:
            raise ValueError("distill_teacher_text_encoder needs a distill_teacher (else set teacher_text_encoder)")
        if any(n < 1 for n in self.student_steps) or len(set(self.student_steps)) != len(self.student_steps):
            raise ValueError(f"student_steps must be distinct positive step counts, got {self.student_steps}")
        self.default_steps = self.default_steps or self.student_steps[0]
        self.sample_steps = self.sample_steps or self.student_steps[0]
        return self


def discriminator_accuracy(heads: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The share of logits on the right side of 0 (real > 0, fake < 0), over every head and
    location, real and fake weighted equally: 0.5 is chance."""
    shares = [((real > 0).float().mean() + (fake < 0).float().mean()) / 2 for real, fake in heads]
    return float(torch.stack(shares).mean())


def default_layers(num_layers: int, count: int = 4) -> list[int]:
    """Up to ``count`` evenly spaced block indices, always including the last."""
    count = min(count, num_layers)
    return sorted({round((i + 1) * num_layers / count) - 1 for i in range(count)})


def teacher_segments(steps: int, teacher_steps: int | None, shift: float) -> torch.Tensor:
    """Row k: the K + 1 times the teacher steps through from the student's k-th time to its next."""
    k = max(1, round(teacher_steps / steps)) if teacher_steps else 1
    fine = flow_timesteps(steps * k, shift).float()
    return torch.stack([fine[i * k:(i + 1) * k + 1] for i in range(steps)])


class LADDStage(PretrainStage):
    name = "ladd"
    Options = LADDOptions

    def __init__(self, config, options: LADDOptions, device):
        super().__init__(config, options, device)
        o = options
        self.teacher = load_teacher(o.teacher).to(device)
        self.distill_teacher = load_teacher(o.distill_teacher).to(device) if o.distill_teacher else self.teacher
        self.teacher_text = TeacherText(o.teacher_text_encoder, device)
        self.distill_text = (
            TeacherText(o.distill_teacher_text_encoder, device) if o.distill_teacher else self.teacher_text
        )
        layers = o.disc_layers if o.disc_layers is not None else default_layers(self.teacher.num_layers)
        try:
            channels = {i: self.teacher.layer_channels(i) for i in layers}
        except ValueError as e:
            raise ConfigError(f"stage_options.disc_layers: {e}") from None
        backbone = None
        if o.disc_backbone == "trained":
            backbone = load_teacher(o.teacher).to(device)
            backbone.model.requires_grad_(True)
        self.discriminator = LADDDiscriminator(channels, o.disc_hidden, backbone=backbone).to(device)
        self.schedules = {n: flow_timesteps(n, o.sample_shift)[:-1].float().to(device) for n in o.student_steps}
        self.segments = {n: teacher_segments(n, o.distill_teacher_steps, o.sample_shift).to(device)
                         for n in o.student_steps}
        self._cache: dict | None = None

    def build_network(self):
        root = Path(self.options.init_from)
        folder = root / "unet" if (root / "unet" / "config.json").is_file() else root
        check_model_dir(str(folder), "init_from")
        return SnapGenUNet.from_pretrained(folder, use_safetensors=True)

    # -- the stage ------------------------------------------------------------------------------
    def trainable_modules(self):
        return {"generator": self.model, "discriminator": self.discriminator}

    def optimizer_options(self, name: str):
        return {"lr": self.options.disc_lr} if name == "discriminator" and self.options.disc_lr else {}

    def check_compatible(self) -> None:
        super().check_compatible()
        readers = [(self.teacher, self.teacher_text)]
        if self.distill_teacher is not self.teacher:
            readers.append((self.distill_teacher, self.distill_text))
        try:
            for teacher, text in readers:
                check_teacher(teacher, self, *text.dims(self.inputs))
        except ValueError as e:
            raise ConfigError(f"stage ladd: {e}") from None

    def sampler_config(self) -> SamplerConfig:
        o = self.options
        times = {str(n): [round(float(t), 6) for t in self.schedules[n]] for n in o.student_steps}
        return SamplerConfig(
            default_steps=o.default_steps,
            guidance_scale=o.guidance_scale,
            shift=o.sample_shift,
            distilled_timesteps=times,
        )

    @property
    def _disc_backbone(self):
        """What the heads read: the discriminator's trained copy of the teacher, or the frozen teacher."""
        return self.teacher if self.discriminator.backbone is None else self.discriminator.backbone

    def _discriminate(self, z: torch.Tensor, t: torch.Tensor, text) -> list[torch.Tensor]:
        layers = self._disc_backbone(z, t, text, return_layers=self.discriminator.layers).layers
        return self.discriminator(layers, t)

    def _generate(self, batch: Batch) -> dict:
        """One student step from a point of an N-step schedule, and the re-noising draws."""
        o = self.options
        x0 = self.inputs.latents(batch)
        n = x0.shape[0]
        # torch's RNG (not Python's): checkpoints restore it, so a resumed run draws the same N.
        steps = o.student_steps[int(torch.randint(len(o.student_steps), ()))]
        schedule = self.schedules[steps]
        index = torch.randint(len(schedule), (n,), device=schedule.device)
        t = schedule[index]
        noise = torch.randn_like(x0)
        batch = drop_captions(batch, self.inputs, o.cfg_dropout)
        text = self.inputs.text(batch, 0.0)
        if o.student_inputs == "rollout":
            x_t = self._rollout(text, noise, schedule, index)
        else:
            x_t = interpolate(x0, noise, t)
        v = self._student(x_t, t, text)
        teacher_text = self.teacher_text(batch, text)
        return {
            "x0": x0,
            "noise": noise,
            "x_t": x_t,
            "t": t,
            "segment": self.segments[steps][index],
            "v": v,
            "x0_hat": predict_x0(x_t, v, t),
            "text": teacher_text,
            # Without a separate distill_teacher both read the same text: encode it once.
            "distill_text": teacher_text if self.distill_text is self.teacher_text else self.distill_text(batch, text),
            "t_renoise": sample_logit_normal(n, o.renoise_mean, o.renoise_std, device=x0.device),
            "eps_renoise": torch.randn_like(x0),
        }

    def _student(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        return self.model["net"](x, t, text.tokens, text.mask, text.pooled).sample

    @torch.no_grad()
    def _rollout(self, text, noise: torch.Tensor, schedule: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Each sample's state at ``schedule[index]`` on the student's own Euler path from ``noise``."""
        x = noise.clone()
        for j in range(int(index.max())):
            moving = index > j  # only the samples whose time lies past schedule[j] take this step
            rows = text.select(moving)
            x[moving] = sample_euler(lambda z, t, rows=rows: self._student(z, t, rows), x[moving], schedule[j : j + 2])
        return x

    def loss(self, name: str, batch: Batch, step: int):
        if name == "generator":
            return self._generator_loss(batch)
        if name == "discriminator":
            return self._discriminator_loss(batch)
        raise KeyError(f"stage ladd has no optimizer {name!r}")

    def _generator_loss(self, batch: Batch):
        o, g = self.options, self._generate(batch)
        fake = interpolate(g["x0_hat"], g["eps_renoise"], g["t_renoise"])
        # Gradients reach the generator through the frozen teacher and the heads (which the
        # loop keeps from accumulating gradients here).
        adv = torch.stack([hinge_g_loss(head) for head in self._discriminate(fake, g["t_renoise"], g["text"])])
        adv = adv.mean()
        v_teacher = self._distill_target(batch, g)
        distill = output_kd_loss(g["v"], v_teacher).mean()
        loss = o.adv_weight * adv + o.distill_weight * distill
        # The discriminator's call of this step reuses this output, without its graph.
        self._cache = {k: v.detach() if torch.is_tensor(v) else v for k, v in g.items()}
        return loss, {"loss_g": loss.item(), "adv_g": adv.item(), "distill": distill.item()}

    @torch.no_grad()
    def _distill_target(self, batch: Batch, g: dict) -> torch.Tensor:
        guidance = self.options.distill_guidance
        uncond = None
        if guidance != 1.0:
            n = g["x_t"].shape[0]
            empty = dict(batch, captions=[""] * n)
            uncond = self.distill_text(empty, self.inputs.encode_prompts([""] * n))

        def teacher_call(x, t, text):
            return self.distill_teacher(x, t, text).velocity

        velocity = guided(cfg_velocity(teacher_call, g["distill_text"], uncond), guidance)
        times = g["segment"]
        if times.shape[1] == 2:  # one teacher step: its velocity itself, not rounded through x
            return velocity(g["x_t"], g["t"])
        end = sample_euler(velocity, g["x_t"], times.T)
        return (g["x_t"] - end) / (times[:, 0] - times[:, -1]).view(-1, 1, 1, 1)

    def _discriminator_loss(self, batch: Batch):
        g = self._cache
        if g is None:  # called without a generator call this step: make the fakes without grad
            with torch.no_grad():
                g = self._generate(batch)
        t_r, eps_r = g["t_renoise"], g["eps_renoise"]
        real = interpolate(g["x0"], eps_r, t_r)
        fake = interpolate(g["x0_hat"], eps_r, t_r)
        trained = self.discriminator.backbone is not None
        # A frozen backbone needs no graph: neither input needs a gradient.
        with contextlib.nullcontext() if trained else torch.no_grad():
            layers = self._disc_backbone(
                torch.cat([real, fake]),
                torch.cat([t_r, t_r]),
                concat_text(g["text"], g["text"]),
                return_layers=self.discriminator.layers,
            ).layers
        # Per head, the logits of [real; fake].
        heads = [head.chunk(2) for head in self.discriminator(layers, torch.cat([t_r, t_r]))]
        loss = torch.stack([hinge_d_loss(real, fake) for real, fake in heads]).mean()
        metrics = {
            "loss_d": loss.item(),
            "d_real": sum(r.mean().item() for r, _ in heads) / len(heads),
            "d_fake": sum(f.mean().item() for _, f in heads) / len(heads),
            "d_accuracy": discriminator_accuracy(heads),
        }
        return loss, metrics

    def on_step_end(self, step: int) -> None:
        super().on_step_end(step)
        self._cache = None

