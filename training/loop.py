"""The one training loop, for every stage of the recipe, on one CPU or many GPUs.

    config -> checks (out_dir, resume, stage options, data paths, stage.check_compatible)
           -> stage modules, AdamW per trainable module, optional EMA (inside the stage)
           -> for step in [start, max_steps): batch -> per optimizer: loss, backward,
              average grads over processes, clip, step -> on_step_end
              (log every log_every, evaluate every sample_every, checkpoint every ckpt_every)
           -> final checkpoint, evaluation, export, loss curve

Everything that can be wrong with the inputs is checked before the first step, and raised as a
:class:`~training.config.ConfigError` (the CLI prints it without a traceback).

Reproducibility: all processes seed ``config.seed`` before building the stage (identical
initial weights; rank 0's are broadcast anyway), then process ``r`` reseeds with ``seed + r``
for its own noise and timesteps. Checkpoints store every process's RNG state, and the data
order is a pure function of the step (``training/data.py``), so ``--resume`` continues the
exact trajectory an uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from . import checkpoint, distributed
from .config import (
    RESUMABLE_KEYS,
    ConfigError,
    TrainConfig,
    config_diff,
    config_hash,
    parse_stage_options,
    training_identity,
)
from .data import build_dataset, make_loader
from .logger import LOSS_CURVE, RunLogger, plot_losses
from .stages import stage_class

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then constant (with an optional linear cool-down over the last
    ``cooldown_steps``) or cosine, down to ``min_lr_ratio``."""
    optim = config.optim
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        cooldown_start = config.max_steps - optim.cooldown_steps
        if optim.cooldown_steps and step >= cooldown_start:
            progress = (step - cooldown_start + 1) / optim.cooldown_steps
            return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * (1 - progress)
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, config.max_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """Set up a run (all checks happen here, before any training) and run it with :meth:`run`."""

    def __init__(self, config: TrainConfig, resume: bool = False, at_step: int | None = None):
        """``resume`` continues from the newest checkpoint in ``out_dir``; ``at_step`` loads checkpoint
        ``step_<at_step>`` instead and touches nothing else in ``out_dir`` (for :meth:`export_snapshot`
        while the run itself may still be training there)."""
        self.config = config
        self.out_dir = Path(config.out_dir)
        if config.cpu_threads:
            torch.set_num_threads(config.cpu_threads)
        self.dist = distributed.init(config.device)
        self.device = self.dist.device
        self.step = 0

        resume_from = self._check_out_dir(resume) if at_step is None else self._find_checkpoint(at_step)
        stage_cls = stage_class(config.stage)
        options = parse_stage_options(config, stage_cls.Options)
        if config.precision != "fp32" and self.device.type == "cpu":
            warnings.warn(f"precision {config.precision} on CPU: autocast works but is slow", stacklevel=2)
        # Building the dataset checks its path now, not after the models have loaded.
        self._datasets = {config.data.resolution_at(0): build_dataset(config.data, config.data.resolution_at(0))}

        seed_everything(config.seed)
        self.stage = stage_cls(config, options, self.device)
        self.stage.check_compatible()
        self.modules = self.stage.trainable_modules()
        self.state_modules = self.stage.state_modules()
        clash = set(self.modules) & set(self.state_modules)
        if clash:
            raise ValueError(f"stage {config.stage}: module names used twice: {sorted(clash)}")
        self.params = {name: [p for p in m.parameters() if p.requires_grad] for name, m in self.modules.items()}
        seen: set[int] = set()
        for name, params in self.params.items():
            if not params:
                raise ValueError(f"stage {config.stage}: trainable module {name!r} has no trainable parameters")
            if seen & {id(p) for p in params}:
                raise ValueError(f"stage {config.stage}: optimizer {name!r} shares parameters with another one")
            seen |= {id(p) for p in params}
        if config.gradient_checkpointing:
            self._enable_gradient_checkpointing()

        self.optimizers, self.base_lr = {}, {}
        for name, params in self.params.items():
            optim = config.optim.model_copy(update=self.stage.optimizer_options(name))
            self.base_lr[name] = optim.lr
            fused = self.device.type == "cuda"
            self.optimizers[name] = torch.optim.AdamW(
                params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay, fused=fused
            )
        self.grad_clip = {name: config.optim.model_copy(update=self.stage.optimizer_options(name)).grad_clip
                          for name in self.modules}
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None

        if resume_from is not None:
            self._restore(resume_from)
        else:
            for module in [*self.modules.values(), *self.state_modules.values()]:
                distributed.broadcast_module(module, self.dist)
            seed_everything(config.seed + self.dist.rank)
        self.resumed_at = self.step if resume_from is not None else None

    # -- setup helpers ------------------------------------------------------------------------
    def _check_out_dir(self, resume: bool) -> Path | None:
        if self.dist.is_main:
            checkpoint.clean_partial(self.out_dir)
        distributed.barrier(self.dist)
        found = checkpoint.latest(self.out_dir)
        if resume and found is None:
            raise ConfigError(f"--resume: no checkpoint in {self.out_dir / checkpoint.CHECKPOINTS}")
        if not resume and found is not None:
            raise ConfigError(
                f"{self.out_dir} already holds checkpoints (latest: {found.name}); "
                "pass --resume to continue that run, or choose another --out"
            )
        if found is not None:
            self._check_written_by_this_config(found)
        return found

    def _find_checkpoint(self, step: int) -> Path:
        found = {checkpoint.step_of(p): p for p in checkpoint.checkpoint_dirs(self.out_dir)}
        if step not in found:
            have = ", ".join(map(str, found)) or "none"
            where = self.out_dir / checkpoint.CHECKPOINTS
            raise ConfigError(f"no checkpoint at step {step} in {where} (steps: {have})")
        self._check_written_by_this_config(found[step])
        return found[step]

    def _check_written_by_this_config(self, found: Path) -> None:
        state = checkpoint.read_state(found)
        if state.get("config_hash") != config_hash(self.config):
            changed = config_diff(state.get("config", {}), training_identity(self.config))
            raise ConfigError(
                f"{found} was written by a different config; changed keys:\n  "
                + "\n  ".join(changed or ["(unknown: the checkpoint has no config)"])
                + f"\nonly these may change on resume: {', '.join(sorted(RESUMABLE_KEYS))}"
            )

    def _enable_gradient_checkpointing(self) -> None:
        from diffusers.models.modeling_utils import ModelMixin

        count = 0
        for module in self.modules.values():
            for m in module.modules():
                if isinstance(m, ModelMixin) and getattr(m, "_supports_gradient_checkpointing", False):
                    m.enable_gradient_checkpointing()
                    count += 1
        if not count:
            warnings.warn("gradient_checkpointing: no trainable model of this stage supports it", stacklevel=2)

    def _restore(self, path: Path) -> None:
        state = checkpoint.load(path, {**self.modules, **self.state_modules}, self.optimizers)
        self.step = int(state["step"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.dist.world:
            checkpoint.set_rng_state(rngs[self.dist.rank])
        else:
            warnings.warn(
                f"resuming with {self.dist.world} process(es) instead of {len(rngs)}: the data order and "
                "random draws differ from an uninterrupted run",
                stacklevel=2,
            )
            seed_everything(self.config.seed + self.dist.rank + self.step)

    # -- the loop -----------------------------------------------------------------------------
    def _batches(self, resolution: int):
        cfg = self.config
        dataset = self._datasets.pop(resolution, None) or build_dataset(cfg.data, resolution)
        dataset = self.stage.prepare_dataset(dataset, resolution)
        loader = make_loader(
            dataset,
            cfg.batch_size,
            cfg.seed,
            self.dist.rank,
            self.dist.world,
            start_step=self.step,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        return iter(loader)

    @contextlib.contextmanager
    def _only(self, name: str):
        """Only optimizer ``name``'s parameters require grad inside (see stages/base.py)."""
        others = [p for other, params in self.params.items() if other != name for p in params]
        for p in others:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in others:
                p.requires_grad_(True)

    def _train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        factor = lr_factor(self.step, self.config)
        autocast = (
            torch.autocast(self.device.type, dtype=_AUTOCAST[self.config.precision])
            if self.config.precision in _AUTOCAST
            else contextlib.nullcontext()
        )
        for name in self.modules:
            optimizer, params = self.optimizers[name], self.params[name]
            for group in optimizer.param_groups:
                group["lr"] = self.base_lr[name] * factor
            optimizer.zero_grad(set_to_none=True)
            with self._only(name), autocast:
                loss, values = self.stage.loss(name, batch, self.step)
            metrics.update(values)
            if not loss.requires_grad:
                continue
            if self.scaler is None and not torch.isfinite(loss):
                raise FloatingPointError(
                    f"step {self.step}: {name} loss is {loss.item()}; the last checkpoint is intact "
                    "(lower optim.lr or raise warmup_steps, then --resume)"
                )
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            distributed.average_gradients(params, self.dist)
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            if self.grad_clip[name]:
                norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip[name])
                metrics[f"grad_norm/{name}"] = float(norm)
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()
        self.stage.on_step_end(self.step)
        return metrics

    def _set_train(self) -> None:
        for module in self.modules.values():
            module.train()

    def save_checkpoint(self) -> None:
        # Data parallelism must keep every replica identical; a checkpoint is where that is checked.
        distributed.check_replicas({**self.modules, **self.state_modules}, self.dist)
        rngs = distributed.gather_objects(checkpoint.rng_state(), self.dist)
        if not self.dist.is_main:
            return
        state = {
            "stage": self.config.stage,
            "config_hash": config_hash(self.config),
            "config": training_identity(self.config),
            "world_size": self.dist.world,
            "rng": rngs,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "time": time.time(),
        }
        modules = {**self.modules, **self.state_modules}
        checkpoint.save(self.out_dir, self.step, modules, self.optimizers, state, self.config.keep_checkpoints)

    def evaluate(self, logger: RunLogger | None) -> None:
        if not self.dist.is_main:
            return
        with torch.no_grad():
            values = self.stage.evaluate(self.step, self.out_dir)
        self._set_train()
        if values and logger is not None:
            logger.log(self.step, {f"eval/{k}": v for k, v in values.items()})

    def export_snapshot(self) -> Path:
        """The product as of this step, at ``out_dir/<product>-<step>steps`` (replacing an older one)."""
        with tempfile.TemporaryDirectory(dir=self.out_dir, prefix=".snapshot-") as tmp:
            product = self.stage.export(Path(tmp))
            target = self.out_dir / f"{product.name}-{self.step}steps"
            shutil.rmtree(target, ignore_errors=True)
            product.rename(target)
        self._set_train()
        return target

    def run(self) -> Path | None:
        """Train to ``max_steps``, then export; returns the exported product's path (rank 0)."""
        cfg, main = self.config, self.dist.is_main
        logger = None
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            logger = RunLogger(self.out_dir, resume_step=self.resumed_at, tensorboard=cfg.tensorboard)
        self._set_train()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        resolution, batches = None, None
        last_eval = last_ckpt = None
        t_log, steps_since = time.perf_counter(), 0
        with tqdm(total=cfg.max_steps, initial=self.step, disable=not main, desc=cfg.stage, dynamic_ncols=True) as bar:
            while self.step < cfg.max_steps:
                if cfg.data.resolution_at(self.step) != resolution:
                    resolution = cfg.data.resolution_at(self.step)
                    batches = self._batches(resolution)
                batch = _to_device(next(batches), self.device)
                values = self._train_step(batch)
                self.step += 1
                steps_since += 1
                for k, v in values.items():
                    sums[k] += v
                    counts[k] += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    means = distributed.mean_over_processes({k: sums[k] / counts[k] for k in sums}, self.dist)
                    elapsed = time.perf_counter() - t_log
                    means["lr"] = self.base_lr[next(iter(self.base_lr))] * lr_factor(self.step - 1, cfg)
                    means["steps_per_s"] = steps_since / max(elapsed, 1e-9)
                    means["resolution"] = float(resolution)
                    if logger is not None:
                        logger.log(self.step, means)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in means.items() if k.startswith("loss")})
                    sums.clear()
                    counts.clear()
                    t_log, steps_since = time.perf_counter(), 0
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.evaluate(logger)
                    last_eval = self.step
                if self.step % cfg.ckpt_every == 0:
                    self.save_checkpoint()
                    last_ckpt = self.step
                if main and self.step in cfg.export_at:
                    self.export_snapshot()
        if last_ckpt != self.step:
            self.save_checkpoint()
        if last_eval != self.step:
            self.evaluate(logger)
        product = None
        if main:
            product = self.stage.export(self.out_dir)
            logger.close()
            curve = plot_losses(self.out_dir / "metrics.csv", self.out_dir / LOSS_CURVE)
            note = f"; loss curve: {curve}" if curve else ""
            if self.dist.enabled:
                note += f"; weights identical on all {self.dist.world} processes"
            print(f"{cfg.stage}: {self.step} steps done; product: {product}{note}")
        distributed.barrier(self.dist)
        return product


def train(config: TrainConfig, resume: bool = False) -> Path | None:
    """Set up and run one training run; the process group (if any) is left on exit."""
    try:
        return Trainer(config, resume).run()
    finally:
        distributed.shutdown()
