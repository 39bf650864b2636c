"""Shared fixtures: the micro configs of ``configs/micro/`` run in-process, outputs in tmp dirs.

``micro_config(stage, root, **changes)`` loads ``configs/micro/STAGE.yaml``, points ``out_dir``
into ``root`` and the upstream products (autoencoder, teacher) at fixtures' outputs, and
applies ``changes`` (nested dicts merge). The session fixtures train each upstream product once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.loop import train

# One thread: on a shared 2-core machine OpenMP's spinning threads make a step up to 30x
# slower in CPU time than a single thread (measured on the micro configs).
torch.set_num_threads(1)

from training_harness import fixed_loss, micro_config  # noqa: E402


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
    """(trainer, loss before, loss after, product) of the pretrain micro run (30 steps, uninterrupted;
    a snapshot of the product exported at step 20)."""
    from training.loop import Trainer

    trainer = Trainer(micro_config("pretrain", micro_root, {"autoencoder": micro_autoencoder}, export_at=[20]))
    before = fixed_loss(trainer)
    product = trainer.run()
    return trainer, before, fixed_loss(trainer), product
