"""Stage ``kd``: rectified-flow training of the U-Net with multi-level knowledge distillation.

Everything of ``pretrain`` (latents, text, timesteps, EMA, sampling, export), plus a frozen
teacher (``training/teacher.py``: an SD3 MMDiT or a bigger U-Net) that sees the same ``x_t``,
``t`` and caption. The objective, with its exact formula, is in ``training/distillation.py``:
the task loss, output KD (velocity vs the teacher's), feature KD (the student's last decoder
features through a conv3x3-SiLU-conv1x1 projector vs the teacher's last-layer features) and
timestep-aware scaling between them.

Switches: ``kd: false`` is the no-KD baseline (the same stage, the task loss alone, no teacher
loaded); ``feature_kd: false`` keeps output KD only; ``timestep_aware_scaling: false`` adds the
KD terms with their raw weights. The projector trains with the student (same optimizer, so one
forward per step) and is dropped at export. Caption dropout (``cfg_dropout``) blanks the same
captions for both, so the teacher's unconditional prediction teaches the student's.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from snapgen.text import TextEmbeddings

from ..config import ConfigError
from ..distillation import FeatureProjector, TimestepAwareScaling, combine_losses, feature_kd_loss, output_kd_loss
from ..ema import EMA
from ..inputs import build_text_encoder
from ..losses import flow_matching_loss
from ..teacher import TeacherAdapter, check_teacher_compatible, load_teacher
from .base import Batch
from .pretrain import PretrainOptions, PretrainStage


class KDOptions(PretrainOptions):
    kd: bool = True
    teacher: str | None = None  # directory: a `teacher` stage product, an SD3 transformer, or a U-Net
    # The teacher's own text encoder ("minilm" or a saved text-encoder directory) when it does not
    # read the student's text embeddings; default: the student's, encoded once for both.
    teacher_text_encoder: str | None = None
    output_kd_weight: float = Field(1.0, ge=0)
    feature_kd: bool = True
    feature_kd_weight: float = Field(1.0, ge=0)
    projector_hidden: int | None = Field(None, gt=0)  # default: the student's feature channels
    timestep_aware_scaling: bool = True
    # Resolutions (pixels) at which the KD terms apply; default: every resolution of the run.
    # Elsewhere the step is the task loss alone: a teacher is only a good target at the sizes
    # it was trained at (check_teacher refuses a KD resolution it was not).
    kd_resolutions: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> KDOptions:
        if self.kd and not self.teacher:
            raise ValueError("kd: true needs a teacher directory (or kd: false for the no-KD baseline)")
        if self.kd and self.conditioning != "text":
            raise ValueError("knowledge distillation is text-conditional: the teacher reads captions")
        return self


def drop_captions(batch: Batch, inputs, probability: float) -> Batch:
    """The batch with each caption replaced by "" with ``probability`` (cached text ids too), so
    two text encoders see the same dropout; ``inputs.text(batch, 0.0)`` then applies none."""
    dropped = torch.rand(len(batch["captions"])) < probability
    out = dict(batch, captions=["" if d else c for c, d in zip(batch["captions"], dropped.tolist())])
    if "text_ids" in batch and inputs.empty_text_id is not None:
        ids = batch["text_ids"].clone()
        ids[dropped.to(ids.device)] = inputs.empty_text_id
        out["text_ids"] = ids
    return out


class TeacherText:
    """The text embeddings the teacher reads: the student's, or its own encoder's of the same captions."""

    def __init__(self, spec: str | None, device: torch.device):
        self.encoder = build_text_encoder(spec).to(device) if spec else None
        self.device = device

    def dims(self, inputs) -> tuple[int, int | None]:
        enc = self.encoder or inputs.text_encoder
        return enc.token_dim, enc.pooled_dim

    @torch.no_grad()
    def __call__(self, batch: Batch, student_text: TextEmbeddings) -> TextEmbeddings:
        if self.encoder is None:
            return student_text
        return self.encoder.encode(batch["captions"]).to(device=self.device)


def check_teacher(
    teacher: TeacherAdapter, stage, token_dim: int, pooled_dim: int | None, resolutions: list[int] | None = None
) -> None:
    """The teacher must read the student's latents at every resolution it teaches at (default: all of the run's)."""
    for resolution in resolutions or stage.config.data.resolutions():
        check_teacher_compatible(
            teacher, stage.inputs.latent_channels, resolution // stage.inputs.factor, token_dim, pooled_dim
        )


class KDStage(PretrainStage):
    name = "kd"
    Options = KDOptions

    def __init__(self, config, options: KDOptions, device):
        super().__init__(config, options, device)
        o = options
        self.teacher = None
        if not o.kd:
            return
        self.teacher = load_teacher(o.teacher).to(device)
        self.teacher_text = TeacherText(o.teacher_text_encoder, device)
        self.weights = {"out": o.output_kd_weight, "feat": o.feature_kd_weight if o.feature_kd else 0.0}
        self.scaling = (
            TimestepAwareScaling(o.logit_mean, o.logit_std, o.train_shift) if o.timestep_aware_scaling else None
        )
        if self.weights["feat"] > 0:
            student_channels = int(self.model["net"].config.block_out_channels[0])
            projector = FeatureProjector(student_channels, self.teacher.feature_channels, o.projector_hidden)
            # Part of the student's module: one optimizer, one forward per step; the EMA copy
            # is rebuilt to include it so checkpoints and resume see one consistent module.
            self.model["projector"] = projector.to(device)
            self.ema = EMA(self.model, config.ema) if config.ema else None

    def check_compatible(self) -> None:
        super().check_compatible()
        if self.teacher is not None:
            token_dim, pooled_dim = self.teacher_text.dims(self.inputs)
            run = self.config.data.resolutions()
            taught = self.options.kd_resolutions
            if taught and not set(taught) <= set(run):
                raise ConfigError(f"stage kd: kd_resolutions {taught} are not all trained at (the run's: {run})")
            try:
                check_teacher(self.teacher, self, token_dim, pooled_dim, taught)
            except ValueError as e:
                raise ConfigError(f"stage kd: {e}") from None

    def loss(self, name: str, batch: Batch, step: int):
        o = self.options
        x0, noise, t, x_t = self.noised_latents(batch)
        if "classes" in self.model:
            text = self.condition(self.model, batch, o.cfg_dropout)
        else:
            batch = drop_captions(batch, self.inputs, o.cfg_dropout)
            text = self.inputs.text(batch, 0.0)
        net = self.model["net"]
        teaching = self.teacher is not None and (not o.kd_resolutions or self.resolution in o.kd_resolutions)
        use_features = teaching and self.weights["feat"] > 0
        out = net(x_t, t, text.tokens, text.mask, text.pooled, return_features=use_features)
        task = flow_matching_loss(out.sample, x0, noise)
        if not teaching:
            loss = task.mean()
            return loss, {"loss": loss.item(), "task": loss.item()}

        with torch.no_grad():
            teacher = self.teacher(x_t, t, self.teacher_text(batch, text))
        kd = {"out": output_kd_loss(out.sample, teacher.velocity)}
        if use_features:
            kd["feat"] = feature_kd_loss(self.model["projector"](out.features), teacher.features)
        loss, metrics = combine_losses(t, task, kd, self.weights, self.scaling)
        return loss, {"loss": loss.item(), **metrics}
