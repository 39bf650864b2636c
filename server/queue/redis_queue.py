"""The scaled-out mode's queue: any number of API processes and workers sharing one Redis.

Redis layout (``P`` is the key prefix, ``snapgen`` by default)::

    P:jobs              stream, consumer group "workers": one entry {id} per queued job
    P:dead              dead-letter stream: jobs delivered more than K times
    P:job:<id>          hash: status, request, progress, result/error, ... (TTL)
    P:img:<id>:<i>      encoded image bytes (TTL)
    P:input:<id>        the image-to-image input as uploaded (until the job is final)
    P:preview:<id>      the latest step preview of a job that asked for previews (short TTL)
    P:done              sorted set of finished jobs by finish time, for the retention caps (lua/retain.lua)
    P:done:bytes        their total bytes;  P:done:evicted: jobs ever evicted to stay within the caps
    P:idem:<owner>:<h>  "<job id> <request fingerprint>" for an Idempotency-Key (TTL)
    P:events            pub/sub channel: the id of every job whose state changed
    P:workers           hash: worker name -> last heartbeat (JSON)
    P:model             the model the workers serve (JSON), for validation and /v1/models
    P:rate:<key>:<win>  fixed-window request counters
    P:webhooks          stream, consumer group "dispatchers": webhook deliveries owed (redis_webhooks.py)

Delivery is at-least-once (a worker can die after finishing a job but before acknowledging it),
so every state change is a compare-and-set in a Lua script (lua/): a job reaches a final state once
and a re-delivered job never yields a second, different result.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import time
from collections.abc import AsyncIterator

from . import redis_client
from .base import (
    QUEUED,
    IdempotencyConflict,
    Job,
    JobQueue,
    QueueFull,
    QueueStats,
    Watch,
    _alive,
    _s,
)
from .redis_webhooks import RedisWebhookOutbox
from .redis_worker import RedisWorkerSide


def _stream_key(sid: str) -> tuple[int, int]:
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)


class RedisJobQueue(RedisWorkerSide, RedisWebhookOutbox, JobQueue):
    """Redis Streams with a consumer group; state in hashes with a TTL; changes on pub/sub."""

    kind = "redis"
    poll_s = 1.0
    MEMORY_CHECK_S = 0.5  # how long submit trusts its last look at Redis's memory

    @classmethod
    def from_settings(cls, settings) -> RedisJobQueue:
        """The queue that `snapgen serve --redis` and `snapgen worker` share."""
        return cls(
            settings.redis_url,
            prefix=settings.redis_prefix,
            result_ttl_s=settings.result_ttl_s,
            claim_idle_s=settings.claim_idle_s,
            max_deliveries=settings.max_deliveries,
            result_max_jobs=settings.result_max_jobs,
            result_max_bytes=settings.result_max_bytes,
            high_water=settings.redis_high_water,
            webhook_output_interval_s=settings.webhook_output_interval_s,
        )

    async def _check_memory(self, max_age_s: float) -> None:
        """Raise QueueStoreFull when Redis's used memory is above the high-water mark of its maxmemory."""
        checked_at, full = self._memory_checked
        if time.monotonic() - checked_at > max_age_s:
            with self._errors():
                info = await self.aio.info("memory")
            full = redis_client.memory_full(info, self.high_water)
            self._memory_checked = (time.monotonic(), full)
        if full is not None:
            raise full

    # ---- API side ----
    async def submit(self, job, max_depth, idempotency=None):
        # Refused before Redis is full: the results of the jobs already accepted need the room that is left.
        await self._check_memory(self.MEMORY_CHECK_S)
        idem_key = ""
        fingerprint = ""
        if idempotency is not None:
            digest = hashlib.sha256(idempotency[0].encode()).hexdigest()[:32]
            idem_key, fingerprint = f"{self.prefix}:idem:{job.owner}:{digest}", idempotency[1]
        fields = job.to_fields()
        input_key = self.input_key(job.id) if job.input_image is not None else ""
        args = [self.GROUP, max_depth, self.ttl, job.id, fingerprint, job.input_image or b""]
        for key, value in fields.items():
            args += [key, value]
        keys = [self.stream, self.job_key(job.id), idem_key, input_key]
        with self._errors():
            kind, value = await self._ascript("submit")(keys=keys, args=args)
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
        job.stream_id, job.input_image = value, None
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
                keys=[self.job_key(job_id), self.stream, self.events, *self.done_keys],
                args=[repr(time.time()), job_id, *self._retention],
            )
        if status is None:
            return None
        return await self.get(job_id)

    async def images(self, job_id, count):
        if count <= 0:
            return []
        with self._errors():
            return await self.aio.mget([self.image_key(job_id, i) for i in range(count)])

    async def preview(self, job_id):
        with self._errors():
            return await self.aio.get(self.preview_key(job_id))

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
        """One pub/sub subscription per process fans job changes out to the local waiters.

        Its own reconnect loop: a subscription is one long-lived connection that must be made again and
        subscribed again, and the waiters woken in case they missed a change meanwhile."""
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
                pipe.zcard(self.done_keys[0])
                pipe.get(self.done_keys[1])
                pipe.get(self.done_keys[2])
                replies = await pipe.execute(raise_on_error=False)
        length, pending, workers, model, done, done_bytes, evicted = replies
        for value in (length, workers, model, done, done_bytes, evicted):
            if isinstance(value, Exception):
                raise self._translate(value)
        running = 0 if isinstance(pending, Exception) else int(pending["pending"])
        alive = {}
        for name, info in (workers or {}).items():
            info = json.loads(info)
            if _alive(info, now):
                alive[_s(name)] = info
        return QueueStats(
            max(0, int(length) - running), running, alive, json.loads(model) if model else None,
            retained_jobs=int(done), retained_bytes=int(done_bytes or 0), evicted=int(evicted or 0),
        )  # fmt: skip

    async def ping(self):
        with self._errors():
            await self.aio.ping()
        await self._check_memory(0.0)

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
