"""The worker's (blocking) half of :class:`~server.queue.redis_queue.RedisJobQueue`.

Every Redis error reaches the worker as a QueueError (QueueUnavailable, QueueStoreFull when Redis is
full), never as one of redis-py's own exceptions.
"""

from __future__ import annotations

import copy
import json
import time

from .base import CANCELED, FAILED, RUNNING, SUCCEEDED, Job, _s
from .redis_client import RedisStore


class RedisWorkerSide(RedisStore):
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

    def reserve(self, consumer, max_jobs, block_s):
        self._ensure_group()
        entries: list[tuple[str, int]] = []  # (stream id, deliveries)
        ids: dict[str, str] = {}
        with self._errors():
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
            keys=[self.job_key(job_id), self.stream, self.dead, self.events, *self.done_keys],
            args=[self.GROUP, sid, job_id, deliveries, repr(time.time()), json.dumps(error), *self._retention],
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
            pipe.get(self.input_key(ids[sid]))
        replies = pipe.execute()
        jobs, gone = [], []
        for (sid, deliveries), raw, input_image in zip(entries, replies[::2], replies[1::2]):
            if not raw:
                gone.append(sid)  # expired, evicted or never fully written
                continue
            job = Job.from_fields(raw)
            job.stream_id, job.deliveries, job.input_image = sid, deliveries, input_image
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
                    self._script("start")(
                        keys=[self.job_key(job.id), self.events, *self.done_keys],
                        args=[consumer, now, job.id, *self._retention],
                    )
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

    # A preview is for watching a running job: it outlives a stalled worker briefly, then goes.
    PREVIEW_TTL_S = 120

    def progress(self, jobs, step, steps, previews=None):
        if not jobs:
            return set()
        with self._errors():
            if previews:
                pipe = self.sync.pipeline(transaction=False)
                for job_id, image in previews.items():
                    pipe.set(self.preview_key(job_id), image, ex=self.PREVIEW_TTL_S)
                pipe.execute()
            canceled = self._script("progress")(
                keys=[self.events, *(self.job_key(j.id) for j in jobs)], args=[step, steps, *(j.id for j in jobs)]
            )
            due = [j for j in jobs if "output" in j.webhook_events and self.output_throttle.due(j.id, step, steps)]
            if due:
                keys, now = [self.job_key(j.id) for j in due], repr(time.time())
                self._script("webhook_output")(keys=keys, args=[self.prefix, now])
        return {_s(c) for c in canceled}

    def _finish(self, job: Job, status: str, field_name: str = "", payload: str = "", images=()) -> bool:
        keys = [self.job_key(job.id), self.events, *self.done_keys]
        keys += [self.image_key(job.id, i) for i in range(len(images))]
        args = [job.id, repr(time.time()), status, field_name, payload, *self._retention, *images]
        self.output_throttle.forget(job.id)
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
        with self._errors():
            pipe = self.sync.pipeline(transaction=False)
            pipe.hset(self.workers_key, consumer, json.dumps(payload))
            if model is not None:
                pipe.set(self.model_key, json.dumps(model))
            pipe.xpending_range(self.stream, self.GROUP, min="-", max="+", count=1000, consumername=consumer)
            *written, mine = pipe.execute(raise_on_error=False)
            if isinstance(mine, Exception):
                raise mine
            # Reset the idle time of the jobs this worker still holds (and owns: one reclaimed while this
            # worker was frozen stays with its new owner), so no other worker takes them. JUSTID: not a
            # delivery. Entries the worker no longer knows about are left to be reclaimed. Done even when
            # the writes above failed (a full Redis refuses them; XCLAIM needs no memory).
            wanted = {j.stream_id for j in held if j.stream_id}
            mine = [_s(p["message_id"]) for p in mine if _s(p["message_id"]) in wanted]
            if mine:
                self.sync.xclaim(self.stream, self.GROUP, consumer, 0, mine, justid=True)
            for error in written:
                if isinstance(error, Exception):
                    raise error
            # Forget workers silent for an hour.
            for name, raw in self.sync.hgetall(self.workers_key).items():
                if time.time() - float(json.loads(raw).get("ts", 0)) > 3600:
                    self.sync.hdel(self.workers_key, name)

    def deregister(self, consumer):
        with self._errors():
            self.sync.hdel(self.workers_key, consumer)
