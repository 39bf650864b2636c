"""Errors: every one is ``{"error": {"code", "message", "field"?}}``, whatever raised it, except on the
OpenAI-compatible routes, which answer in OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

:class:`APIError` is what handlers raise; the exception handlers here turn it, FastAPI's
validation errors, Starlette's HTTP errors, an unreachable queue and any crash into the envelope of
the request's path (:func:`respond`).
"""

import email.message
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..queue import QueueUnavailable
from .openai_schemas import REFUSED
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


# -- OpenAI's envelope -------------------------------------------------------------------------
# On these paths errors look like OpenAI's, so its clients raise their usual exceptions (BadRequestError,
# AuthenticationError, NotFoundError, ...). /v1/models/mobile is ours (the route before /v1/models/{id}).
OPENAI_PATHS = re.compile(r"^/v1/(?:images/(?:generations|edits)|models/(?!mobile$)[^/]+)$")
# OpenAI answers invalid input with 400 and any key problem with 401.
OPENAI_STATUS = {403: 401, 422: 400}
OPENAI_CODES = {
    "unauthorized": "invalid_api_key",
    "forbidden": "invalid_api_key",
    "rate_limited": "rate_limit_exceeded",
    "invalid_request": "invalid_value",
}
# Validation errors get OpenAI's codes for these pydantic error kinds.
OPENAI_VALIDATION_CODES = {"extra_forbidden": "unknown_parameter", "missing": "missing_required_parameter"}


def openai_error_response(status: int, code: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    status = OPENAI_STATUS.get(status, status)
    kind = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": field, "code": OPENAI_CODES.get(code, code)}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def respond(path: str, status: int, code: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    """The error in the envelope of the route at ``path``: OpenAI's on the OpenAI-compatible routes, else ours."""
    envelope = openai_error_response if OPENAI_PATHS.match(path) else error_response
    return envelope(status, code, message, field, headers)


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
    "image": "base64 of a PNG, JPEG or WebP file, or a data:image/...;base64, URL",
    "strength": "a number from 0 to 1, with an image",
    "preview": "true or false",
    "webhook": "an http:// or https:// URL of at most 2048 characters",
    "webhook_events_filter": "a non-empty list of start, output, logs, completed",
}
OPENAI_ALLOWED = {
    **ALLOWED,
    "model": "the served model's id (GET /v1/models)",
    "size": "auto or WIDTHxHEIGHT, one of the model's sizes (GET /v1/models)",
    "background": "auto or opaque (the images are opaque)",
    "output_compression": "an integer from 0 to 100 (ignored)",
    "partial_images": "an integer from 0 to 3 (ignored)",
    "strength": "a number from 0 to 1",
    "image": "one PNG, JPEG or WebP file",
}


def is_json(content_type: str) -> bool:
    """Whether FastAPI parses a body of this type as JSON: application/json or application/*+json."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def route_body(request: Request) -> tuple[type[BaseModel] | None, str]:
    """The matched route's body model (None without one) and the media type it takes."""
    field = getattr(request.scope.get("route"), "body_field", None)
    info = getattr(field, "field_info", None)
    model = getattr(info, "annotation", None)
    model = model if isinstance(model, type) and issubclass(model, BaseModel) else None
    return model, getattr(info, "media_type", "application/json")


def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 (OpenAI's routes: 400) naming the first invalid field and what it allows."""
    path = request.url.path
    openai = bool(OPENAI_PATHS.match(path))
    errors = exc.errors()
    if openai:  # a refused OpenAI field explains itself better than what its absence left missing
        errors = sorted(errors, key=lambda e: str((e.get("loc") or ("",))[-1]) not in REFUSED)
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    kind = first.get("type", "")
    code = OPENAI_VALIDATION_CODES.get(kind, "invalid_request") if openai else "invalid_request"
    if kind == "json_invalid":
        return respond(path, 422, code, "the body is not valid JSON", field="body")
    if kind in ("missing", "model_attributes_type", "dict_type") and not loc:
        return respond(path, 422, code, "send a JSON object body, e.g. {\"prompt\": \"a red circle\"}",
                       field="body")  # fmt: skip
    field = ".".join(loc) or None
    allowed = OPENAI_ALLOWED if openai else ALLOWED
    if kind == "extra_forbidden" and openai and field in REFUSED:
        message = f"{field}: {REFUSED[field]}"
    elif kind == "extra_forbidden":
        fields = ", ".join((route_body(request)[0] or GenerateRequest).model_fields)
        what = ("unknown parameter", "allowed") if openai else ("unknown field", "allowed fields")
        message = f"{what[0]} {field!r}; {what[1]}: {fields}"
    else:
        message = f"{field}: {first.get('msg', 'invalid')}" if field else first.get("msg", "invalid request")
        if loc and loc[0] == "header":
            message = f"header {loc[-1]}: {first.get('msg', 'invalid')}"
        elif field in allowed:
            message += f"; allowed: {allowed[field]}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return respond(path, 422, code, message, field=field)


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
    return respond(request.url.path, exc.status, exc.code, exc.message, exc.field, exc.headers)


async def on_queue_unavailable(request: Request, exc: QueueUnavailable) -> JSONResponse:
    # The queue says what is wrong (unreachable, out of memory, ...); the client only has to retry.
    reason = str(exc).rstrip(". ") or "the job queue (Redis) is unavailable"
    retry = str(getattr(exc, "retry_after_s", 1))
    return respond(request.url.path, 503, "queue_unavailable", f"{reason}. Retry shortly.",
                   headers={"Retry-After": retry})  # fmt: skip


async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    content_type = request.headers.get("content-type", "")
    on_body = any(e.get("loc", ("",))[0] == "body" for e in exc.errors())
    if on_body and content_type:
        if route_body(request)[1] == "multipart/form-data":
            wrong, expected = not content_type.lower().startswith("multipart/form-data"), "multipart/form-data"
        else:
            wrong, expected = not is_json(content_type), "JSON with Content-Type: application/json"
        if wrong:
            message = f"send the body as {expected} (got {content_type!r})"
            return respond(request.url.path, 415, "unsupported_media_type", message)
    return validation_error(request, exc)


async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = HTTP_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 404:
        message = f"no such route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        # Starlette's Allow names the methods of the one registration it matched, not of the path.
        headers["Allow"] = ", ".join(allowed_methods(request))
    return respond(request.url.path, exc.status_code, code, message, headers=headers or None)


async def on_crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return respond(request.url.path, 500, "internal_error", "an internal error occurred; it was logged")


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(QueueUnavailable, on_queue_unavailable)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_crash)
