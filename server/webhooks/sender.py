"""One attempt of one delivery: resolve and check the host, connect to a checked address, POST, classify."""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .policy import WebhookPolicy, WebhookRefused, WebhookUnresolvable
from .signing import parse_secret, signature_header

USER_AGENT = "snapgen-webhooks/1"
DELIVERED, RETRY, GIVE_UP, REFUSED = "delivered", "retry", "give_up", "refused"


@dataclass
class Attempt:
    outcome: str  # DELIVERED, RETRY, GIVE_UP (the receiver said no for good), REFUSED (the URL is not allowed)
    status: int | None = None  # the HTTP status, None without an answer
    detail: str = ""
    retry_after_s: float | None = None


def classify(status: int) -> str:
    """Any 2xx is delivered. 408, 429 and 5xx are worth retrying; any other answer (3xx: redirects are not
    followed, 4xx: the receiver refuses this request) gives up at once: the same request would get the same."""
    if 200 <= status < 300:
        return DELIVERED
    if status in (408, 429) or status >= 500:
        return RETRY
    return GIVE_UP


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to an address that was checked, whatever the name resolves to by now."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # SNI and certificate: the name


class Sender:
    """One attempt of one delivery: resolve, check, connect to a checked address, POST, classify the answer."""

    def __init__(self, secrets: Sequence[str], policy: WebhookPolicy, timeout_s: float = 10.0):
        if not secrets:
            raise ValueError("a webhook sender needs at least one secret")
        self.keys = [parse_secret(s) for s in secrets]
        self.policy = policy
        self.timeout_s = timeout_s
        self._tls = ssl.create_default_context()

    def headers(self, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        timestamp = int(time.time()) if timestamp is None else timestamp
        return {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(self.keys, msg_id, timestamp, body),
        }

    def send(self, url: str, msg_id: str, body: bytes) -> Attempt:
        try:
            target, addresses = self.policy.resolve(url)
        except WebhookUnresolvable as e:
            return Attempt(RETRY, detail=str(e))
        except WebhookRefused as e:
            return Attempt(REFUSED, detail=str(e))
        headers = self.headers(msg_id, body)
        last = "no address"
        for address in addresses:
            if target.scheme == "https":
                conn = _PinnedHTTPS(target.host, target.port, address, self.timeout_s, self._tls)
            else:
                conn = _PinnedHTTP(target.host, target.port, address, self.timeout_s)
            # The socket timeout bounds each read; this bounds the whole attempt (a receiver that trickles bytes).
            watchdog = threading.Timer(self.timeout_s, _shut, (conn,))
            watchdog.start()
            try:
                try:
                    conn.connect()
                except OSError as e:
                    last = f"cannot connect to {address}: {e}"
                    continue  # the next address, if the name has several
                conn.request("POST", target.path, body=body, headers=headers)
                response = conn.getresponse()
                status, retry_after = response.status, _retry_after(response.getheader("Retry-After"))
                return Attempt(classify(status), status, f"HTTP {status} {response.reason}", retry_after)
            except (OSError, http.client.HTTPException) as e:
                return Attempt(RETRY, detail=f"{type(e).__name__}: {e}")
            finally:
                watchdog.cancel()
                conn.close()
        return Attempt(RETRY, detail=last)


def _shut(conn: http.client.HTTPConnection) -> None:
    with contextlib.suppress(OSError, AttributeError):
        conn.sock.shutdown(socket.SHUT_RDWR)


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None  # the HTTP-date form is rare from receivers; the backoff covers it
