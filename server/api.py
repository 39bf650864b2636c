"""The HTTP API: FastAPI routes and pydantic schemas. Validation and errors only, never a tensor.

The app talks to a :class:`server.queue.JobQueue` and does not know which one it has. In the
embedded mode (no Redis URL) it also starts one worker thread on an in-memory queue.

Errors always look like ``{"error": {"code", "message", "field"?}}``.
"""

# No `from __future__ import annotations` here: FastAPI must see the request model built in create_app.

import asyncio
import base64
import contextlib
import json
import logging
import math
import re
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import metrics
from .mobile import BundleStore, download
from .queue import (
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    IdempotencyConflict,
    Job,
    JobQueue,
    MemoryJobQueue,
    QueueFull,
    QueueUnavailable,
    RedisJobQueue,
    fingerprint,
)
from .security import ApiKeys, BodySizeLimit
from .settings import Settings

log = logging.getLogger("snapgen.api")

MAX_SEED = 2**32 - 1
MAX_N = 8
MAX_STEPS = 50
FORMATS = ("png", "jpeg", "webp")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
IMAGE_NAME = re.compile(r"^(\d{1,3})\.(png|jpeg|jpg|webp)$")
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]


# -- schemas -----------------------------------------------------------------------------------
class GenerateRequest(BaseModel):
    """POST /v1/generate. Unset fields take the model's defaults (see GET /v1/models)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"prompt": "a red circle to the left of a blue square", "seed": 3}]},
    )

    prompt: str = Field(min_length=1, max_length=20000, description="what the image should show")
    negative_prompt: str | None = Field(None, max_length=20000, description="what it should not show (guidance != 1)")
    n: int = Field(1, ge=1, le=MAX_N, description="number of images; image i uses seed + i")
    width: int | None = Field(None, ge=8, le=4096, description="pixels; one of the model's sizes")
    height: int | None = Field(None, ge=8, le=4096, description="pixels; one of the model's sizes")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="sampling steps (model default when unset)")
    guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False, description="1 = no guidance")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="uint32; drawn at random when unset, always returned")
    output_format: Literal["png", "jpeg", "webp"] = "png"
    response_format: Literal["b64_json", "url"] = "b64_json"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty; write what the image should show")
        return value


def request_model(max_prompt_chars: int) -> type[GenerateRequest]:
    """GenerateRequest with this server's prompt length limit in its schema."""
    return create_model(
        "GenerateRequest",
        __base__=GenerateRequest,
        __doc__=GenerateRequest.__doc__,
        prompt=(str, Field(min_length=1, max_length=max_prompt_chars, description="what the image should show")),
        negative_prompt=(str | None, Field(None, max_length=max_prompt_chars, description="what it should not show")),
    )


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="the encoded image (response_format=b64_json)")
    url: str | None = Field(None, description="where to GET it (response_format=url)")
    seed: int


class Timings(BaseModel):
    queue_s: float = Field(description="accepted -> a worker started it")
    text_s: float
    unet_s: float
    decode_s: float
    total_s: float = Field(description="accepted -> result stored")


class GenerateResponse(BaseModel):
    id: str
    created: int
    model: str
    data: list[ImageData]
    timings: Timings


class JobAccepted(BaseModel):
    id: str
    status: JobStatus
    queue_position: int | None = None


class Progress(BaseModel):
    step: int
    steps: int


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class JobResponse(BaseModel):
    id: str
    status: JobStatus
    created: int
    progress: Progress
    queue_position: int | None = Field(None, description="jobs ahead of this one (queued only)")
    cancel_requested: bool
    request: dict[str, Any]
    result: GenerateResponse | None = None
    error: ErrorDetail | None = None


class ModelCard(BaseModel):
    id: str
    sizes: list[list[int]]
    default_size: list[int]
    default_steps: int
    max_steps: int
    guidance_scale: float
    max_prompt_tokens: int
    max_n: int
    output_formats: list[str]
    workers: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class MobileBundle(BaseModel):
    name: str
    version: str | None
    size: int
    sha256: str
    created: str
    content_type: str
    url: str


class MobileBundleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[MobileBundle]


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


# -- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def error_response(status: int, code: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    error = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return JSONResponse({"error": error}, status_code=status, headers=headers)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}

