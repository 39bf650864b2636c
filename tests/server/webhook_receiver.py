"""A webhook receiver for the tests: an HTTP server on 127.0.0.1 that records what it gets, and the signature
check a receiver makes, written from the Standard Webhooks spec (not with the server's code)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request; ``fail_first`` answers ``fail_status`` to the
    first N requests; ``statuses`` maps a path to a fixed answer."""

    def __init__(self, fail_first: int = 0, fail_status: int = 500, headers: dict[str, str] | None = None):
        self.requests: list[dict] = []
        self.fail_first, self.fail_status, self.extra_headers = fail_first, fail_status, headers or {}
        self.statuses: dict[str, int] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "time": time.monotonic()})  # fmt: skip
                    failing = len(receiver.requests) <= receiver.fail_first
                status = receiver.statuses.get(self.path, receiver.fail_status if failing else 200)
                self.send_response(status)
                for name, value in receiver.extra_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[dict]:
        """The requests received at ``path``, in arrival order, each with its JSON body as ``json``."""
        with self._lock:
            return [{**r, "json": json.loads(r["body"])} for r in self.requests if r["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def spec_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check, from the spec: HMAC-SHA256 with the base64-decoded secret (without whsec_) over
    ``{webhook-id}.{webhook-timestamp}.{body}``, base64, compared with each ``v1,`` entry of webhook-signature."""
    h = {k.lower(): v for k, v in headers.items()}
    key = base64.b64decode(secret.removeprefix("whsec_"))
    content = h["webhook-id"].encode() + b"." + h["webhook-timestamp"].encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    entries = [e.split(",", 1) for e in h["webhook-signature"].split(" ")]
    return any(version == "v1" and hmac.compare_digest(sig, expected) for version, sig in entries)
