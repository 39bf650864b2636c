"""Generated images as files: the bytes ``snapgen generate`` writes and the server returns, with the
generation parameters inside.

A PNG carries two text chunks:

- ``parameters``: the AUTOMATIC1111 convention most image tools show (the prompt, a line
  ``Negative prompt: ...``, then ``Steps: 4, Sampler: Euler, CFG scale: 1.0, Seed: 3, Size: 128x128,
  Model hash: ..., Model: ...``);
- ``snapgen``: the exact values as JSON (:func:`image_parameters`), which ``snapgen info IMAGE.png``
  prints and ``snapgen generate --from IMAGE.png`` reads to make the same image again, byte for byte.

JPEG and WebP files carry no parameters.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from . import __version__
from .request import OUTPUT_FORMATS, ResolvedRequest

QUALITY = 90  # JPEG and WebP
PARAMETERS_CHUNK = "parameters"
SNAPGEN_CHUNK = "snapgen"


def image_parameters(request: ResolvedRequest, index: int, model: str, unet_sha256: str | None) -> dict[str, Any]:
    """What made image ``index`` of ``request``: enough to make it again with the same model."""
    parameters = {
        "prompt": request.prompts[index],
        "negative_prompt": request.negative_prompts[index],
        "seed": request.seeds[index],
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "width": request.width,
        "height": request.height,
        "model": model,
        "unet_sha256": unet_sha256,
        "snapgen_version": __version__,
    }
    if request.strength is not None:
        parameters["strength"] = request.strength  # image-to-image: the input image is not in the file
    return parameters


def a1111_text(p: dict[str, Any]) -> str:
    """The parameters in AUTOMATIC1111's ``parameters`` text form."""
    fields = [f"Steps: {p['steps']}", "Sampler: Euler", f"CFG scale: {p['guidance_scale']}", f"Seed: {p['seed']}",
              f"Size: {p['width']}x{p['height']}"]  # fmt: skip
    if p.get("unet_sha256"):
        fields.append(f"Model hash: {p['unet_sha256'][:10]}")
    fields.append(f"Model: {p['model']}")
    if p.get("strength") is not None:
        fields.append(f"Denoising strength: {p['strength']}")
    fields.append(f"Version: snapgen {p['snapgen_version']}")
    lines = [p["prompt"]]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    return "\n".join([*lines, ", ".join(fields)])


def encode_image(array: np.ndarray, fmt: str = "png", parameters: dict[str, Any] | None = None) -> bytes:
    """A uint8 (H, W, 3) image as ``fmt`` (png, jpeg or webp) file bytes; a PNG carries ``parameters``."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; allowed: {', '.join(OUTPUT_FORMATS)}")
    buffer = io.BytesIO()
    options: dict[str, Any] = {} if fmt == "png" else {"quality": QUALITY}
    if fmt == "png" and parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(PARAMETERS_CHUNK, a1111_text(parameters))
        info.add_text(SNAPGEN_CHUNK, json.dumps(parameters, sort_keys=True, separators=(",", ":")))
        options["pnginfo"] = info
    Image.fromarray(array).save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def read_parameters(source: str | os.PathLike | bytes) -> dict[str, Any] | None:
    """The ``snapgen`` parameters of an image file (None when it has none)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        text = image.info.get(SNAPGEN_CHUNK)
    return json.loads(text) if text else None


# -- input images (image-to-image) and step previews -------------------------------------------------
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_INPUT_PIXELS = 4096 * 4096  # larger images are refused before they are decoded (decompression bombs)
PREVIEW_SIDE = 256
PREVIEW_QUALITY = 70


def open_input_image(data: bytes) -> Image.Image:
    """An uploaded image, checked: a PNG, JPEG or WebP of at most :data:`MAX_INPUT_PIXELS` pixels, as RGB.
    Raises ValueError saying what is wrong."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:
        raise ValueError("is not an image file; send a PNG, JPEG or WebP") from None
    if image.format not in INPUT_FORMATS:
        raise ValueError(f"is a {image.format} file; send a PNG, JPEG or WebP")
    if image.width * image.height > MAX_INPUT_PIXELS:
        raise ValueError(f"has {image.width}x{image.height} pixels; at most {MAX_INPUT_PIXELS} are allowed")
    try:
        image.load()
    except Exception as e:
        raise ValueError(f"could not be decoded ({type(e).__name__}); send a complete PNG, JPEG or WebP") from None
    return image.convert("RGB")


def fit_input_image(data: bytes, width: int, height: int) -> np.ndarray:
    """An uploaded image as a uint8 (height, width, 3) array: cut to the target's aspect ratio around its
    centre, then resized (Lanczos). Raises ValueError as :func:`open_input_image` does."""
    image = open_input_image(data)
    scale = max(width / image.width, height / image.height)
    crop_w, crop_h = width / scale, height / scale
    left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
    box = (left, top, left + crop_w, top + crop_h)
    return np.asarray(image.resize((width, height), Image.Resampling.LANCZOS, box=box))


def encode_preview(array: np.ndarray) -> bytes:
    """A small JPEG of a uint8 (H, W, 3) image, for live progress: at most :data:`PREVIEW_SIDE` pixels a side."""
    image = Image.fromarray(array)
    image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    return buffer.getvalue()
