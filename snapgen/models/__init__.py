"""SnapGen models: U-Net, tiny decoder and small autoencoder."""

from .autoencoder import LatentDecoder, LatentEncoder, SmallAutoencoder, load_decoder, load_encoder
from .configs import LADDER, UNET_CONFIGS, build_unet, count_parameters, unet_config
from .tiny_decoder import TinyDecoder
from .unet import SnapGenUNet, SnapGenUNetOutput

__all__ = [
    "LADDER",
    "UNET_CONFIGS",
    "LatentDecoder",
    "LatentEncoder",
    "SmallAutoencoder",
    "SnapGenUNet",
    "SnapGenUNetOutput",
    "TinyDecoder",
    "build_unet",
    "count_parameters",
    "load_decoder",
    "load_encoder",
    "unet_config",
]
