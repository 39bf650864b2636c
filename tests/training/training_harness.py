"""Helpers shared by the training tests: micro configs with overrides, and a fixed-batch loss.

A module of its own (not conftest.py) so that `from training_harness import ...` can never pick up
another directory's conftest when several test directories are collected together.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml

from training.config import TrainConfig, parse_config

REPO = Path(__file__).resolve().parents[2]
MICRO = REPO / "configs" / "micro"
UPSTREAM_KEYS = {"autoencoder": "autoencoder", "encoder": "autoencoder", "teacher": "teacher", "init_from": "kd"}


def _merge(base: dict, changes: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def micro_dict(name: str, root: Path, upstream: dict[str, Path] | None = None, **changes) -> dict:
    data = yaml.safe_load((MICRO / f"{name}.yaml").read_text())
    data["out_dir"] = str(Path(root) / name)
    for key, product in UPSTREAM_KEYS.items():
        if key in data.get("stage_options", {}) and upstream and product in upstream:
            data["stage_options"][key] = str(upstream[product])
    return _merge(data, changes)


def micro_config(name: str, root: Path, upstream: dict[str, Path] | None = None, **changes) -> TrainConfig:
    return parse_config(micro_dict(name, root, upstream, **changes), f"micro/{name}")


def fixed_loss(trainer, batch_size: int = 8, seed: int = 1234) -> float:
    """The stage's first loss on the first ``batch_size`` items at the final resolution, with
    fixed random draws (noise, t, dropout), leaving the trainer's RNG as it was."""
    from training.data import build_dataset, collate

    stage, cfg = trainer.stage, trainer.config
    resolution = cfg.data.resolutions()[-1]
    dataset = stage.prepare_dataset(build_dataset(cfg.data, resolution), resolution)
    batch = collate([dataset[i] for i in range(batch_size)])
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        loss, _ = stage.loss(next(iter(stage.trainable_modules())), batch, 0)
    torch.set_rng_state(state)
    return float(loss)
