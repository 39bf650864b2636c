"""Input images sent to the API (image-to-image): decoded from the body and checked before a job is queued."""

import base64
import binascii
import re

from snapgen.image_files import open_input_image

from .errors import APIError

DATA_URL = re.compile(r"^data:image/(png|jpeg|webp);base64,", re.IGNORECASE)


def decode_base64_image(text: str, field: str = "image") -> bytes:
    """The bytes of a base64 image, plain or as a ``data:image/...;base64,`` URL (422 naming ``field``)."""
    match = DATA_URL.match(text)
    payload = text[match.end() :] if match else text
    if not match and text.startswith("data:"):
        raise APIError(422, "invalid_request", f"{field}: a data: URL must be data:image/png|jpeg|webp;base64,...",
                       field=field)  # fmt: skip
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(422, "invalid_request", f"{field}: not valid base64; send base64 of a PNG, JPEG or WebP "
                       "file, or a data: URL", field=field) from None  # fmt: skip


def read_input_image(data: bytes, field: str = "image", max_bytes: int | None = None) -> bytes:
    """``data`` unchanged when it is a PNG, JPEG or WebP the worker can decode; else 413/422 naming ``field``."""
    if max_bytes is not None and len(data) > max_bytes:
        raise APIError(413, "payload_too_large", f"{field}: the image has {len(data)} bytes; at most {max_bytes} "
                       "are allowed", field=field)  # fmt: skip
    try:
        open_input_image(data)
    except ValueError as e:
        raise APIError(422, "invalid_request", f"{field}: the image {e}", field=field) from None
    return data
