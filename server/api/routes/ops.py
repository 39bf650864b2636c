"""Operations endpoints, open without a key: /healthz, /readyz, /metrics."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ... import metrics
from ...queue import QueueStoreFull, QueueUnavailable
from ..dependencies import Queue
from ..schemas import Health, Readiness

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz():
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Model loaded and queue reachable",
    responses={503: {"model": Readiness, "description": "not ready (`Retry-After: 1`)"}},
)
async def readyz(request: Request, queue: Queue):
    checks: dict[str, str] = {}
    ready = True
    try:
        await queue.ping()
        stats = await queue.stats()
        checks["queue"] = "ok"
    except QueueUnavailable as e:
        stats, ready = None, False
        checks["queue"] = str(e) or "unavailable"
    worker = request.app.state.worker
    if worker is not None:
        detail = worker.error or worker.reason
        checks["model"] = "ok" if worker.ready.is_set() and worker.state == "ready" else (
            f"{worker.state}" + (f": {detail}" if detail else ""))  # fmt: skip
        ready = ready and checks["model"] == "ok"
    elif stats is not None:
        checks["model"], any_ready = workers_check(stats.workers)
        ready = ready and any_ready
    else:
        checks["model"] = "unknown (queue unavailable)"
    if ready:
        return JSONResponse({"status": "ready", "checks": checks})
    message = "; ".join(f"{k}: {v}" for k, v in checks.items() if not v.startswith("ok"))
    return JSONResponse(
        {"status": "not_ready", "checks": checks, "error": {"code": "not_ready", "message": message}},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def workers_check(workers: dict[str, dict]) -> tuple[str, bool]:
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


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus(queue: Queue):
    full = False
    try:
        stats, up = await queue.stats(), True
        try:
            await queue.ping()
        except QueueStoreFull:
            full = True
        except QueueUnavailable:
            pass  # it answered the stats: up; its next scrape tells more
    except QueueUnavailable:
        stats, up = None, False
    payload, content_type = metrics.render(stats, up, full)
    return Response(payload, media_type=content_type)
