"""ASGI middleware: request metrics, the request body size limit, CORS."""

import time

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import metrics
from ..security import BodySizeLimit
from ..settings import Settings
from .errors import METHODS, respond

IMAGE_ROUTES = ("/v1/generate", "/v1/images/edits")  # the routes whose bodies may carry an input image

# Label values must stay few: the method is client-chosen and the metrics run before authentication.
OTHER_METHOD = "other"
UNMATCHED_ROUTE = "unmatched"


def labels(scope) -> tuple[str, str]:
    """(route template, method) for a request: bounded values, never the raw path or a made-up method."""
    route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
    method = scope.get("method", "GET")
    return route, method if method in METHODS else OTHER_METHOD


class RequestMetrics:
    """Counts every request by route template, method and status, and times it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        metrics.API.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            metrics.API.in_flight.dec()
            route, method = labels(scope)
            metrics.API.requests.labels(route, method, str(status["code"])).inc()
            metrics.API.request_duration.labels(route, method).observe(time.perf_counter() - start)


async def _no_receive():
    return {"type": "http.disconnect"}


def install(app: FastAPI, settings: Settings) -> None:
    """The middleware stack; the last added runs first: metrics, then CORS, then the body limit."""

    async def reject_body(scope, send, limit):
        response = respond(
            scope.get("path", ""),
            413,
            "payload_too_large",
            f"the request body is larger than {limit} bytes",
            headers={"Connection": "close"},
        )
        await response(scope, _no_receive, send)

    # Base64 (JSON) or multipart: an input image takes at most 4/3 of its size, plus the form's parts.
    with_image = settings.max_body_bytes + settings.max_image_bytes * 4 // 3 + 4096
    path_limits = dict.fromkeys(IMAGE_ROUTES, with_image)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, on_reject=reject_body, path_limits=path_limits)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Prefer", "Range", "If-None-Match"],
            expose_headers=[
                "Location",
                "Retry-After",
                "ETag",
                "Content-Range",
                "X-Job-Id",
                "X-Seed",
                "X-Seeds",
                "X-Content-SHA256",
                "Preference-Applied",
            ],  # fmt: skip
        )
    app.add_middleware(RequestMetrics)
