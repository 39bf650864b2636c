"""The job queue: one interface, two implementations.

``MemoryJobQueue`` serves the embedded mode (API and worker in one process); ``RedisJobQueue``
the scaled-out mode (any number of API processes and workers sharing one Redis). The API sees
only the asynchronous half of :class:`JobQueue`, the worker only the blocking half, and neither
knows which implementation it has.

Redis layout (``P`` is the key prefix, ``snapgen`` by default)::

    P:jobs              stream, consumer group "workers": one entry {id} per queued job
    P:dead              dead-letter stream: jobs delivered more than K times
    P:job:<id>          hash: status, request, progress, result/error, ... (TTL)
    P:img:<id>:<i>      encoded image bytes (TTL)
    P:idem:<owner>:<h>  "<job id> <request fingerprint>" for an Idempotency-Key (TTL)
    P:events            pub/sub channel: the id of every job whose state changed
    P:workers           hash: worker name -> last heartbeat (JSON)
    P:model             the model the workers serve (JSON), for validation and /v1/models
    P:rate:<key>:<win>  fixed-window request counters

Delivery is at-least-once (a worker can die after finishing a job but before acknowledging it),
so every state change is a compare-and-set in a Lua script: a job reaches a final state once and
a re-delivered job never yields a second, different result.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})


# -- errors ------------------------------------------------------------------------------------
class QueueError(Exception):
    pass


class QueueUnavailable(QueueError):
    """The backing store (Redis) cannot be reached; the API answers 503."""


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
    """One generation request and everything known about it."""

    id: str
    request: dict[str, Any]
    owner: str = "anonymous"
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
        return int(self.request.get("n", 1))

    # Redis hash encoding: flat strings, JSON for the nested parts.
    def to_fields(self) -> dict[str, str]:
        return {
            "id": self.id,
            "owner": self.owner,
            "status": self.status,
            "request": json.dumps(self.request, separators=(",", ":")),
            "created": repr(self.created),
            "started": "" if self.started is None else repr(self.started),
            "finished": "" if self.finished is None else repr(self.finished),
            "step": str(self.step),
            "steps": str(self.steps),
            "worker": self.worker or "",
            "attempts": str(self.attempts),
            "cancel": "1" if self.cancel_requested else "0",
            "version": "0",
        }

    @classmethod
    def from_fields(cls, raw: dict) -> Job:
        f = {_s(k): _s(v) for k, v in raw.items()}

        def opt_float(name):
            return float(f[name]) if f.get(name) else None

        return cls(
            id=f["id"],
            request=json.loads(f["request"]),
            owner=f.get("owner", "anonymous"),
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


@dataclass
class QueueStats:
    queued: int
    running: int
    workers: dict[str, dict[str, Any]]  # live workers only: name -> last heartbeat
    model: dict[str, Any] | None

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
    """What the API (async methods) and the worker (blocking methods) know about the queue."""

    kind: str
    poll_s: float  # how often a waiter re-reads a job even without a notification

    # ---- API side ----
    @abstractmethod
    async def submit(self, job: Job, max_depth: int, idempotency: tuple[str, str] | None = None) -> tuple[Job, bool]:
        """Queue ``job``; returns (job, created). ``idempotency`` = (key, request fingerprint):
        a known key with the same fingerprint returns the earlier job (created False), another
        fingerprint raises IdempotencyConflict. Raises QueueFull when ``max_depth`` jobs wait."""

    @abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    async def cancel(self, job_id: str) -> Job | None:
        """A queued job is canceled now and never runs; a running one stops at its next step."""

    @abstractmethod
    async def images(self, job_id: str, count: int) -> list[bytes | None]: ...

    @abstractmethod
    def watch(self, job_id: str, progress: bool = True) -> contextlib.AbstractAsyncContextManager[Watch]: ...

    @abstractmethod
    async def stats(self) -> QueueStats: ...

    @abstractmethod
    async def ping(self) -> None:
        """Raise QueueUnavailable if the store cannot be reached."""

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
    def progress(self, jobs: list[Job], step: int, steps: int) -> set[str]:
        """Record progress; returns the ids of jobs whose cancellation was requested."""

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

    def close(self) -> None:
        return None


# -- in memory ---------------------------------------------------------------------------------
class MemoryJobQueue(JobQueue):
    """The embedded mode's queue: a deque and a dict under one lock. Nothing survives a restart."""

    kind = "memory"
    poll_s = 30.0

    def __init__(self, result_ttl_s: float = 24 * 3600):
        self._cv = threading.Condition()
        self._jobs: dict[str, Job] = {}
        self._images: dict[str, list[bytes]] = {}
        self._order: deque[str] = deque()
        self._idem: dict[tuple[str, str], tuple[str, str, float]] = {}
        self._watchers: dict[str, set[Watch]] = defaultdict(set)
        self._workers: dict[str, dict[str, Any]] = {}
        self._model: dict[str, Any] | None = None
        self._rate: dict[tuple[str, int], int] = {}
        self._ttl = result_ttl_s
        self._next_sweep = 0.0

    def _notify(self, job_id: str, progress: bool = False) -> None:
        for watch in list(self._watchers.get(job_id, ())):
            if watch.progress or not progress:
                watch.notify()

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 10
        expired = [j.id for j in self._jobs.values() if j.finished is not None and j.finished + self._ttl < now]
        for job_id in expired:
            self._jobs.pop(job_id, None)
            self._images.pop(job_id, None)
        self._idem = {k: v for k, v in self._idem.items() if v[2] > now}
        window = int(now // 60)
        self._rate = {k: v for k, v in self._rate.items() if k[1] >= window - 60}

    def _view(self, job: Job) -> Job:
        out = copy.deepcopy(job)
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
            elif job.status == RUNNING:
                job.cancel_requested = True
            self._notify(job_id)
            return self._view(job)

    async def images(self, job_id, count):
        with self._cv:
            stored = self._images.get(job_id, [])
            return [stored[i] if i < len(stored) else None for i in range(count)]

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
            return QueueStats(len(self._order), running, workers, copy.deepcopy(self._model))

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
                else:
                    job.status, job.worker, job.started, job.step = RUNNING, consumer, now, 0
                    job.attempts += 1
                    runnable.append(copy.deepcopy(job))
                self._notify(job.id)
        return runnable

    def progress(self, jobs, step, steps):
        canceled = set()
        with self._cv:
            for j in jobs:
                job = self._jobs.get(j.id)
                if job is None or job.status != RUNNING:
                    continue
                job.step, job.steps = step, steps
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


# -- Redis Streams -----------------------------------------------------------------------------
_SUBMIT = """
-- KEYS: stream, job, idempotency ('' = none)
-- ARGV: group, max_depth, ttl, job id, fingerprint, field, value, field, value, ...
if KEYS[3] ~= '' then
  local known = redis.call('GET', KEYS[3])
  if known then
    local id = string.match(known, '^(%S+)')
    local known_key = string.gsub(KEYS[2], '[^:]+$', id)
    if redis.call('EXISTS', known_key) == 1 then return {'dup', known} end
  end
end
local pending = 0
local summary = redis.pcall('XPENDING', KEYS[1], ARGV[1])
if type(summary) == 'table' and summary['err'] then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
else
  pending = tonumber(summary[1])
end
local queued = redis.call('XLEN', KEYS[1]) - pending
if queued >= tonumber(ARGV[2]) then return {'full', tostring(queued)} end
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
local sid = redis.call('XADD', KEYS[1], '*', 'id', ARGV[4])
redis.call('HSET', KEYS[2], 'stream_id', sid)
redis.call('EXPIRE', KEYS[2], ARGV[3])
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[4] .. ' ' .. ARGV[5], 'EX', ARGV[3]) end
return {'ok', sid}
"""

_CANCEL = """
-- KEYS: job, stream, events   ARGV: now, job id
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return false end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished', ARGV[1], 'cancel', '1')
  local sid = redis.call('HGET', KEYS[1], 'stream_id')
  if sid and sid ~= '' then redis.call('XDEL', KEYS[2], sid) end
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
else
  return st
end
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', KEYS[3], ARGV[2])
return st
"""

_START = """
-- KEYS: job, events   ARGV: consumer, now, job id
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 'skip' end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('PUBLISH', KEYS[2], ARGV[3])
  return 'canceled'
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started', ARGV[2], 'step', '0')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', KEYS[2], ARGV[3])
return 'run'
"""

_PROGRESS = """
-- KEYS: events, job...   ARGV: step, steps, job id...   -> ids whose cancellation was requested
local canceled = {}
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'status') == 'running' then
    redis.call('HSET', KEYS[i], 'step', ARGV[1], 'steps', ARGV[2])
    redis.call('HINCRBY', KEYS[i], 'version', 1)
    redis.call('PUBLISH', KEYS[1], ARGV[i + 1] .. ' p')
    if redis.call('HGET', KEYS[i], 'cancel') == '1' then table.insert(canceled, ARGV[i + 1]) end
  end
end
return canceled
"""

_FINISH = """
-- KEYS: job, events, image...   ARGV: job id, now, status, payload field ('' = none), payload, ttl, image...
-- Compare-and-set: only a job without a final state gets one. Returns 1 stored, 2 canceled instead, 0 nothing.
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
local status = ARGV[3]
if status == 'succeeded' and redis.call('HGET', KEYS[1], 'cancel') == '1' then status = 'canceled' end
if status == 'succeeded' then
  for i = 3, #KEYS do redis.call('SET', KEYS[i], ARGV[i + 4], 'EX', ARGV[6]) end
  redis.call('HSET', KEYS[1], 'step', redis.call('HGET', KEYS[1], 'steps'))
end
if status == ARGV[3] and ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[4], ARGV[5]) end
redis.call('HSET', KEYS[1], 'status', status, 'finished', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('PUBLISH', KEYS[2], ARGV[1])
if status == ARGV[3] then return 1 end
return 2
"""

_RELEASE = """
-- KEYS: job, stream, events   ARGV: group, stream id, job id
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
local sid = redis.call('XADD', KEYS[2], '*', 'id', ARGV[3])
redis.call('HSET', KEYS[1], 'status', 'queued', 'stream_id', sid, 'step', '0', 'worker', '', 'started', '')
redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 1
"""

_DEAD_LETTER = """
-- KEYS: job, stream, dead, events   ARGV: group, stream id, job id, deliveries, now, error json, ttl
redis.call('XADD', KEYS[3], 'MAXLEN', '~', '10000', '*', 'id', ARGV[3], 'stream_id', ARGV[2],
           'deliveries', ARGV[4], 'time', ARGV[5])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' or st == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[6], 'finished', ARGV[5])
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[7])
  redis.call('PUBLISH', KEYS[4], ARGV[3])
end
return 1
"""

_SCRIPTS = {
    "submit": _SUBMIT,
    "cancel": _CANCEL,
    "start": _START,
    "progress": _PROGRESS,
    "finish": _FINISH,
    "release": _RELEASE,
    "dead_letter": _DEAD_LETTER,
}


def _stream_key(sid: str) -> tuple[int, int]:
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)


