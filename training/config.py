"""Training configs: one YAML file per run, validated by pydantic, unknown keys rejected.

Every knob of a run lives here (nanoGPT-style: the loop reads nothing else). The common keys are
checked by :class:`TrainConfig`; the ``stage_options:`` block is checked later by the stage's own
``Options`` model (``training/stages/*.py``), so each stage owns its keys.

Paths in a config are relative to the working directory the command runs in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A problem with the run's inputs (config, paths, checkpoints) found before training starts."""


class _Strict(BaseModel):
    # A misspelt key silently falling back to its default is the classic lost-GPU-day bug.
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    """Where images and captions come from (see ``training/data.py``)."""

    kind: Literal["folder", "webdataset", "shapes"]
    # folder: a directory searched recursively for images, each with an optional same-name .txt
    # caption (else the parent directory's name is the caption: the ImageNet layout).
    # webdataset: shard paths, brace patterns allowed ("shards/{000000..000099}.tar"), or a glob.
    path: str | None = None
    # Square training resolution in pixels (shorter side resized, then cropped).
    resolution: int = Field(128, gt=0)
    # Progressive resolution: [[step, resolution], ...]; from each step on, that resolution.
    # The paper's recipe: [[0, 256], [N1, 512], [N2, 1024]].
    resolution_schedule: list[tuple[int, int]] | None = None
    random_crop: bool = False  # else a center crop
    # Off by default: a mirrored "a red circle to the left of a blue square" is a wrong caption.
    random_flip: bool = False
    # Class-conditional training: an item's class is the index of its caption in this list.
    classes: list[str] | None = None
    # shapes only: how many scenes, which seed renders them, the category mix (weights, e.g.
    # {single: 1, two: 2, count: 1, position: 2}; equal when null).
    length: int = Field(10_000, gt=0)
    seed: int = Field(0, ge=0)
    categories: dict[str, float] | None = None
    # webdataset only: in-memory shuffle buffer (samples) per data-loading worker.
    shuffle_buffer: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.kind in ("folder", "webdataset") and not self.path:
            raise ValueError(f"data.kind {self.kind!r} needs data.path")
        if self.resolution_schedule is not None:
            steps = [s for s, _ in self.resolution_schedule]
            if not steps or steps[0] != 0 or any(a >= b for a, b in zip(steps, steps[1:])):
                raise ValueError("data.resolution_schedule must start at step 0 with strictly increasing steps")
            if any(r <= 0 for _, r in self.resolution_schedule):
                raise ValueError("data.resolution_schedule resolutions must be positive")
        return self

    def resolution_at(self, step: int) -> int:
        """The training resolution at ``step`` (progressive resolution)."""
        if not self.resolution_schedule:
            return self.resolution
        return [r for s, r in self.resolution_schedule if s <= step][-1]

    def resolutions(self) -> list[int]:
        """Every resolution the run trains at, in schedule order."""
        if not self.resolution_schedule:
            return [self.resolution]
        return list(dict.fromkeys(r for _, r in self.resolution_schedule))


class OptimConfig(_Strict):
    """AdamW for every trainable module (a stage may override fields per optimizer)."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; null = no clipping
    warmup_steps: int = Field(0, ge=0)  # linear warm-up from 0
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine and cool-down end at lr * min_lr_ratio
    # Constant schedule only: the last cooldown_steps decay linearly to lr * min_lr_ratio
    # (warm-up / stable / decay), so a constant-lr run can be extended on --resume and cooled last.
    cooldown_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.cooldown_steps and self.schedule != "constant":
            raise ValueError("optim.cooldown_steps needs schedule: constant (cosine already decays)")
        return self


class EMAConfig(_Strict):
    decay: float = Field(0.999, gt=0, lt=1)
    # Ramp the decay up as min(decay, (1 + step) / (10 + step)), so short runs' EMA isn't mostly init.
    warmup: bool = True


class TrainConfig(_Strict):
    stage: str
    seed: int = 0
    out_dir: str
    max_steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)  # per process; the global batch is batch_size x world size
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    ema: EMAConfig | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    log_every: int = Field(10, gt=0)
    ckpt_every: int = Field(500, gt=0)
    sample_every: int = Field(0, ge=0)  # 0: evaluate (sample grids, PSNR) at the end only
    keep_checkpoints: int = Field(2, ge=1)
    # Steps at which the product is also exported as a snapshot (``model-4000steps/`` beside the
    # final ``model/``): a baseline compared at fewer steps on the way to a longer run.
    export_at: list[PositiveInt] = Field(default_factory=list)
    num_workers: int = Field(0, ge=0)
    # CPU threads for this process (torch.set_num_threads); null: torch's default. On a shared
    # or oversubscribed CPU, 1 avoids OpenMP's spin-waiting (measured up to 30x cheaper here).
    cpu_threads: int | None = Field(None, gt=0)
    # Latent caches of flow stages saved here, keyed by the autoencoder's weights and the data config:
    # stages that read the same data share one, and a resumed run doesn't encode its dataset again.
    latent_cache_dir: str | None = None
    tensorboard: bool = True
    stage_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, stage: str) -> str:
        from .stages import STAGES

        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
        return stage


# Keys (dotted for nested ones) that may change between a run and its resumption without changing
# what is trained so far: like max_steps, where the lr cools down is decided when a run is extended.
RESUMABLE_KEYS = frozenset(
    {"out_dir", "max_steps", "optim.cooldown_steps", "log_every", "ckpt_every", "sample_every", "keep_checkpoints",
     "export_at", "num_workers", "device", "tensorboard", "cpu_threads", "latent_cache_dir"}
)


def training_identity(config: TrainConfig) -> dict[str, Any]:
    """The part of the config that defines the training trajectory."""

    def without_resumable(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        return {
            k: without_resumable(v, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in data.items()
            if f"{prefix}{k}" not in RESUMABLE_KEYS
        }

    return without_resumable(config.model_dump(mode="json"))


def config_hash(config: TrainConfig) -> str:
    canonical = json.dumps(training_identity(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def format_validation_error(error: ValidationError, where: str, prefix: str = "") -> str:
    lines = []
    for e in error.errors():
        loc = prefix + ".".join(str(p) for p in e["loc"]) if e["loc"] else prefix.rstrip(".") or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return f"{where}: invalid config\n" + "\n".join(lines)


def parse_config(data: Any, where: str = "config") -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys at the top level, got {type(data).__name__}")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config; ``overrides`` (e.g. from the command line) replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if isinstance(data, dict) and overrides:
        data = {**data, **overrides}
    return parse_config(data, str(path))


def parse_stage_options(config: TrainConfig, options_model: type[BaseModel]) -> BaseModel:
    try:
        return options_model.model_validate(config.stage_options)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"stage {config.stage!r}", "stage_options.")) from None
