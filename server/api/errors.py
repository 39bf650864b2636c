"""Errors: every one is ``{"error": {"code", "message", "field"?}}``, whatever raised it.

:class:`APIError` is what handlers raise; the exception handlers here turn it, FastAPI's
validation errors, Starlette's HTTP errors, an unreachable queue and any crash into that envelope.
"""

import email.message
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..queue import QueueUnavailable
from .schemas import MAX_N, MAX_SEED, GenerateRequest

log = logging.getLogger("snapgen.api")


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def error_response(status: int, code: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return JSONResponse({"error": error}, status_code=status, headers=headers)


HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

ALLOWED = {
    "n": f"an integer from 1 to {MAX_N}",
    "steps": "an integer >= 1, at most the model's max_steps (GET /v1/models)",
    "seed": f"an integer from 0 to {MAX_SEED}",
    "guidance_scale": "a finite number >= 0",
    "width": "one of the model's sizes (GET /v1/models)",
    "height": "one of the model's sizes (GET /v1/models)",
    "output_format": "png, jpeg or webp",
    "response_format": "b64_json or url",
    "prompt": "a non-empty string",
    "negative_prompt": "a string",
}


def is_json(content_type: str) -> bool:
    """Whether FastAPI parses a body of this type as JSON: application/json or application/*+json."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def validation_error(exc: RequestValidationError) -> JSONResponse:
    """A 422 naming the first invalid field and what it allows."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return error_response(422, "invalid_request", "the body is not valid JSON", field="body")
    if kind in ("missing", "model_attributes_type", "dict_type") and not loc:
        return error_response(422, "invalid_request", "send a JSON object body, e.g. {\"prompt\": \"a red circle\"}",
                              field="body")  # fmt: skip
    field = ".".join(loc) or None
    if kind == "extra_forbidden":
        allowed = ", ".join(GenerateRequest.model_fields)
        message = f"unknown field {field!r}; allowed fields: {allowed}"
    else:
        message = f"{field}: {first.get('msg', 'invalid')}" if field else first.get("msg", "invalid request")
        if loc and loc[0] == "header":
            message = f"header {loc[-1]}: {first.get('msg', 'invalid')}"
        elif field in ALLOWED:
            message += f"; allowed: {ALLOWED[field]}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return error_response(422, "invalid_request", message, field=field)


# The standard methods (RFC 9110 §9): what a 405's Allow may list (HEAD only where a route registers it: FastAPI
# does not add it to GET routes), and the method label values of the request metrics.
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (a path can be served by several registrations).

    Asks each top-level route whether it would fully match the request with another method, so
    routes inside included routers count too, however FastAPI nests them.
    """
    allowed = []
    for method in METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def on_queue_unavailable(request: Request, exc: QueueUnavailable) -> JSONResponse:
    # The queue says what is wrong (unreachable, out of memory, ...); the client only has to retry.
    reason = str(exc).rstrip(". ") or "the job queue (Redis) is unavailable"
    retry = str(getattr(exc, "retry_after_s", 1))
    return error_response(503, "queue_unavailable", f"{reason}. Retry shortly.", headers={"Retry-After": retry})


async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    on_body = any(e.get("loc", ("",))[0] == "body" for e in exc.errors())
    if on_body and content_type and not is_json(content_type):
        return error_response(
            415,
            "unsupported_media_type",
            f"send the body as JSON with Content-Type: application/json (got {content_type!r})",
        )
    return validation_error(exc)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 404:
        message = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        # Starlette's Allow names the methods of the one registration it matched, not of the path.
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(exc.status_code, code, message, headers=headers or None)


async def on_crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "an internal error occurred; it was logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(QueueUnavailable, on_queue_unavailable)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_crash)
