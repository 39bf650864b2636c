"""Encoding generated images into files: the bytes ``snapgen generate`` writes and the server returns."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .request import OUTPUT_FORMATS

QUALITY = 90  # JPEG and WebP


def encode_image(array: np.ndarray, fmt: str = "png") -> bytes:
    """A uint8 (H, W, 3) image as ``fmt`` (png, jpeg or webp) file bytes."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; allowed: {', '.join(OUTPUT_FORMATS)}")
    buffer = io.BytesIO()
    options = {} if fmt == "png" else {"quality": QUALITY}
    Image.fromarray(array).save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()
