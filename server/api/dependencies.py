"""FastAPI dependencies: the app's shared state, auth, the rate limit, job ownership, base URLs.

Shared state lives on ``app.state`` (set by :func:`server.api.app.create_app`): ``settings``,
``queue``, ``keys``, ``bundles`` and ``model_info``. Handlers get it through these dependencies,
so a test can build an app with one router and its own state. They are ``async``: FastAPI runs a
plain ``def`` dependency in a thread pool, a hop that costs more than the lookup itself.
"""

import math
import re
import time
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..mobile import BundleStore
from ..queue import Job, JobQueue, QueueUnavailable
from ..security import ApiKeys
from ..settings import Settings
from .errors import APIError

JOB_ID = re.compile(r"^[0-9a-f]{32}$")

bearer = HTTPBearer(auto_error=False, description="an API key, when the server has keys configured")


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_queue(request: Request) -> JobQueue:
    return request.app.state.queue


async def get_keys(request: Request) -> ApiKeys:
    return request.app.state.keys


async def get_bundles(request: Request) -> BundleStore:
    return request.app.state.bundles


async def base_url(request: Request) -> str:
    """Where this server is reached, for links in responses."""
    settings: Settings = request.app.state.settings
    return (settings.public_url or str(request.base_url)).rstrip("/")


def authenticate(credentials: HTTPAuthorizationCredentials | None, keys: ApiKeys) -> str:
    """Who is asking: a key id, or "anonymous" when the server has no keys."""
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


# The two dependencies on every /v1 request read the state directly rather than through further
# dependencies: each level of FastAPI's dependency solving costs about as much as the lookup it wraps.
async def principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> str:
    """Who is asking (see :func:`authenticate`), with the app's keys."""
    return authenticate(credentials, request.app.state.keys)


async def rate_limited(request: Request, owner: Annotated[str, Depends(principal)]) -> str:
    """The principal, once it is within SNAPGEN_RATE_LIMIT_PER_MINUTE (per key, or per client without keys)."""
    state = request.app.state
    settings: Settings = state.settings
    queue: JobQueue = state.queue
    keys: ApiKeys = state.keys
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


async def owned_job(
    # Documented, not validated: any other id is simply not found (404), like an expired job.
    job_id: Annotated[str, Path(description="the job's id", json_schema_extra={"pattern": JOB_ID.pattern})],
    owner: Annotated[str, Depends(principal)],
    queue: Annotated[JobQueue, Depends(get_queue)],
    keys: Annotated[ApiKeys, Depends(get_keys)],
    settings: Annotated[Settings, Depends(get_settings)],
) -> Job:
    """The job of the path's ``job_id``; 404 when there is none or it belongs to another key."""
    job = await queue.get(job_id) if JOB_ID.match(job_id) else None
    if job is None or (keys.enabled and job.owner != owner):
        raise APIError(404, "not_found", f"no job {job_id!r} (jobs are kept {settings.result_ttl_s} s)")
    return job


class ModelInfoCache:
    """The model the workers describe (sizes, defaults), read from the queue at most every 2 s."""

    def __init__(self, ttl_s: float = 2.0, retry_s: float = 0.5):
        self.ttl_s, self.retry_s = ttl_s, retry_s
        self.value: dict | None = None
        self.expires = 0.0

    async def get(self, queue: JobQueue) -> dict | None:
        now = time.monotonic()
        if now >= self.expires:
            try:
                self.value = (await queue.stats()).model
                self.expires = now + self.ttl_s
            except QueueUnavailable:
                self.expires = now + self.retry_s  # keep the last known model meanwhile
        return self.value


Owner = Annotated[str, Depends(principal)]
Queue = Annotated[JobQueue, Depends(get_queue)]
BaseURL = Annotated[str, Depends(base_url)]
