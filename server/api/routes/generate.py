"""POST /v1/generate: synchronous by default, a job with ``Prefer: respond-async``, a raw image with ``Accept``."""

import asyncio
import contextlib
import inspect
import math
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from snapgen.request import GenerationRequest, InvalidRequestError, ModelCard

from ...queue import CANCELED, SUCCEEDED, TERMINAL, IdempotencyConflict, Job, JobQueue, QueueFull, QueueUnavailable
from ...queue import fingerprint as request_fingerprint
from ...settings import Settings
from ..bodies import accepted_body, result_body
from ..dependencies import base_url, rate_limited
from ..errors import APIError
from ..images_in import decode_base64_image, read_input_image
from ..schemas import (
    BINARY,
    DEFAULT_STRENGTH,
    MAX_PROMPT_CHARS,
    MEDIA_TYPES,
    GenerateRequest,
    GenerateResponse,
    JobAccepted,
    error_responses,
    request_model,
)
from ..webhooks_in import apply_webhook


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


def new_job(body: GenerateRequest, mode: str, owner: str, info: dict | None, max_image_bytes: int | None = None) -> Job:
    """The job for a parsed body: its :class:`GenerationRequest`, with the seed drawn and, when the model
    is known, checked against the model's card with the card's defaults written in.

    ``mode`` is the negotiated response ("json" or an image format); ``info`` the model the workers
    describe (None before any has: the worker then resolves the request). Raises APIError 422 (413 for
    an input image over ``max_image_bytes``).
    """
    input_image, strength = None, body.strength
    if body.image is not None:
        input_image, strength = image_input(info, decode_base64_image(body.image), strength, max_image_bytes)
    elif strength is not None:
        raise APIError(422, "invalid_request", "strength: only for image-to-image; send an image with it",
                       field="strength")  # fmt: skip
    if mode != "json":
        if body.n != 1:
            raise APIError(422, "invalid_request", f"Accept: {MEDIA_TYPES[mode]} returns one raw image; set n "
                           "to 1 or accept application/json", field="n")  # fmt: skip
        if "output_format" in body.model_fields_set and body.output_format != mode:
            raise APIError(422, "invalid_request", f"output_format {body.output_format!r} contradicts Accept: "
                           f"{MEDIA_TYPES[mode]}", field="output_format")  # fmt: skip
    request = generation_request(
        info,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        n=body.n,
        seed=body.seed,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        height=body.height,
        width=body.width,
        output_format=body.output_format if mode == "json" else mode,
        strength=strength,
    )
    return Job(id=uuid.uuid4().hex, request=request, owner=owner, response_format=body.response_format,
               preview=body.preview, input_image=input_image)  # fmt: skip


def image_input(info: dict | None, data: bytes, strength: float | None, max_bytes: int | None) -> tuple[bytes, float]:
    """An image-to-image input checked, with its strength (:data:`DEFAULT_STRENGTH` when unset). APIError 422 on
    field ``image`` when the served model (if known yet) cannot take one or the worker could not decode it, 413
    when it is over ``max_bytes``."""
    if info is not None and not info.get("image_input", False):
        raise APIError(422, "invalid_request", f"image: the model {info.get('id')!r} cannot take an input "
                       "image (it has no encoder); send a text-only request", field="image")  # fmt: skip
    return read_input_image(data, "image", max_bytes), DEFAULT_STRENGTH if strength is None else strength


def generation_request(info: dict | None, **fields) -> GenerationRequest:
    """A :class:`GenerationRequest` of ``fields`` with its seed drawn and, when the model is known, checked
    against its card with the card's defaults written in. Raises APIError 422 naming the field."""
    try:
        request = GenerationRequest(**fields).with_seed()
        if info is not None:
            request = request.with_defaults(ModelCard.from_dict(info))
    except InvalidRequestError as e:
        raise APIError(422, "invalid_request", f"{e.field}: {e.message}", field=e.field) from None
    return request


async def submit(queue: JobQueue, settings: Settings, job: Job, idempotency: tuple[str, str] | None = None) -> Job:
    """``job`` queued (or the job an equal retry with the same Idempotency-Key made); APIError 429 when the
    queue is full, 409 for a key used with another request."""
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
    return job


