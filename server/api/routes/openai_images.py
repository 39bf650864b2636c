"""OpenAI's Images API beside ours: POST /v1/images/generations (JSON) and POST /v1/images/edits (multipart).

A request becomes the same job POST /v1/generate makes (one :class:`GenerationRequest`, the same queue,
workers and seed rule), is answered when its images are done, in OpenAI's ImagesResponse shape with each
image's seed as an extension (``data[i].seed``, header ``X-Seeds``). Errors come in OpenAI's envelope
(server/api/errors.py). The fields and what each does here: server/api/openai_schemas.py, docs/server.md.
"""

import re
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...queue import SUCCEEDED, TERMINAL, Job, JobQueue
from ...settings import Settings
from ..bodies import result_body
from ..dependencies import base_url, rate_limited
from ..errors import APIError
from ..openai_schemas import (
    ImageEditForm,
    ImageGenerationRequest,
    ImageRequest,
    ImagesResponse,
    edit_model,
    generation_model,
    openai_error_responses,
)
from ..schemas import MAX_PROMPT_CHARS
from .generate import failure, generation_request, image_input, submit, wait_for, with_body_model

SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
Principal = Annotated[str, Depends(rate_limited)]


def check_model(model: str | None, info: dict | None) -> None:
    """404 model_not_found (as OpenAI answers) for a model this server does not serve, once it knows its model."""
    if model is not None and info is not None and model != info["id"]:
        raise APIError(404, "model_not_found", f"the model {model!r} does not exist here; this server serves "
                       f"{info['id']!r} (GET /v1/models)", field="model")  # fmt: skip


def parse_size(size: str | None, info: dict | None) -> tuple[int | None, int | None]:
    """(width, height) of OpenAI's WIDTHxHEIGHT; (None, None), the model's default, for auto or unset."""
    if size is None or size == "auto":
        return None, None
    sizes = [] if info is None else [f"{w}x{h}" for h, w in info["sizes"]]
    allowed = ", ".join(["auto", *sizes]) if sizes else "auto or WIDTHxHEIGHT, one of the model's sizes"
    match = SIZE.fullmatch(size)
    if match is None or (sizes and size not in sizes):
        problem = "is not a size this model makes" if match else "is not auto or WIDTHxHEIGHT"
        raise APIError(422, "invalid_request", f"size: {size!r} {problem}; allowed: {allowed}", field="size")
    return int(match[1]), int(match[2])


def new_job(
    body: ImageRequest, owner: str, info: dict | None, input_image: bytes | None = None, strength: float | None = None
) -> Job:
    """The job of an OpenAI request: its fields as POST /v1/generate takes them (an edit: its image and strength)."""
    width, height = parse_size(body.size, info)
    request = generation_request(
        info,
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        n=body.n,
        seed=body.seed,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        height=height,
        width=width,
        output_format=body.output_format or "png",
        strength=strength,
    )
    response_format = body.response_format or "b64_json"
    return Job(id=uuid.uuid4().hex, request=request, owner=owner, response_format=response_format,
               input_image=input_image)  # fmt: skip


async def answer(request: Request, job: Job) -> JSONResponse:
    """Queue ``job``, wait for it, and answer in OpenAI's shape."""
    state = request.app.state
    queue: JobQueue = state.queue
    settings: Settings = state.settings
    job = await submit(queue, settings, job)
    headers = {"Location": f"/v1/jobs/{job.id}", "X-Job-Id": job.id}
    final = await wait_for(queue, job.id, settings.sync_timeout_s)
    if final is None:
        raise APIError(404, "not_found", f"job {job.id} disappeared (expired) before it finished")
    if final.status not in TERMINAL:
        # OpenAI's clients retry a 5xx: X-Should-Retry tells them not to queue the same work again.
        raise APIError(504, "timeout", f"job {job.id} is not done after {settings.sync_timeout_s:g} s; it goes on: "
                       f"GET /v1/jobs/{job.id}", headers={**headers, "X-Should-Retry": "false"})  # fmt: skip
    if final.status != SUCCEEDED:
        raise failure(final)
    result = await result_body(final, await base_url(request), queue)
    height, width = (final.result or {}).get("size", [final.request.height, final.request.width])
    body = {
        "created": result["created"],
        "data": result["data"],
        "background": "opaque",
        "output_format": (final.result or {}).get("format", final.request.output_format),
        "size": f"{width}x{height}",
        "model": result["model"],
        "id": final.id,
    }
    seeds = ",".join(str(image["seed"]) for image in result["data"])
    return JSONResponse(body, headers={**headers, "X-Seeds": seeds})


async def generations(request: Request, body: ImageGenerationRequest, owner: Principal):
    """Create images from a prompt (OpenAI's `images.generate`)."""
    info = await request.app.state.model_info.get(request.app.state.queue)
    check_model(body.model, info)
    return await answer(request, new_job(body, owner, info))


async def edits(request: Request, body: ImageEditForm, owner: Principal):
    """Make images from an input image and a prompt (OpenAI's `images.edit`; image-to-image)."""
    state = request.app.state
    info = await state.model_info.get(state.queue)
    check_model(body.model, info)
    data = await body.image.read()
    # Checking the image decodes it (up to 16 M pixels): not on the event loop.
    image, strength = await run_in_threadpool(image_input, info, data, body.strength, state.settings.max_image_bytes)
    return await answer(request, new_job(body, owner, info, image, strength))


SUCCESS = {
    "description": "the images, in OpenAI's ImagesResponse shape",
    "headers": {
        "X-Seeds": {"description": "the images' seeds, comma-separated", "schema": {"type": "string"}},
        "X-Job-Id": {"description": "the job (GET /v1/jobs/{id})", "schema": {"type": "string"}},
    },
}
ERRORS = openai_error_responses(400, 401, 404, 409, 413, 415, 429, 500, 503, 504)


def router(max_prompt_chars: int = MAX_PROMPT_CHARS) -> APIRouter:
    """The two routes; their schemas state this server's prompt length limit."""
    api = APIRouter(tags=["openai"])
    api.add_api_route(
        "/v1/images/generations",
        with_body_model(generations, generation_model(max_prompt_chars)),
        methods=["POST"],
        response_model=ImagesResponse,
        summary="Generate images (OpenAI Images API)",
        responses={200: SUCCESS, **ERRORS},
    )
    form = Annotated[edit_model(max_prompt_chars), Form(media_type="multipart/form-data")]
    api.add_api_route(
        "/v1/images/edits",
        with_body_model(edits, form),
        methods=["POST"],
        response_model=ImagesResponse,
        summary="Edit an image: image-to-image (OpenAI Images API; multipart/form-data)",
        responses={200: SUCCESS, **ERRORS},
    )
    return api
