"""Standard Webhooks signatures (https://www.standardwebhooks.com/): the secret, signing, and the check a
receiver makes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping, Sequence

MAKE_ONE = "make one with: python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""


class WebhookVerificationError(ValueError):
    pass


def parse_secret(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (the prefix is optional). Raises ValueError."""
    text = secret.strip()
    text = text[len("whsec_") :] if text.startswith("whsec_") else text
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError(f"a webhook secret is whsec_ followed by base64; {MAKE_ONE}") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a webhook secret must hold 24 to 64 bytes (this one has {len(key)}); {MAKE_ONE}")
    return key


def new_secret() -> str:
    """A fresh secret in the spec's form: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One signature: ``v1,`` + base64 of HMAC-SHA256 over ``{id}.{timestamp}.{body}``."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one signature per key (several during a secret rotation)."""
    return " ".join(sign(key, msg_id, timestamp, body) for key in keys)


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_s: float = 300, now: float | None = None):
    """What a receiver does: check ``webhook-signature`` against ``secret`` and that ``webhook-timestamp`` is within
    ``tolerance_s`` of now. Raises WebhookVerificationError; returns the parsed JSON body."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, signatures = (lower.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not msg_id or not stamp or not signatures:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {stamp!r} is not unix seconds") from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp is too far from now (a replay?)")
    expected = sign(parse_secret(secret), msg_id, timestamp, body)
    if not any(hmac.compare_digest(s, expected) for s in signatures.split(" ")):
        raise WebhookVerificationError("no signature matches")
    return json.loads(body)