_ALLOWED = {
    "n": f"an integer from 1 to {MAX_N}",
    "steps": f"an integer from 1 to {MAX_STEPS}",
    "seed": f"an integer from 0 to {MAX_SEED}",
    "guidance_scale": "a number from 0 to 100",
    "width": "one of the model's sizes (GET /v1/models)",
    "height": "one of the model's sizes (GET /v1/models)",
    "output_format": "png, jpeg or webp",
    "response_format": "b64_json or url",
    "prompt": "a non-empty string",
    "negative_prompt": "a string",
}


def _validation_error(exc: RequestValidationError) -> JSONResponse:
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
        elif field in _ALLOWED:
            message += f"; allowed: {_ALLOWED[field]}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return error_response(422, "invalid_request", message, field=field)


# -- small helpers ------------------------------------------------------------------------------
def negotiate(accept: str | None) -> str:
    """'json' or an image format, from the Accept header (highest q wins, ties go to the first)."""
    if not accept:
        return "json"
    offers = {"application/json": "json", "image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}
    best, best_q = "json", -1.0
    for part in accept.split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        media = media.lower()
        choice = offers.get(media) or ("json" if media in ("*/*", "application/*") else None)
        if choice is not None and q > 0 and q > best_q:
            best, best_q = choice, q
    return best


def parse_prefer(prefer: str | None) -> tuple[bool, float | None]:
    """(respond-async?, wait seconds) from an RFC 7240 Prefer header."""
    respond_async, wait = False, None
    for token in (prefer or "").split(","):
        token = token.strip().lower()
        if token == "respond-async":
            respond_async = True
        elif token.startswith("wait="):
            with contextlib.suppress(ValueError):
                wait = max(0.0, float(token[5:]))
    return respond_async, wait


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


# -- the app -----------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, queue: JobQueue | None = None, start_worker: bool = True) -> FastAPI:
    settings = settings or Settings()
    if queue is None:
        if settings.redis_url:
            queue = RedisJobQueue.from_settings(settings)
        else:
            queue = MemoryJobQueue(result_ttl_s=settings.result_ttl_s)
    keys = ApiKeys(settings.all_api_keys())
    bundles = BundleStore(settings.mobile_dir)
    Body = request_model(settings.max_prompt_chars)
    model_cache: dict[str, Any] = {"value": None, "expires": 0.0}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = None
        if isinstance(queue, MemoryJobQueue) and start_worker:
            from .worker import build_worker

            worker = build_worker(queue, settings, "embedded")
            worker.start_thread()
        app.state.worker = worker
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
                await asyncio.to_thread(worker.join, settings.drain_timeout_s + 5)
            await queue.aclose()

    app = FastAPI(
        title="snapgen",
        version="0.1.0",
        summary="SnapGen text-to-image generation API",
        description='Errors are `{"error": {"code", "message", "field"?}}`. See docs/server.md.',
        lifespan=lifespan,
    )
    app.state.queue = queue
    app.state.settings = settings
    app.state.worker = None

    # ---- errors ----
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(QueueUnavailable)
    async def _queue_down(request: Request, exc: QueueUnavailable):
        return error_response(
            503,
            "queue_unavailable",
            "the job queue (Redis) is unreachable; no job was accepted by this request. Retry shortly.",
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        on_body = any(e.get("loc", ("",))[0] == "body" for e in exc.errors())
        if on_body and content_type and "json" not in content_type.lower():
            return error_response(
                415,
                "unsupported_media_type",
                f"send the body as JSON with Content-Type: application/json (got {content_type!r})",
            )
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such route: {request.method} {request.url.path}"
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "an internal error occurred; it was logged")

    # ---- middleware (last added runs first) ----
    async def reject_body(scope, send):
        response = error_response(
            413,
            "payload_too_large",
            f"the request body is larger than {settings.max_body_bytes} bytes",
            headers={"Connection": "close"},
        )
        await response(scope, _no_receive, send)

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, on_reject=reject_body)
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
                "X-Content-SHA256",
                "Preference-Applied",
            ],  # fmt: skip
        )
    app.add_middleware(_Metrics)

    # ---- auth and limits ----
    bearer = HTTPBearer(auto_error=False, description="an API key, when the server has keys configured")

    async def principal(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        if not keys.enabled:
            return "anonymous"
        if credentials is None:
            raise APIError(
                401,
                "unauthorized",
                "this server needs an API key: send `Authorization: Bearer <key>`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        ident = keys.lookup(credentials.credentials)
        if ident is None:
            raise APIError(403, "forbidden", "this API key is not valid for this server")
        return ident

    async def rate_limited(request: Request, owner: str = Depends(principal)) -> str:
        limit = settings.rate_limit_per_minute
        if limit <= 0:
            return owner
        bucket = owner if keys.enabled else f"ip-{request.client.host if request.client else 'unknown'}"
        count, reset = await queue.hit(bucket, 60)
        if count > limit:
            retry = max(1, math.ceil(reset))
            raise APIError(
                429,
                "rate_limited",
                f"more than {limit} generate requests per minute for this key; retry in {retry} s",
                headers={"Retry-After": str(retry)},
            )
        return owner

    async def model_info() -> dict | None:
        now = time.monotonic()
        if now >= model_cache["expires"]:
            try:
                model_cache["value"] = (await queue.stats()).model
                model_cache["expires"] = now + 2.0
            except QueueUnavailable:
                model_cache["expires"] = now + 0.5
        return model_cache["value"]

    async def owned_job(job_id: str, owner: str) -> Job:
        job = await queue.get(job_id) if JOB_ID.match(job_id) else None
        if job is None or (keys.enabled and job.owner != owner):
            raise APIError(404, "not_found", f"no job {job_id!r} (jobs are kept {settings.result_ttl_s} s)")
        return job

    def base_url(request: Request) -> str:
        return (settings.public_url or str(request.base_url)).rstrip("/")

    # ---- bodies ----
    async def result_body(job: Job, base: str) -> dict:
        result = job.result or {}
        count = int(result.get("count", job.n))
        fmt = result.get("format", job.request.get("output_format", "png"))
        seeds = result.get("seeds", [])
        data = []
        if job.request.get("response_format") == "url":
            for i in range(count):
                data.append({"url": f"{base}/v1/images/{job.id}/{i}.{fmt}", "seed": seeds[i]})
        else:
            images = await queue.images(job.id, count)
            for i, image in enumerate(images):
                data.append({"b64_json": base64.b64encode(image or b"").decode(), "seed": seeds[i]})
        t = result.get("timings", {})
        started = job.started or job.created
        finished = job.finished or started
        return {
            "id": job.id,
            "created": int(job.created),
            "model": result.get("model", ""),
            "data": data,
            "timings": {
                "queue_s": round(max(0.0, started - job.created), 6),
                "text_s": round(t.get("text_s", 0.0), 6),
                "unet_s": round(t.get("unet_s", 0.0), 6),
                "decode_s": round(t.get("decode_s", 0.0), 6),
                "total_s": round(max(0.0, finished - job.created), 6),
            },
        }

    async def job_body(job: Job, base: str) -> dict:
        body = {
            "id": job.id,
            "status": job.status,
            "created": int(job.created),
            "progress": {"step": job.step, "steps": job.steps or int(job.request.get("steps") or 0)},
            "queue_position": job.queue_position if job.status == QUEUED else None,
            "cancel_requested": job.cancel_requested,
            "request": job.request,
            "result": None,
            "error": None,
        }
        if job.status == SUCCEEDED:
            body["result"] = await result_body(job, base)
        elif job.status == FAILED:
            body["error"] = job.error or {"code": "failed", "message": "the job failed"}
        elif job.status == CANCELED:
            body["error"] = {"code": "canceled", "message": "the job was canceled"}
        return body

    async def wait_for(job_id: str, timeout: float) -> Job | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        job = None
        async with queue.watch(job_id, progress=False) as watch:
            while True:
                with contextlib.suppress(QueueUnavailable):  # accepted jobs survive an outage: keep waiting
                    job = await queue.get(job_id)
                if job is not None and job.status in TERMINAL:
                    return job
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return job
                await watch.wait(min(remaining, queue.poll_s))

    def check_against_model(body: GenerateRequest, request: dict, info: dict | None) -> None:
        if info is None:
            return  # no worker has described its model yet: the worker validates
        sizes = [tuple(s) for s in info["sizes"]]
        height = request["height"] = request["height"] or info["default_size"][0]
        width = request["width"] = request["width"] or info["default_size"][1]
        if (height, width) not in sizes:
            allowed = ", ".join(f"{w}x{h}" for h, w in sizes)
            field = "width" if body.width is not None else "height"
            raise APIError(422, "invalid_request", f"{width}x{height} (width x height) is not a size this model "
                           f"supports; allowed: {allowed}", field=field)  # fmt: skip
        if request["steps"] is None:
            request["steps"] = info["default_steps"]
        elif request["steps"] > info["max_steps"]:
            raise APIError(422, "invalid_request", f"steps: {request['steps']} is more than this model allows; "
                           f"allowed: an integer from 1 to {info['max_steps']}", field="steps")  # fmt: skip
        if request["guidance_scale"] is None:
            request["guidance_scale"] = info["guidance_scale"]

    # ---- routes ----
    @app.post(
        "/v1/generate",
        response_model=GenerateResponse,
        tags=["generate"],
        summary="Generate images (sync by default; Prefer: respond-async for a job)",
        responses={
            200: {
                "description": "the images (JSON), or the raw image with `Accept: image/png|jpeg|webp` and n = 1",
                "content": {m: {"schema": {"type": "string", "format": "binary"}} for m in MEDIA_TYPES.values()},
            },
            202: {"model": JobAccepted, "description": "accepted (respond-async, or the sync wait ran out)"},
            **_errors(401, 403, 409, 413, 415, 422, 429, 500, 503),
        },
    )
    async def generate(
        request: Request,
        body: Body,
        owner: str = Depends(rate_limited),
        prefer: str | None = Header(None, description="`respond-async` for 202 + a job; `wait=N` caps the sync wait"),
        idempotency_key: str | None = Header(
            None, min_length=1, max_length=255, description="a retried request with the same key gets the same job"
        ),
    ):
        mode = negotiate(request.headers.get("accept"))
        if mode != "json":
            if body.n != 1:
                raise APIError(422, "invalid_request", f"Accept: {MEDIA_TYPES[mode]} returns one raw image; set n "
                               "to 1 or accept application/json", field="n")  # fmt: skip
            if "output_format" in body.model_fields_set and body.output_format != mode:
                raise APIError(422, "invalid_request", f"output_format {body.output_format!r} contradicts Accept: "
                               f"{MEDIA_TYPES[mode]}", field="output_format")  # fmt: skip
        fields = body.model_dump()
        req = dict(fields)
        req["seed"] = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        if mode != "json":
            req["output_format"] = mode
        check_against_model(body, req, await model_info())
        job = Job(id=uuid.uuid4().hex, request=req, owner=owner, steps=int(req.get("steps") or 0))
        idempotency = (idempotency_key, fingerprint({**fields, "_accept": mode})) if idempotency_key else None
        try:
            job, _created = await queue.submit(job, settings.max_queue_depth, idempotency)
        except QueueFull as e:
            try:
                wait_s = (await queue.stats()).estimate_wait_s()
            except QueueUnavailable:
                wait_s = 1.0
            retry = min(60, max(1, math.ceil(wait_s)))
            raise APIError(
                429,
                "queue_full",
                f"the server is busy: {e.queued} jobs wait (limit {settings.max_queue_depth}); retry in {retry} s",
                headers={"Retry-After": str(retry)},
            ) from None
        except IdempotencyConflict as e:
            raise APIError(
                409,
                "idempotency_conflict",
                f"this Idempotency-Key was used for job {e.job_id} with a different request; use a new key",
                field="Idempotency-Key",
            ) from None
        headers = {"Location": f"/v1/jobs/{job.id}", "X-Job-Id": job.id}
        respond_async, wait = parse_prefer(prefer)
        if respond_async:
            headers["Preference-Applied"] = "respond-async"
            accepted = {"id": job.id, "status": job.status, "queue_position": job.queue_position}
            return JSONResponse(accepted, status_code=202, headers=headers)
        timeout = settings.sync_timeout_s if wait is None else min(wait, settings.sync_timeout_s)
        final = await wait_for(job.id, timeout)
        if final is None:
            raise APIError(404, "not_found", f"job {job.id} disappeared (expired) before it finished")
        if final.status not in TERMINAL:
            accepted = {"id": final.id, "status": final.status, "queue_position": final.queue_position}
            return JSONResponse(accepted, status_code=202, headers=headers)
        if final.status == SUCCEEDED:
            if mode != "json":
                images = await queue.images(final.id, 1)
                seed = (final.result or {}).get("seeds", [req["seed"]])[0]
                return Response(
                    images[0] or b"", media_type=MEDIA_TYPES[mode], headers={**headers, "X-Seed": str(seed)}
                )
            return JSONResponse(await result_body(final, base_url(request)), headers=headers)
        if final.status == CANCELED:
            raise APIError(409, "canceled", f"job {final.id} was canceled before it finished")
        error = final.error or {}
        if error.get("code") == "invalid_request":
            raise APIError(422, "invalid_request", error.get("message", "invalid request"), field=error.get("field"))
        raise APIError(500, error.get("code", "generation_failed"), error.get("message", "generation failed"))

    @app.get("/v1/jobs/{job_id}", response_model=JobResponse, tags=["jobs"], responses=_errors(401, 403, 404, 503))
    async def get_job(job_id: str, request: Request, owner: str = Depends(principal)):
        job = await owned_job(job_id, owner)
        return JSONResponse(await job_body(job, base_url(request)))

    @app.delete(
        "/v1/jobs/{job_id}",
        response_model=JobResponse,
        tags=["jobs"],
        summary="Cancel: a queued job never runs; a running one stops at its next step",
        responses=_errors(401, 403, 404, 503),
    )
    async def cancel_job(job_id: str, request: Request, owner: str = Depends(principal)):
        await owned_job(job_id, owner)
        job = await queue.cancel(job_id)
        if job is None:
            raise APIError(404, "not_found", f"no job {job_id!r}")
        return JSONResponse(await job_body(job, base_url(request)))

    @app.get(
        "/v1/jobs/{job_id}/events",
        tags=["jobs"],
        summary="Server-sent events: status, progress, then result | error | canceled",
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_errors(401, 403, 404, 503),
        },  # fmt: skip
    )
    async def job_events(job_id: str, request: Request, owner: str = Depends(principal)):
        await owned_job(job_id, owner)
        base = base_url(request)

        async def stream():
            last_status, last_position, last_step = None, None, None
            last_sent = time.monotonic()
            async with queue.watch(job_id) as watch:
                while True:
                    try:
                        job = await queue.get(job_id)
                    except QueueUnavailable:
                        job = "down"
                    if job == "down":
                        yield ": queue unavailable, retrying\n\n"
                        await asyncio.sleep(1.0)
                        continue
                    if job is None:
                        yield _sse("error", {"code": "not_found", "message": f"job {job_id} expired"})
                        return
                    if job.status != last_status or job.queue_position != last_position:
                        last_status, last_position = job.status, job.queue_position
                        yield _sse("status", {"id": job.id, "status": job.status, "queue_position": job.queue_position,
                                              "cancel_requested": job.cancel_requested})  # fmt: skip
                        last_sent = time.monotonic()
                    if job.status == RUNNING and job.step != last_step and job.step > 0:
                        last_step = job.step
                        yield _sse("progress", {"step": job.step, "steps": job.steps})
                        last_sent = time.monotonic()
                    if job.status in TERMINAL:
                        final = {SUCCEEDED: "result", FAILED: "error", CANCELED: "canceled"}[job.status]
                        yield _sse(final, await job_body(job, base))
                        return
                    if not await watch.wait(min(queue.poll_s, 15.0)) and time.monotonic() - last_sent >= 15:
                        yield ": keep-alive\n\n"
                        last_sent = time.monotonic()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @app.get(
        "/v1/images/{job_id}/{filename}",
        tags=["generate"],
        summary="An image of a response_format=url result, e.g. /v1/images/ID/0.png",
        response_class=Response,
        responses={
            200: {"content": {m: {"schema": {"type": "string", "format": "binary"}} for m in MEDIA_TYPES.values()}},
            **_errors(401, 403, 404, 503),
        },  # fmt: skip
    )
    async def get_image(job_id: str, filename: str, owner: str = Depends(principal)):
        job = await owned_job(job_id, owner)
        match = IMAGE_NAME.match(filename)
        result = job.result or {}
        fmt = result.get("format")
        if job.status != SUCCEEDED or not match:
            raise APIError(404, "not_found", f"no image {filename!r} for job {job_id} (status {job.status})")
        index, ext = int(match.group(1)), {"jpg": "jpeg"}.get(match.group(2), match.group(2))
        if ext != fmt or index >= int(result.get("count", 0)):
            raise APIError(404, "not_found", f"job {job_id} has images 0..{int(result.get('count', 0)) - 1}.{fmt}")
        image = (await queue.images(job_id, index + 1))[index]
        if image is None:
            raise APIError(404, "not_found", f"the image {filename} expired")
        return Response(
            image, media_type=MEDIA_TYPES[fmt], headers={"Cache-Control": "private, max-age=86400, immutable"}
        )

    @app.get("/v1/models", response_model=ModelList, tags=["models"], responses=_errors(401, 403, 503))
    async def list_models(owner: str = Depends(principal)):
        stats = await queue.stats()
        data = []
        if stats.model is not None:
            m = stats.model
            data.append({
                "id": m["id"],
                "sizes": m["sizes"],
                "default_size": m["default_size"],
                "default_steps": m["default_steps"],
                "max_steps": min(m["max_steps"], MAX_STEPS),
                "guidance_scale": m["guidance_scale"],
                "max_prompt_tokens": m["max_prompt_tokens"],
                "max_n": MAX_N,
                "output_formats": list(FORMATS),
                "workers": len(stats.workers),
            })  # fmt: skip
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/mobile", response_model=MobileBundleList, tags=["models"], responses=_errors(401, 403))
    async def list_mobile(request: Request, owner: str = Depends(principal)):
        found = await run_in_threadpool(bundles.list)
        base = base_url(request)
        return JSONResponse({"object": "list", "data": [b.entry(base) for b in found]})

    @app.get(
        "/v1/models/mobile/{name}",
        tags=["models"],
        summary="Download a Core ML bundle (ETag, Range, X-Content-SHA256)",
        response_class=Response,
        responses={
            200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}},
            206: {"description": "the requested byte range"},
            304: {"description": "not modified"},
            416: {"description": "range not satisfiable"},
            **_errors(401, 403, 404),
        },  # fmt: skip
    )
    @app.head("/v1/models/mobile/{name}", include_in_schema=False)
    async def get_mobile(name: str, request: Request, owner: str = Depends(principal)):
        bundle = await run_in_threadpool(bundles.find, name)
        if bundle is None:
            raise APIError(404, "not_found", f"no mobile bundle named {name!r} (GET /v1/models/mobile lists them)")
        return download(bundle, request.method, request.headers)

    @app.get("/healthz", tags=["ops"], summary="The process is up")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Model loaded and queue reachable", responses={503: {}})
    async def readyz(request: Request):
        checks: dict[str, str] = {}
        ready = True
        try:
            await queue.ping()
            stats = await queue.stats()
            checks["queue"] = "ok"
        except QueueUnavailable as e:
            stats, ready = None, False
            checks["queue"] = f"unreachable: {e}"
        worker = request.app.state.worker
        if worker is not None:
            detail = worker.error or worker.reason
            checks["model"] = "ok" if worker.ready.is_set() and worker.state == "ready" else (
                f"{worker.state}" + (f": {detail}" if detail else ""))  # fmt: skip
            ready = ready and checks["model"] == "ok"
        elif stats is not None:
            checks["model"], any_ready = _workers_check(stats.workers)
            ready = ready and any_ready
        else:
            checks["model"] = "unknown (queue unreachable)"
        if ready:
            return {"status": "ready", "checks": checks}
        message = "; ".join(f"{k}: {v}" for k, v in checks.items() if not v.startswith("ok"))
        return JSONResponse(
            {"status": "not_ready", "checks": checks, "error": {"code": "not_ready", "message": message}},
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", response_class=Response)
    async def prometheus():
        try:
            stats, up = await queue.stats(), True
        except QueueUnavailable:
            stats, up = None, False
        payload, content_type = metrics.render(stats, up)
        return Response(payload, media_type=content_type)

    return app


def _workers_check(workers: dict[str, dict]) -> tuple[str, bool]:
    """The /readyz model check in Redis mode: ready when one live worker is; the others' reasons are shown."""
    # Heartbeats without a state come from workers of before the state was sent: they only beat when ready.
    ready = [name for name, info in workers.items() if info.get("state", "ready") == "ready" and not info.get("reason")]
    waiting = [f"{name}: {info.get('reason') or info.get('state')}" for name, info in sorted(workers.items())
               if name not in ready]  # fmt: skip
    if ready:
        return f"ok ({len(ready)} worker(s))" + (f"; not ready: {'; '.join(waiting)}" if waiting else ""), True
    if waiting:
        return f"no worker is ready: {'; '.join(waiting)}", False
    return "no worker is running", False


async def _no_receive():
    return {"type": "http.disconnect"}


class _Metrics:
    """Counts every request by route template (not raw path: bounded label values)."""

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
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            metrics.API.requests.labels(template, method, str(status["code"])).inc()
            metrics.API.request_duration.labels(template, method).observe(time.perf_counter() - start)


def app_from_env() -> FastAPI:
    """uvicorn factory for several API processes: settings come from SNAPGEN_* variables."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(Settings())
