"""The embedded mode's queue: everything in one process, under one lock."""

from __future__ import annotations

import contextlib
import copy
import threading
import time
import uuid
from collections import OrderedDict, defaultdict, deque
from collections.abc import AsyncIterator
from typing import Any

from ..webhooks.events import OutputThrottle, WebhookDelivery
from .base import (
    CANCELED,
    DEFAULT_RESULT_MAX_BYTES,
    DEFAULT_RESULT_MAX_JOBS,
    DEFAULT_RESULT_TTL_S,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    IdempotencyConflict,
    Job,
    JobQueue,
    QueueFull,
    QueueStats,
    Watch,
    _alive,
)


class MemoryJobQueue(JobQueue):
    """A deque and a dict under one lock. Nothing survives a restart.

    Finished jobs are kept in finish order (``_done``: id -> bytes), so expiry and eviction take the
    oldest first without scanning every job.
    """

    kind = "memory"
    poll_s = 30.0

    def __init__(
        self,
        result_ttl_s: float = DEFAULT_RESULT_TTL_S,
        result_max_jobs: int = DEFAULT_RESULT_MAX_JOBS,
        result_max_bytes: int = DEFAULT_RESULT_MAX_BYTES,
        webhook_output_interval_s: float = 0.5,
    ):
        self._cv = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._images: dict[str, list[bytes]] = {}
        self._previews: dict[str, bytes] = {}
        self._order: deque[str] = deque()
        self._idem: dict[tuple[str, str], tuple[str, str, float]] = {}
        self._watchers: dict[str, set[Watch]] = defaultdict(set)
        self._workers: dict[str, dict[str, Any]] = {}
        self._model: dict[str, Any] | None = None
        self._rate: dict[tuple[str, int], int] = {}
        self._ttl = result_ttl_s
        self._max_jobs = result_max_jobs
        self._max_bytes = result_max_bytes
        self._done: OrderedDict[str, int] = OrderedDict()
        self._done_bytes = 0
        self._evicted = 0
        self._next_sweep = 0.0
        self._outbox: deque[WebhookDelivery] = deque()  # webhook deliveries not yet taken by the dispatcher
        self._throttle = OutputThrottle(webhook_output_interval_s)

    @classmethod
    def from_settings(cls, settings) -> MemoryJobQueue:
        """The embedded server's queue."""
        return cls(
            result_ttl_s=settings.result_ttl_s,
            result_max_jobs=settings.result_max_jobs,
            result_max_bytes=settings.result_max_bytes,
            webhook_output_interval_s=settings.webhook_output_interval_s,
        )

    def _notify(self, job_id: str, progress: bool = False) -> None:
        for watch in list(self._watchers.get(job_id, ())):
            if watch.progress or not progress:
                watch.notify()

    def _forget(self, job_id: str) -> None:
        self._done_bytes -= self._done.pop(job_id, 0)
        self._jobs.pop(job_id, None)
        self._images.pop(job_id, None)

    def _expire(self, now: float) -> None:
        while self._done:
            job_id = next(iter(self._done))
            job = self._jobs.get(job_id)
            if job is not None and (job.finished or 0) + self._ttl >= now:
                return
            self._forget(job_id)

    def _retire(self, job: Job) -> None:
        """A job reached its final state: count it against the retention caps, evicting the oldest beyond them.
        Its input image and step preview are no longer needed."""
        job.input_image = None
        self._previews.pop(job.id, None)
        self._webhook(job, "completed")
        self._throttle.forget(job.id)
        size = job.stored_bytes(self._images.get(job.id, ()))
        self._done[job.id] = size
        self._done_bytes += size
        self._expire(job.finished or time.time())
        # The newest stays even alone over the byte cap: its client is about to read it.
        while len(self._done) > 1 and (
            (self._max_jobs and len(self._done) > self._max_jobs)
            or (self._max_bytes and self._done_bytes > self._max_bytes)
        ):
            self._forget(next(iter(self._done)))
            self._evicted += 1

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 10
        self._expire(now)
        self._idem = {k: v for k, v in self._idem.items() if v[2] > now and v[0] in self._jobs}
        window = int(now // 60)
        self._rate = {k: v for k, v in self._rate.items() if k[1] >= window - 60}

    def _view(self, job: Job) -> Job:
        out = copy.deepcopy(job)
        out.input_image = None  # the worker's, not part of the job's state
        if job.status == QUEUED:
            try:
                out.queue_position = self._order.index(job.id)
            except ValueError:
                out.queue_position = 0  # handed to a worker, about to start
        return out

    # ---- API side ----
    async def submit(self, job, max_depth, idempotency=None):
        now = time.time()
        with self._cv:
            self._sweep(now)
            if idempotency is not None:
                key = (job.owner, idempotency[0])
                known = self._idem.get(key)
                if known is not None and known[0] in self._jobs:
                    if known[1] != idempotency[1]:
                        raise IdempotencyConflict(known[0])
                    return self._view(self._jobs[known[0]]), False
            if len(self._order) >= max_depth:
                raise QueueFull(len(self._order))
            job = copy.deepcopy(job)
            self._jobs[job.id] = job
            self._order.append(job.id)
            if idempotency is not None:
                self._idem[(job.owner, idempotency[0])] = (job.id, idempotency[1], now + self._ttl)
            self._cv.notify_all()
            return self._view(job), True

    async def get(self, job_id):
        with self._cv:
            job = self._jobs.get(job_id)
            return None if job is None else self._view(job)

    async def cancel(self, job_id):
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.status == QUEUED:
                job.status, job.finished, job.cancel_requested = CANCELED, time.time(), True
                with contextlib.suppress(ValueError):
                    self._order.remove(job_id)
                self._retire(job)
            elif job.status == RUNNING:
                job.cancel_requested = True
            self._notify(job_id)
            return self._view(job)

    async def images(self, job_id, count):
        with self._cv:
            stored = self._images.get(job_id, [])
            return [stored[i] if i < len(stored) else None for i in range(count)]

    async def preview(self, job_id):
        with self._cv:
            return self._previews.get(job_id)

    @contextlib.asynccontextmanager
    async def watch(self, job_id, progress=True) -> AsyncIterator[Watch]:
        watch = Watch(progress)
        with self._cv:
            self._watchers[job_id].add(watch)
        try:
            yield watch
        finally:
            with self._cv:
                self._watchers[job_id].discard(watch)
                if not self._watchers[job_id]:
                    del self._watchers[job_id]

    async def stats(self):
        now = time.time()
        with self._cv:
            running = sum(1 for j in self._jobs.values() if j.status == RUNNING)
            workers = {k: dict(v) for k, v in self._workers.items() if _alive(v, now)}
            return QueueStats(
                len(self._order), running, workers, copy.deepcopy(self._model),
                retained_jobs=len(self._done), retained_bytes=self._done_bytes, evicted=self._evicted,
            )  # fmt: skip

    async def ping(self):
        return None

    async def hit(self, bucket, window_s):
        now = time.time()
        window = int(now // window_s)
        with self._cv:
            count = self._rate.get((bucket, window), 0) + 1
            self._rate[(bucket, window)] = count
        return count, (window + 1) * window_s - now

    # ---- worker side ----
    def reserve(self, consumer, max_jobs, block_s):
        with self._cv:
            if not self._order and block_s > 0:
                self._cv.wait_for(lambda: self._order, timeout=block_s)
            out = []
            while self._order and len(out) < max_jobs:
                job = self._jobs[self._order.popleft()]
                job.queue_position = None
                out.append(copy.deepcopy(job))
            for job_id in self._order:
                self._notify(job_id, progress=True)  # their queue positions moved
            return out

    def start(self, consumer, jobs):
        now = time.time()
        runnable = []
        with self._cv:
            for j in jobs:
                job = self._jobs.get(j.id)
                if job is None or job.status not in (QUEUED, RUNNING):
                    continue
                if job.cancel_requested:
                    job.status, job.finished = CANCELED, now
                    self._retire(job)
                else:
                    job.status, job.worker, job.started, job.step = RUNNING, consumer, now, 0
                    job.attempts += 1
                    if job.attempts == 1:  # a job run again (its worker stopped) started before
                        self._webhook(job, "start")
                    runnable.append(copy.deepcopy(job))
                self._notify(job.id)
        return runnable

    def progress(self, jobs, step, steps, previews=None):
        canceled = set()
        with self._cv:
            for j in jobs:
                job = self._jobs.get(j.id)
                if job is None or job.status != RUNNING:
                    continue
                job.step, job.steps = step, steps
                if previews and job.id in previews:
                    self._previews[job.id] = previews[job.id]
                if "output" in job.webhook_events and self._throttle.due(job.id, step, steps):
                    self._webhook(job, "output")
                if job.cancel_requested:
                    canceled.add(job.id)
                self._notify(job.id, progress=True)
        return canceled

    def _finish(self, job_id: str, status: str, images: list[bytes] | None = None, **values) -> str | None:
        """Compare-and-set to a final state; returns the state reached, None if it had one already."""
        with self._cv:
            job = self._jobs.get(job_id)
            if job is None or job.status in TERMINAL:
                return None
            if status == SUCCEEDED and job.cancel_requested:
                status, values, images = CANCELED, {}, None
            for key, value in values.items():
                setattr(job, key, value)
            if images is not None:
                self._images[job_id] = list(images)
                job.step = job.steps or job.step
            job.status, job.finished = status, time.time()
            self._notify(job_id)
            self._retire(job)
            return status

    def complete(self, job, images, result):
        return self._finish(job.id, SUCCEEDED, images=images, result=result) == SUCCEEDED

    def fail(self, job, error):
        return self._finish(job.id, FAILED, error=error) == FAILED

    def mark_canceled(self, job):
        return self._finish(job.id, CANCELED) == CANCELED

    def release(self, jobs):
        with self._cv:
            for j in reversed(jobs):
                job = self._jobs.get(j.id)
                if job is None or job.status in TERMINAL:
                    continue
                job.status, job.worker, job.started, job.step = QUEUED, None, None, 0
                if job.id not in self._order:
                    self._order.appendleft(job.id)  # back at the front, where it was
                self._notify(job.id)
            self._cv.notify_all()

    def heartbeat(self, consumer, info, held=()):
        with self._cv:
            self._workers[consumer] = {**info, "ts": time.time()}
            if info.get("model") is not None:
                self._model = info["model"]

    def deregister(self, consumer):
        with self._cv:
            self._workers.pop(consumer, None)

    # ---- webhook outbox ----
    def _webhook(self, job: Job, event: str) -> None:
        """The event into the outbox if the job asked for it (under the lock, with the state change)."""
        if job.webhook and event in job.webhook_events:
            snapshot = copy.deepcopy(job)
            snapshot.input_image, snapshot.queue_position = None, None
            self._outbox.append(WebhookDelivery(f"msg_{uuid.uuid4().hex}", event, time.time(), snapshot))
            self._cv.notify_all()

    def take_webhook_deliveries(self, consumer, max_count, block_s):
        with self._cv:
            if not self._outbox and block_s > 0:
                self._cv.wait_for(lambda: self._outbox, timeout=block_s)
            return [self._outbox.popleft() for _ in range(min(max_count, len(self._outbox)))]

    def ack_webhook_delivery(self, consumer, delivery):
        return None  # taken is out of the outbox already: nothing survives this process anyway

    def hold_webhook_deliveries(self, consumer, deliveries):
        return None
