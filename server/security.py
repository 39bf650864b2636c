"""API keys, rate limits, request size limits, safe names, and the bind-address rule.

- Keys are Bearer tokens from ``SNAPGEN_API_KEYS`` / ``SNAPGEN_API_KEYS_FILE``. When any is
  configured every ``/v1`` route needs one (401 without, 403 with an unknown one). Keys are kept
  only as SHA-256 digests; a key is known to logs, metrics and Redis by a short id (a digest prefix).
- No keys: authentication is off, which ``snapgen serve`` allows only on a loopback address
  unless ``--allow-unauthenticated`` says otherwise.
- Rate limit: fixed one-minute windows per key (per client address without keys), counted in the
  queue's store, so several API processes share one budget.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class ApiKeys:
    def __init__(self, keys: list[str]):
        self._digests = {hashlib.sha256(k.encode()).digest(): key_id(k) for k in keys if k}

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def lookup(self, token: str) -> str | None:
        """The key's id, or None. Compares digests in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, ident in self._digests.items():
            if hmac.compare_digest(known, digest):
                found = ident
        return found


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def safe_name(name: str) -> bool:
    """A plain file name: no separators, no leading dot, no '..' (used for downloads)."""
    return bool(SAFE_NAME.match(name)) and ".." not in name


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes``, whether declared (Content-Length) or streamed.

    The body is read here first (it is small when it is allowed) and replayed to the app.
    """

    def __init__(self, app, max_bytes: int, on_reject, path_limits: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}  # larger limits for the routes that take an input image
        self.on_reject = on_reject  # async (scope, send, limit) -> None, sends the 413

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.max_bytes)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await self.on_reject(scope, send, limit)
                    return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self.on_reject(scope, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
