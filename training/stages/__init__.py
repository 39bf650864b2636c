"""Registry of the recipe's stages, imported lazily so `snapgen train decoder` never imports the teacher."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # base imports torch; `snapgen --help` should not pay for that
    from .base import Stage

STAGES: dict[str, str] = {
    "autoencoder": "training.stages.autoencoder:AutoencoderStage",
    "decoder": "training.stages.decoder:DecoderStage",
    "pretrain": "training.stages.pretrain:PretrainStage",
    "teacher": "training.stages.teacher:TeacherStage",
    "kd": "training.stages.kd:KDStage",
    "ladd": "training.stages.ladd:LADDStage",
}


def stage_class(name: str) -> type[Stage]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["STAGES", "stage_class"]
