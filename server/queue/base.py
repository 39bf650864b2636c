"""What both queues share: job states, errors, :class:`Job`, :class:`QueueStats`, :class:`Watch` and the
:class:`JobQueue` interface."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from snapgen.request import GenerationRequest

if TYPE_CHECKING:
    from ..webhooks import WebhookDelivery

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})

# Retention of finished jobs (results, errors, images) unless the settings say otherwise.
DEFAULT_RESULT_TTL_S = 24 * 3600
DEFAULT_RESULT_MAX_JOBS = 10_000
DEFAULT_RESULT_MAX_BYTES = 1 << 30


# -- errors ------------------------------------------------------------------------------------
class QueueError(Exception):
    pass


class QueueUnavailable(QueueError):
    """The backing store (Redis) cannot serve requests now; the API answers 503 with Retry-After."""

    retry_after_s = 1


class QueueStoreFull(QueueUnavailable):
    """The store is (nearly) out of memory: writes are refused until results expire or are evicted."""

    retry_after_s = 5


class QueueFull(QueueError):
    def __init__(self, queued: int):
        super().__init__(f"{queued} jobs are waiting")
        self.queued = queued


class IdempotencyConflict(QueueError):
    def __init__(self, job_id: str):
        super().__init__(f"the Idempotency-Key was used for job {job_id} with a different request")
        self.job_id = job_id


# -- data --------------------------------------------------------------------------------------
@dataclass
class Job:
    """One generation request and everything known about it.

    ``request`` is what was asked (the seed drawn, the model's defaults filled in when the API knew the
    model); ``response_format`` how the API returns the images. ``step`` of ``steps`` is the progress a
    worker reports while it runs the job; with ``preview`` it also stores a small picture of each step
    (:meth:`JobQueue.preview`).

    ``input_image`` is the image-to-image input as uploaded (encoded bytes). It is not one of the job's
    stored fields: a queue keeps it beside the job, hands it to the worker that reserves the job and
    drops it once the job is final, so reading a job's state never carries it.

    ``webhook`` is where the job's events go (``webhook_events``: start, output, logs, completed; see
    server/webhooks/), ``base_url`` where the API was reached when the job was submitted (its links in the
    webhook bodies). They are stored only for jobs with a webhook.
    """

    id: str
    request: GenerationRequest
    response_format: str = "b64_json"
    preview: bool = False
    input_image: bytes | None = field(default=None, repr=False)
    owner: str = "anonymous"
    webhook: str | None = None
    webhook_events: tuple[str, ...] = ()
    base_url: str | None = None
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0
    worker: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    # Filled in by the queue, never stored as such:
    stream_id: str | None = None
    deliveries: int = 0
    queue_position: int | None = None

    @property
    def n(self) -> int:
        """How many images the job makes."""
        return self.request.images

    # Redis hash encoding: flat strings, JSON for the nested parts.
    def to_fields(self) -> dict[str, str]:
        webhook = {}
        if self.webhook:  # the Lua scripts write a job's webhook events when it has webhook_events
            webhook = {"webhook": self.webhook, "webhook_events": ",".join(self.webhook_events),
                       "base_url": self.base_url or ""}  # fmt: skip
        return {
            "id": self.id,
            "owner": self.owner,
            "status": self.status,
            "request": self.request.to_json(),
            "response_format": self.response_format,
            "preview": "1" if self.preview else "0",
            "created": repr(self.created),
            "started": "" if self.started is None else repr(self.started),
            "finished": "" if self.finished is None else repr(self.finished),
            "step": str(self.step),
            "steps": str(self.steps),
            "worker": self.worker or "",
            "attempts": str(self.attempts),
            "cancel": "1" if self.cancel_requested else "0",
            "version": "0",
            **webhook,
        }

    @classmethod
    def from_fields(cls, raw: dict) -> Job:
        f = {_s(k): _s(v) for k, v in raw.items()}

        def opt_float(name):
            return float(f[name]) if f.get(name) else None

        return cls(
            id=f["id"],
            request=GenerationRequest.from_json(f["request"]),
            response_format=f.get("response_format") or "b64_json",
            preview=f.get("preview") == "1",
            owner=f.get("owner", "anonymous"),
            webhook=f.get("webhook") or None,
            webhook_events=tuple(e for e in f.get("webhook_events", "").split(",") if e),
            base_url=f.get("base_url") or None,
            status=f.get("status", QUEUED),
            created=float(f.get("created", 0)),
            started=opt_float("started"),
            finished=opt_float("finished"),
            step=int(f.get("step") or 0),
            steps=int(f.get("steps") or 0),
            worker=f.get("worker") or None,
            attempts=int(f.get("attempts") or 0),
            cancel_requested=f.get("cancel") == "1",
            error=json.loads(f["error"]) if f.get("error") else None,
            result=json.loads(f["result"]) if f.get("result") else None,
            stream_id=f.get("stream_id") or None,
        )

    def stored_bytes(self, images: list[bytes] | tuple = ()) -> int:
        """About what the finished job takes in the store (as the Redis scripts count it): the hash's
        names and values, the result or error, and the images. Retention caps are counted in these."""
        fields = self.to_fields()
        for name, value in (("result", self.result), ("error", self.error)):
            if value is not None:
                fields[name] = json.dumps(value, separators=(",", ":"))
        return sum(len(k) + len(v.encode()) for k, v in fields.items()) + sum(len(i) for i in images)


@dataclass
class QueueStats:
    queued: int
    running: int
    workers: dict[str, dict[str, Any]]  # live workers only: name -> last heartbeat
    model: dict[str, Any] | None
    # Finished jobs kept for their results, and how many were evicted (ever) to stay within the caps.
    retained_jobs: int = 0
    retained_bytes: int = 0
    evicted: int = 0

    def estimate_wait_s(self) -> float:
        """A rough time until a new job would start, for Retry-After."""
        rates = [w.get("avg_batch_s") or 0 for w in self.workers.values()]
        capacity = sum(max(1, int(w.get("max_batch_images") or 1)) for w in self.workers.values()) or 1
        batch_s = max(rates) if rates else 0
        return self.queued / capacity * batch_s


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _alive(info: dict, now: float) -> bool:
    return now - float(info.get("ts", 0)) < 3 * float(info.get("heartbeat_s", 2)) + 1


class Watch:
    """Wakes an asyncio task when a job changes; notify() is safe from any thread.

    ``progress=False`` watchers (a synchronous request waiting for the result) are not woken by
    per-step progress, only by changes of state.
    """

    def __init__(self, progress: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self.progress = progress

    def notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting anymore
            self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self, timeout: float) -> bool:
        """Wait for a change (True) or the timeout (False)."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._event.clear()


