"""Jobs: status, cancellation, server-sent events, and the images of ``response_format=url`` results."""

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from ...queue import CANCELED, FAILED, RUNNING, SUCCEEDED, TERMINAL, Job, QueueUnavailable
from ..bodies import job_body
from ..dependencies import BaseURL, Queue, owned_job
from ..errors import APIError
from ..schemas import BINARY, MEDIA_TYPES, JobResponse, JobStatusEvent, ProgressEvent, error_responses

IMAGE_NAME = re.compile(r"^([0-9]{1,3})\.(png|jpeg|jpg|webp)$")  # [0-9]: Python's \d takes other scripts' digits
FINAL_EVENT = {SUCCEEDED: "result", FAILED: "error", CANCELED: "canceled"}

router = APIRouter(tags=["jobs"])
OwnedJob = Annotated[Job, Depends(owned_job)]


@router.get("/v1/jobs/{job_id}", response_model=JobResponse, responses=error_responses(401, 403, 404, 503))
async def get_job(job: OwnedJob, queue: Queue, base: BaseURL):
    return JSONResponse(await job_body(job, base, queue))


@router.delete(
    "/v1/jobs/{job_id}",
    response_model=JobResponse,
    summary="Cancel: a queued job never runs; a running one stops at its next step",
    responses=error_responses(401, 403, 404, 503),
)
async def cancel_job(job: OwnedJob, queue: Queue, base: BaseURL):
    canceled = await queue.cancel(job.id)
    if canceled is None:
        raise APIError(404, "not_found", f"no job {job.id!r}")
    return JSONResponse(await job_body(canceled, base, queue))


def _json_event(event: str, schema: dict) -> dict:
    return {
        "properties": {
            "event": {"const": event},
            "data": {"contentMediaType": "application/json", "contentSchema": schema},
        }
    }


# Each event as OpenAPI 3.2's itemSchema describes it: its name and the JSON its data holds.
EVENTS_SCHEMA = {
    "required": ["event", "data"],
    "oneOf": [
        _json_event("status", JobStatusEvent.model_json_schema()),
        _json_event("progress", ProgressEvent.model_json_schema()),
        _json_event("result", {"$ref": "#/components/schemas/JobResponse"}),
        _json_event("canceled", {"$ref": "#/components/schemas/JobResponse"}),
        # A failed job, or {code, message} when the job expired while watched.
        _json_event(
            "error",
            {"anyOf": [{"$ref": "#/components/schemas/JobResponse"}, {"$ref": "#/components/schemas/ErrorDetail"}]},
        ),
    ],
}


def _event(event: str, data: dict) -> ServerSentEvent:
    return ServerSentEvent(event=event, raw_data=json.dumps(data, separators=(",", ":")))


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Server-sent events: status, progress, then result | error | canceled",
    responses={
        200: {"content": {"text/event-stream": {"itemSchema": EVENTS_SCHEMA}}},
        **error_responses(401, 403, 404, 503, media_type="text/event-stream"),
    },
)
async def job_events(job: OwnedJob, queue: Queue, base: BaseURL) -> AsyncIterator[ServerSentEvent]:
    # FastAPI sends a keep-alive comment after 15 s without an event.
    job_id = job.id
    last_status, last_position, last_step = None, None, None
    async with queue.watch(job_id) as watch:
        while True:
            try:
                current = await queue.get(job_id)
            except QueueUnavailable:
                yield ServerSentEvent(comment="queue unavailable, retrying")
                await asyncio.sleep(1.0)
                continue
            if current is None:
                yield _event("error", {"code": "not_found", "message": f"job {job_id} expired"})
                return
            if current.status != last_status or current.queue_position != last_position:
                last_status, last_position = current.status, current.queue_position
                yield _event("status", {"id": current.id, "status": current.status,
                                        "queue_position": current.queue_position,
                                        "cancel_requested": current.cancel_requested})  # fmt: skip
            if current.status == RUNNING and current.step != last_step and current.step > 0:
                last_step = current.step
                progress = {"step": current.step, "steps": current.steps}
                if current.preview:
                    with contextlib.suppress(QueueUnavailable):  # progress without its picture, then
                        preview = await queue.preview(job_id)
                        if preview is not None:
                            progress["preview"] = "data:image/jpeg;base64," + base64.b64encode(preview).decode()
                yield _event("progress", progress)
            if current.status in TERMINAL:
                yield _event(FINAL_EVENT[current.status], await job_body(current, base, queue))
                return
            await watch.wait(min(queue.poll_s, 15.0))


@router.get(
    "/v1/images/{job_id}/{filename}",
    tags=["generate"],
    summary="An image of a response_format=url result, e.g. /v1/images/ID/0.png",
    response_class=Response,
    responses={
        200: {"content": {m: BINARY for m in MEDIA_TYPES.values()}},
        **error_responses(401, 403, 404, 503),
    },  # fmt: skip
)
async def get_image(
    # Documented, not validated: any other name is simply not found (404).
    filename: Annotated[str, Path(description="INDEX.EXT", json_schema_extra={"pattern": IMAGE_NAME.pattern})],
    job: OwnedJob,
    queue: Queue,
):
    match = IMAGE_NAME.match(filename)
    result = job.result or {}
    fmt = result.get("format")
    if job.status != SUCCEEDED or not match:
        raise APIError(404, "not_found", f"no image {filename!r} for job {job.id} (status {job.status})")
    index, ext = int(match.group(1)), {"jpg": "jpeg"}.get(match.group(2), match.group(2))
    if ext != fmt or index >= int(result.get("count", 0)):
        raise APIError(404, "not_found", f"job {job.id} has images 0..{int(result.get('count', 0)) - 1}.{fmt}")
    image = (await queue.images(job.id, index + 1))[index]
    if image is None:
        raise APIError(404, "not_found", f"the image {filename} expired")
    return Response(image, media_type=MEDIA_TYPES[fmt], headers={"Cache-Control": "private, max-age=86400, immutable"})
