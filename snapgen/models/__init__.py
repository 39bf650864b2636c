"""SnapGen models: U-Net, tiny decoder and small autoencoder.

The public names resolve on first use, so importing one submodule (``snapgen.models.unet``) does not
import the others: a model directory loads only the classes it names.
"""

import importlib

_EXPORTS = {
    "LADDER": "configs",
    "UNET_CONFIGS": "configs",
    "LatentDecoder": "autoencoder",
    "LatentEncoder": "autoencoder",
    "SmallAutoencoder": "autoencoder",
    "SnapGenUNet": "unet",
    "SnapGenUNetOutput": "unet",
    "TinyDecoder": "tiny_decoder",
    "build_unet": "configs",
    "count_parameters": "configs",
    "load_decoder": "autoencoder",
    "load_encoder": "autoencoder",
    "unet_config": "configs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