class RedisJobQueue(JobQueue):
    """Redis Streams with a consumer group; state in hashes with a TTL; changes on pub/sub."""

    kind = "redis"
    poll_s = 1.0
    GROUP = "workers"

    def __init__(
        self,
        url: str,
        prefix: str = "snapgen",
        result_ttl_s: int = 24 * 3600,
        claim_idle_s: float = 30.0,
        max_deliveries: int = 3,
        socket_timeout_s: float = 5.0,
    ):
        self.url = url
        self.prefix = prefix
        self.ttl = int(result_ttl_s)
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.max_deliveries = max_deliveries
        self.reclaim_interval_s = max(0.05, min(claim_idle_s / 2, 5.0))
        self._socket_timeout = socket_timeout_s
        self.stream, self.dead, self.events = f"{prefix}:jobs", f"{prefix}:dead", f"{prefix}:events"
        self.workers_key, self.model_key = f"{prefix}:workers", f"{prefix}:model"
        self._sync = None
        self._sync_scripts: dict[str, Any] = {}
        self._aio = None
        self._aio_scripts: dict[str, Any] = {}
        self._subscribers: dict[str, set[Watch]] = defaultdict(set)
        self._listener: asyncio.Task | None = None
        self._next_reclaim = 0.0
        self._group_ready = False
        self._dead_lettered = 0

    @classmethod
    def from_settings(cls, settings) -> RedisJobQueue:
        """The queue that `snapgen serve --redis` and `snapgen worker` share."""
        return cls(
            settings.redis_url,
            prefix=settings.redis_prefix,
            result_ttl_s=settings.result_ttl_s,
            claim_idle_s=settings.claim_idle_s,
            max_deliveries=settings.max_deliveries,
        )

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def image_key(self, job_id: str, index: int) -> str:
        return f"{self.prefix}:img:{job_id}:{index}"

    # ---- connections ----
    def _client_kwargs(self) -> dict[str, Any]:
        return dict(socket_connect_timeout=2.0, socket_timeout=self._socket_timeout, health_check_interval=10)

    @property
    def sync(self):
        if self._sync is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # One immediate retry: a pooled connection that died with a Redis restart reconnects.
            self._sync = redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 1), **self._client_kwargs())
            self._sync_scripts = {name: self._sync.register_script(src) for name, src in _SCRIPTS.items()}
        return self._sync

    @property
    def aio(self):
        if self._aio is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # A bounded pool: a burst of hundreds of requests waits for one of 64 connections
            # instead of opening hundreds at once, whose connects then time out (seen: 503s at
            # 200 concurrent clients on 2 cores).
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=64, timeout=30.0, retry=Retry(NoBackoff(), 1), **self._client_kwargs()
            )
            self._aio = aioredis.Redis(connection_pool=pool)
            self._aio_scripts = {name: self._aio.register_script(src) for name, src in _SCRIPTS.items()}
        return self._aio

    def _script(self, name: str):
        _ = self.sync
        return self._sync_scripts[name]

    def _ascript(self, name: str):
        _ = self.aio
        return self._aio_scripts[name]

    @staticmethod
    def _translate(e: Exception) -> Exception:
        import redis.exceptions as rex

        if isinstance(e, (rex.ConnectionError, rex.TimeoutError, OSError)):
            return QueueUnavailable(f"Redis is unreachable: {e}")
        if isinstance(e, rex.ResponseError) and str(e).split(" ", 1)[0] in ("LOADING", "MISCONF", "READONLY"):
            return QueueUnavailable(f"Redis cannot serve requests now: {e}")
        return e

    @contextlib.contextmanager
    def _errors(self):
        import redis.exceptions as rex

        try:
            yield
        except (rex.RedisError, OSError) as e:
            translated = self._translate(e)
            if translated is e:
                raise
            raise translated from e

    # ---- API side ----
    async def submit(self, job, max_depth, idempotency=None):
        idem_key = ""
        fingerprint = ""
        if idempotency is not None:
            digest = hashlib.sha256(idempotency[0].encode()).hexdigest()[:32]
            idem_key, fingerprint = f"{self.prefix}:idem:{job.owner}:{digest}", idempotency[1]
        fields = job.to_fields()
        args = [self.GROUP, max_depth, self.ttl, job.id, fingerprint]
        for key, value in fields.items():
            args += [key, value]
        with self._errors():
            kind, value = await self._ascript("submit")(keys=[self.stream, self.job_key(job.id), idem_key], args=args)
        kind, value = _s(kind), _s(value)
        if kind == "full":
            raise QueueFull(int(value))
        if kind == "dup":
            known_id, _, known_fp = value.partition(" ")
            if known_fp != fingerprint:
                raise IdempotencyConflict(known_id)
            known = await self.get(known_id)
            if known is not None:
                return known, False
            return await self.submit(job, max_depth, None)
        job = copy.deepcopy(job)
        job.stream_id = value
        job.queue_position = await self._position(value)
        return job, True

    async def _position(self, stream_id: str) -> int:
        with self._errors():
            groups = await self.aio.xinfo_groups(self.stream)
            last = next((_s(g["last-delivered-id"]) for g in groups if _s(g["name"]) == self.GROUP), "0-0")
            if _stream_key(stream_id) <= _stream_key(last):
                return 0
            ahead = await self.aio.xrange(self.stream, min=f"({last}", max=f"({stream_id}")
            return len(ahead)

    async def get(self, job_id):
        with self._errors():
            raw = await self.aio.hgetall(self.job_key(job_id))
        if not raw:
            return None
        job = Job.from_fields(raw)
        if job.status == QUEUED and job.stream_id:
            job.queue_position = await self._position(job.stream_id)
        return job

    async def cancel(self, job_id):
        with self._errors():
            status = await self._ascript("cancel")(
                keys=[self.job_key(job_id), self.stream, self.events], args=[repr(time.time()), job_id]
            )
        if status is None:
            return None
        return await self.get(job_id)

    async def images(self, job_id, count):
        if count <= 0:
            return []
        with self._errors():
            return await self.aio.mget([self.image_key(job_id, i) for i in range(count)])

    @contextlib.asynccontextmanager
    async def watch(self, job_id, progress=True) -> AsyncIterator[Watch]:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())
        watch = Watch(progress)
        self._subscribers[job_id].add(watch)
        try:
            yield watch
        finally:
            self._subscribers[job_id].discard(watch)
            if not self._subscribers[job_id]:
                del self._subscribers[job_id]

    async def _listen(self) -> None:
        """One pub/sub subscription per process fans job changes out to the local waiters."""
        import redis.exceptions as rex

        while True:
            pubsub = self.aio.pubsub()
            try:
                await pubsub.subscribe(self.events)
                for watches in list(self._subscribers.values()):  # changes may have been missed
                    for w in list(watches):
                        w.notify()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    job_id, _, kind = _s(message["data"]).partition(" ")
                    for w in list(self._subscribers.get(job_id, ())):
                        if w.progress or kind != "p":
                            w.notify()
            except asyncio.CancelledError:
                raise
            except (rex.RedisError, OSError):
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def stats(self):
        now = time.time()
        with self._errors():
            async with self.aio.pipeline(transaction=False) as pipe:
                pipe.xlen(self.stream)
                pipe.xpending(self.stream, self.GROUP)
                pipe.hgetall(self.workers_key)
                pipe.get(self.model_key)
                length, pending, workers, model = await pipe.execute(raise_on_error=False)
        for value in (length, workers, model):
            if isinstance(value, Exception):
                raise self._translate(value)
        running = 0 if isinstance(pending, Exception) else int(pending["pending"])
        alive = {}
        for name, info in (workers or {}).items():
            info = json.loads(info)
            if _alive(info, now):
                alive[_s(name)] = info
        return QueueStats(max(0, int(length) - running), running, alive, json.loads(model) if model else None)

    async def ping(self):
        with self._errors():
            await self.aio.ping()

    async def hit(self, bucket, window_s):
        now = time.time()
        window = int(now // window_s)
        key = f"{self.prefix}:rate:{bucket}:{window}"
        with self._errors():
            async with self.aio.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, window_s * 2)
                count, _ = await pipe.execute()
        return int(count), (window + 1) * window_s - now

    async def aclose(self):
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(BaseException):
                await self._listener
        if self._aio is not None:
            await self._aio.aclose()

    # ---- worker side ----
    def _ensure_group(self) -> None:
        import redis.exceptions as rex

        if self._group_ready:
            return
        with self._errors():
            try:
                self.sync.xgroup_create(self.stream, self.GROUP, id="0", mkstream=True)
            except rex.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._group_ready = True

    @contextlib.contextmanager
    def _group_errors(self):
        """A NOGROUP error means Redis lost its data: create the group again next time."""
        import redis.exceptions as rex

        try:
            with self._errors():
                yield
        except rex.ResponseError as e:
            if "NOGROUP" in str(e):
                self._group_ready = False
                raise QueueUnavailable(f"the consumer group is gone (Redis lost its data?): {e}") from e
            raise

    def reserve(self, consumer, max_jobs, block_s):
        self._ensure_group()
        entries: list[tuple[str, int]] = []  # (stream id, deliveries)
        ids: dict[str, str] = {}
        with self._group_errors():
            now = time.monotonic()
            if now >= self._next_reclaim:
                self._next_reclaim = now + self.reclaim_interval_s
                for sid, job_id, deliveries in self._reclaim(consumer, max_jobs):
                    entries.append((sid, deliveries))
                    ids[sid] = job_id
            if len(entries) < max_jobs:
                block = int(block_s * 1000) if block_s > 0 and not entries else None
                reply = self.sync.xreadgroup(
                    self.GROUP, consumer, {self.stream: ">"}, count=max_jobs - len(entries), block=block
                )
                for _stream, messages in reply or []:
                    for sid, message in messages:
                        if not message:
                            continue
                        sid = _s(sid)
                        ids[sid] = _s(message[b"id"])
                        entries.append((sid, 1))
            return self._load(entries, ids)

    def _reclaim(self, consumer: str, max_jobs: int) -> list[tuple[str, str, int]]:
        """XAUTOCLAIM the jobs of silent workers; dead-letter those delivered too often."""
        reply = self.sync.xautoclaim(self.stream, self.GROUP, consumer, self.claim_idle_ms, "0-0", count=max_jobs)
        claimed = [(_s(sid), message) for sid, message in reply[1] if message]
        out = []
        for sid, message in claimed:
            job_id = _s(message[b"id"])
            info = self.sync.xpending_range(self.stream, self.GROUP, min=sid, max=sid, count=1)
            deliveries = int(info[0]["times_delivered"]) if info else self.max_deliveries + 1
            if deliveries > self.max_deliveries:
                self._dead_letter(sid, job_id, deliveries - 1)
            else:
                out.append((sid, job_id, deliveries))
        return out

    def _dead_letter(self, sid: str, job_id: str, deliveries: int) -> None:
        error = {
            "code": "dead_lettered",
            "message": f"the job was delivered {deliveries} times and no worker finished it (workers died while "
            "running it); it was moved to the dead-letter stream",
        }
        self._script("dead_letter")(
            keys=[self.job_key(job_id), self.stream, self.dead, self.events],
            args=[self.GROUP, sid, job_id, deliveries, repr(time.time()), json.dumps(error), self.ttl],
        )
        self._dead_lettered += 1

    def take_dead_lettered(self) -> int:
        count, self._dead_lettered = self._dead_lettered, 0
        return count

    def _load(self, entries: list[tuple[str, int]], ids: dict[str, str]) -> list[Job]:
        if not entries:
            return []
        pipe = self.sync.pipeline(transaction=False)
        for sid, _ in entries:
            pipe.hgetall(self.job_key(ids[sid]))
        raws = pipe.execute()
        jobs, gone = [], []
        for (sid, deliveries), raw in zip(entries, raws):
            if not raw:
                gone.append(sid)  # expired or never fully written
                continue
            job = Job.from_fields(raw)
            job.stream_id, job.deliveries = sid, deliveries
            jobs.append(job)
        if gone:
            self._ack(gone)
        return jobs

    def _ack(self, stream_ids: list[str]) -> None:
        pipe = self.sync.pipeline(transaction=True)
        pipe.xack(self.stream, self.GROUP, *stream_ids)
        pipe.xdel(self.stream, *stream_ids)
        pipe.execute()

    def start(self, consumer, jobs):
        runnable, done = [], []
        now = repr(time.time())
        with self._errors():
            for job in jobs:
                outcome = _s(
                    self._script("start")(keys=[self.job_key(job.id), self.events], args=[consumer, now, job.id])
                )
                if outcome == "run":
                    job = copy.deepcopy(job)
                    job.status, job.worker, job.attempts = RUNNING, consumer, job.attempts + 1
                    job.started = float(now)
                    runnable.append(job)
                elif job.stream_id:
                    done.append(job.stream_id)
            if done:
                self._ack(done)
        return runnable

    def progress(self, jobs, step, steps):
        if not jobs:
            return set()
        with self._errors():
            canceled = self._script("progress")(
                keys=[self.events, *(self.job_key(j.id) for j in jobs)], args=[step, steps, *(j.id for j in jobs)]
            )
        return {_s(c) for c in canceled}

    def _finish(self, job: Job, status: str, field_name: str = "", payload: str = "", images=()) -> bool:
        keys = [self.job_key(job.id), self.events, *(self.image_key(job.id, i) for i in range(len(images)))]
        args = [job.id, repr(time.time()), status, field_name, payload, self.ttl, *images]
        with self._errors():
            stored = int(self._script("finish")(keys=keys, args=args))
            if job.stream_id:
                self._ack([job.stream_id])
        return stored == 1

    def complete(self, job, images, result):
        return self._finish(job, SUCCEEDED, "result", json.dumps(result), images)

    def fail(self, job, error):
        return self._finish(job, FAILED, "error", json.dumps(error))

    def mark_canceled(self, job):
        return self._finish(job, CANCELED)

    def release(self, jobs):
        with self._errors():
            for job in jobs:
                if job.stream_id:
                    self._script("release")(
                        keys=[self.job_key(job.id), self.stream, self.events], args=[self.GROUP, job.stream_id, job.id]
                    )

    def heartbeat(self, consumer, info, held=()):
        payload = {**info, "ts": time.time()}
        model = payload.pop("model", None)
        self._ensure_group()
        with self._group_errors():
            pipe = self.sync.pipeline(transaction=False)
            pipe.hset(self.workers_key, consumer, json.dumps(payload))
            if model is not None:
                pipe.set(self.model_key, json.dumps(model))
            pipe.xpending_range(self.stream, self.GROUP, min="-", max="+", count=1000, consumername=consumer)
            *_, mine = pipe.execute()
            # Reset the idle time of the jobs this worker still holds (and owns: one reclaimed while this
            # worker was frozen stays with its new owner), so no other worker takes them. JUSTID: not a
            # delivery. Entries the worker no longer knows about are left to be reclaimed.
            wanted = {j.stream_id for j in held if j.stream_id}
            mine = [_s(p["message_id"]) for p in mine if _s(p["message_id"]) in wanted]
            if mine:
                self.sync.xclaim(self.stream, self.GROUP, consumer, 0, mine, justid=True)
            # Forget workers silent for an hour.
            for name, raw in self.sync.hgetall(self.workers_key).items():
                if time.time() - float(json.loads(raw).get("ts", 0)) > 3600:
                    self.sync.hdel(self.workers_key, name)

    def deregister(self, consumer):
        with self._errors():
            self.sync.hdel(self.workers_key, consumer)

    def close(self):
        if self._sync is not None:
            self._sync.close()


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable digest of a request body, for Idempotency-Key conflict checks."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
