"""The response bodies built from a :class:`server.queue.Job` (GenerateResponse and JobResponse shapes)."""

import base64

from ..queue import CANCELED, FAILED, QUEUED, SUCCEEDED, Job, JobQueue
from .schemas import GenerateRequest


async def result_body(job: Job, base: str, queue: JobQueue) -> dict:
    """A succeeded job's result: the images (inline or as links), their seeds and the timings."""
    images = None
    if job.response_format != "url":
        images = await queue.images(job.id, int((job.result or {}).get("count", job.n)))
    return result_view(job, base, images)


def result_view(job: Job, base: str, images: list[bytes | None] | None = None) -> dict:
    """A succeeded job's result with ``images`` inline (base64), or as links without them."""
    result = job.result or {}
    count = int(result.get("count", job.n))
    fmt = result.get("format", job.request.output_format)
    seeds = result.get("seeds", [])
    data = []
    if images is None:
        for i in range(count):
            data.append({"url": f"{base}/v1/images/{job.id}/{i}.{fmt}", "seed": seeds[i]})
    else:
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


async def job_body(job: Job, base: str, queue: JobQueue) -> dict:
    """A job as GET /v1/jobs/{id} shows it."""
    return job_view(job, base, await result_body(job, base, queue) if job.status == SUCCEEDED else None)


def job_view(job: Job, base: str, result: dict | None = None) -> dict:
    """A job as GET /v1/jobs/{id} shows it, with ``result`` as built by :func:`result_body`; without it, a
    succeeded job's images are links (webhook bodies: server/webhooks/)."""
    body = {
        "id": job.id,
        "status": job.status,
        "created": int(job.created),
        "progress": {"step": job.step, "steps": job.steps or job.request.steps or 0},
        "queue_position": job.queue_position if job.status == QUEUED else None,
        "cancel_requested": job.cancel_requested,
        "request": echo_request(job),
        "result": None,
        "error": None,
    }
    if job.status == SUCCEEDED:
        body["result"] = result if result is not None else result_view(job, base)
    elif job.status == FAILED:
        body["error"] = job.error or {"code": "failed", "message": "the job failed"}
    elif job.status == CANCELED:
        body["error"] = {"code": "canceled", "message": "the job was canceled"}
    return body


def echo_request(job: Job) -> dict:
    """The job's request in the fields POST /v1/generate takes (defaults and seed filled in): sent back as it is,
    it asks for the same images."""
    fields = {**job.request.to_dict(), "response_format": job.response_format}
    if job.webhook:
        fields.update(webhook=job.webhook, webhook_events_filter=list(job.webhook_events))
    return {name: fields[name] for name in GenerateRequest.model_fields if name in fields}


def accepted_body(job: Job) -> dict:
    """A job that is not finished yet (the 202 of POST /v1/generate)."""
    return {"id": job.id, "status": job.status, "queue_position": job.queue_position}