def failure(final: Job) -> APIError:
    """What a synchronous request answers for a job that ended without images."""
    if final.status == CANCELED:
        return APIError(409, "canceled", f"job {final.id} was canceled before it finished")
    error = final.error or {}
    if error.get("code") == "invalid_request":
        return APIError(422, "invalid_request", error.get("message", "invalid request"), field=error.get("field"))
    return APIError(500, error.get("code", "generation_failed"), error.get("message", "generation failed"))


async def wait_for(queue: JobQueue, job_id: str, timeout: float) -> Job | None:
    """The job once it is final, or as it is when ``timeout`` runs out (None if it expired)."""
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


async def generate(
    request: Request,
    body: GenerateRequest,
    owner: Annotated[str, Depends(rate_limited)],
    prefer: Annotated[
        str | None, Header(description="`respond-async` for 202 + a job; `wait=N` caps the sync wait")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(min_length=1, max_length=255, description="a retried request with the same key gets the same job"),
    ] = None,
):
    state = request.app.state
    queue: JobQueue = state.queue
    settings: Settings = state.settings
    mode = negotiate(request.headers.get("accept"))
    args = (body, mode, owner, await state.model_info.get(queue), settings.max_image_bytes)
    # Checking an input image decodes it (up to 16 M pixels): not on the event loop. Text-only requests, the
    # common case, skip the thread pool's hop.
    job = await run_in_threadpool(new_job, *args) if body.image is not None else new_job(*args)
    job = await apply_webhook(job, body, settings, await base_url(request))
    idempotency = None
    if idempotency_key:
        idempotency = (idempotency_key, request_fingerprint({**body.model_dump(), "_accept": mode}))
    job = await submit(queue, settings, job, idempotency)
    headers = {"Location": f"/v1/jobs/{job.id}", "X-Job-Id": job.id}
    respond_async, wait = parse_prefer(prefer)
    if respond_async:
        headers["Preference-Applied"] = "respond-async"
        return JSONResponse(accepted_body(job), status_code=202, headers=headers)
    timeout = settings.sync_timeout_s if wait is None else min(wait, settings.sync_timeout_s)
    final = await wait_for(queue, job.id, timeout)
    if final is None:
        raise APIError(404, "not_found", f"job {job.id} disappeared (expired) before it finished")
    if final.status not in TERMINAL:
        return JSONResponse(accepted_body(final), status_code=202, headers=headers)
    if final.status == SUCCEEDED:
        if mode != "json":
            images = await queue.images(final.id, 1)
            seed = (final.result or {}).get("seeds", [job.request.seed])[0]
            return Response(images[0] or b"", media_type=MEDIA_TYPES[mode], headers={**headers, "X-Seed": str(seed)})
        return JSONResponse(await result_body(final, await base_url(request), queue), headers=headers)
    raise failure(final)


def with_body_model(endpoint, model: type[GenerateRequest]):
    """``endpoint`` as FastAPI should see it: its ``body`` parameter typed with ``model``."""

    async def configured(**kwargs):
        return await endpoint(**kwargs)

    signature = inspect.signature(endpoint)
    params = [p.replace(annotation=model) if p.name == "body" else p for p in signature.parameters.values()]
    configured.__signature__ = signature.replace(parameters=params)
    configured.__name__, configured.__doc__ = endpoint.__name__, endpoint.__doc__
    return configured


def router(max_prompt_chars: int = MAX_PROMPT_CHARS) -> APIRouter:
    """The generate route; its body schema states this server's prompt length limit."""
    api = APIRouter(tags=["generate"])
    api.add_api_route(
        "/v1/generate",
        with_body_model(generate, request_model(max_prompt_chars)),
        methods=["POST"],
        response_model=GenerateResponse,
        summary="Generate images (sync by default; Prefer: respond-async for a job)",
        responses={
            200: {
                "description": "the images (JSON), or the raw image with `Accept: image/png|jpeg|webp` and n = 1",
                "content": {m: BINARY for m in MEDIA_TYPES.values()},
            },
            202: {"model": JobAccepted, "description": "accepted (respond-async, or the sync wait ran out)"},
            **error_responses(400, 401, 403, 409, 413, 415, 422, 429, 500, 503),
        },
    )
    return api