# -- the interface -----------------------------------------------------------------------------
class JobQueue(ABC):
    """What the API (async methods) and the worker (blocking methods) know about the queue.

    Finished jobs are kept ``result_ttl_s``, and at most ``result_max_jobs`` of them taking at most
    ``result_max_bytes`` (0: no cap); beyond a cap the oldest are evicted first. An evicted job is
    gone as an expired one is (``get`` returns None).
    """

    kind: str
    poll_s: float  # how often a waiter re-reads a job even without a notification

    # ---- API side ----
    @abstractmethod
    async def submit(self, job: Job, max_depth: int, idempotency: tuple[str, str] | None = None) -> tuple[Job, bool]:
        """Queue ``job``; returns (job, created). ``idempotency`` = (key, request fingerprint):
        a known key with the same fingerprint returns the earlier job (created False), another
        fingerprint raises IdempotencyConflict. Raises QueueFull when ``max_depth`` jobs wait, and
        QueueStoreFull when the store is too full to take more."""

    @abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    async def cancel(self, job_id: str) -> Job | None:
        """A queued job is canceled now and never runs; a running one stops at its next step."""

    @abstractmethod
    async def images(self, job_id: str, count: int) -> list[bytes | None]: ...

    @abstractmethod
    async def preview(self, job_id: str) -> bytes | None:
        """The latest step preview (JPEG) of a running job that asked for previews; None when there is none."""

    @abstractmethod
    def watch(self, job_id: str, progress: bool = True) -> contextlib.AbstractAsyncContextManager[Watch]: ...

    @abstractmethod
    async def stats(self) -> QueueStats: ...

    @abstractmethod
    async def ping(self) -> None:
        """Raise QueueUnavailable if the store cannot be reached (QueueStoreFull if it is too full)."""

    @abstractmethod
    async def hit(self, bucket: str, window_s: int) -> tuple[int, float]:
        """Count one request for ``bucket`` in the current window: (count, seconds to the next)."""

    async def aclose(self) -> None:
        return None

    # ---- worker side (blocking) ----
    @abstractmethod
    def reserve(self, consumer: str, max_jobs: int, block_s: float) -> list[Job]:
        """Up to ``max_jobs`` jobs for this worker (reclaimed jobs of dead workers first)."""

    @abstractmethod
    def start(self, consumer: str, jobs: list[Job]) -> list[Job]:
        """Mark jobs running; returns those to run (canceled or finished ones are dropped)."""

    @abstractmethod
    def progress(self, jobs: list[Job], step: int, steps: int, previews: dict[str, bytes] | None = None) -> set[str]:
        """Record progress (and the step's preview of the jobs in ``previews``, by id); returns the ids of jobs
        whose cancellation was requested."""

    @abstractmethod
    def complete(self, job: Job, images: list[bytes], result: dict[str, Any]) -> bool:
        """Store the result unless the job already has a final state; True if stored."""

    @abstractmethod
    def fail(self, job: Job, error: dict[str, Any]) -> bool: ...

    @abstractmethod
    def mark_canceled(self, job: Job) -> bool: ...

    @abstractmethod
    def release(self, jobs: list[Job]) -> None:
        """Hand jobs back (worker shutting down): they are queued again for any worker."""

    @abstractmethod
    def heartbeat(self, consumer: str, info: dict[str, Any], held: list[Job] = ()) -> None:
        """Say this worker is alive (and which model it serves); keeps ``held`` from being reclaimed."""

    @abstractmethod
    def deregister(self, consumer: str) -> None: ...

    def take_dead_lettered(self) -> int:
        """Jobs this process moved to the dead-letter stream since the last call."""
        return 0

    # ---- webhook outbox (server/webhooks/: the dispatcher; blocking) ----
    # A job with a webhook gets a delivery in the outbox when an event it asked for happens, written with the
    # state change itself; dispatchers take, hold and acknowledge them.
    def take_webhook_deliveries(self, consumer: str, max_count: int, block_s: float) -> list[WebhookDelivery]:
        """Up to ``max_count`` deliveries for this dispatcher (those of silent dispatchers first)."""
        return []

    def ack_webhook_delivery(self, consumer: str, delivery: WebhookDelivery) -> None:
        """Delivered or given up: out of the outbox."""

    def hold_webhook_deliveries(self, consumer: str, deliveries: list[WebhookDelivery]) -> None:
        """This dispatcher still has these: no other may take them over."""

    def close(self) -> None:
        return None


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable digest of a request body, for Idempotency-Key conflict checks."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
