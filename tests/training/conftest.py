"""Shared fixtures: the micro configs of ``configs/micro/`` run in-process, outputs in tmp dirs.

``micro_config(stage, root, **changes)`` loads ``configs/micro/STAGE.yaml``, points ``out_dir``
into ``root`` and the upstream products (autoencoder, teacher) at fixtures' outputs, and
applies ``changes`` (nested dicts merge). The session fixtures train each upstream product once.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from training.config import TrainConfig, parse_config
from training.loop import train

# One thread: on a shared 2-core machine OpenMP's spinning threads make a step up to 30x
# slower in CPU time than a single thread (measured on the micro configs).
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def micro_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("micro")


@pytest.fixture(scope="session")
def micro_autoencoder(micro_root) -> Path:
    """The autoencoder micro run's product (a SmallAutoencoder directory)."""
    return train(micro_config("autoencoder", micro_root))


@pytest.fixture(scope="session")
def micro_teacher_run(micro_root, micro_autoencoder):
    """(trainer, loss before, loss after, product) of the teacher micro run."""
    from training.loop import Trainer

    trainer = Trainer(micro_config("teacher", micro_root, {"autoencoder": micro_autoencoder}))
    before = fixed_loss(trainer)
    product = trainer.run()
    return trainer, before, fixed_loss(trainer), product


@pytest.fixture(scope="session")
def micro_teacher(micro_teacher_run) -> Path:
    """The teacher micro run's product (``teacher/`` with ``transformer/``), for the KD/LADD stages."""
    return micro_teacher_run[3]


@pytest.fixture(scope="session")
def micro_pretrain_run(micro_root, micro_autoencoder):
    """(trainer, loss before, loss after, product) of the pretrain micro run (30 steps, uninterrupted)."""
    from training.loop import Trainer

    trainer = Trainer(micro_config("pretrain", micro_root, {"autoencoder": micro_autoencoder}))
    before = fixed_loss(trainer)
    product = trainer.run()
    return trainer, before, fixed_loss(trainer), product
