"""The worker: takes jobs from the queue, batches compatible ones, runs them on a backend.

One loop: reserve jobs -> validate -> group by (size, steps, guidance) up to ``max_batch_images``
-> start -> generate (progress and cancellation every step) -> encode -> complete. Jobs that do
not fit the batch wait in a small local buffer (still owned by this worker, kept alive by the
heartbeat) for the next round.

Shutdown (SIGTERM, or the embedded server stopping): no new jobs are taken; the running batch
finishes if it can within ``drain_timeout_s``, otherwise it stops at the next step and its jobs
(and the buffered ones) are handed back to the queue for another worker. A second SIGTERM hands
back at once. A worker killed outright (SIGKILL, power loss) is covered by the queue: its jobs
are reclaimed after ``claim_idle_s`` and run elsewhere.

A backend whose model service is down (``BackendUnavailable``: Triton unreachable, a model not ready)
does not fail jobs: the worker hands them back to the queue (a job that already had ``max_attempts``
runs fails instead, as a dead-lettered one would), takes no jobs, reports the reason in its heartbeat
(``/readyz`` shows it) and probes the backend until it can serve again. The heartbeat also probes an
idle ready worker's backend, so an outage shows before a job runs into it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from snapgen.image_files import encode_image, fit_input_image, image_parameters
from snapgen.request import InvalidRequestError, ResolvedRequest

from .backends import Backend, BackendUnavailable
from .batch_steps import BatchSteps, StopBatch
from .queue import QUEUED, RUNNING, Job, JobQueue, QueueError

log = logging.getLogger("snapgen.worker")


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        load_backend: Callable[[], Backend],
        *,
        name: str | None = None,
        max_batch_images: int = 8,
        batch_wait_ms: float = 0.0,
        heartbeat_s: float = 2.0,
        drain_timeout_s: float = 20.0,
        warmup: bool = True,
        metrics: Any = None,
        max_attempts: int | None = None,
    ):
        self.queue = queue
        self.load_backend = load_backend
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.max_batch_images = max_batch_images
        self.batch_wait_s = batch_wait_ms / 1000
        self.heartbeat_s = heartbeat_s
        self.drain_timeout_s = drain_timeout_s
        self.do_warmup = warmup
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.backend: Backend | None = None
        self.info: dict[str, Any] | None = None
        self.state = "starting"
        self.error: str | None = None
        self.reason: str | None = None  # why the backend cannot serve (BackendUnavailable), None when it can
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self._stopping = threading.Event()
        self._deadline: float | None = None
        self._buffer: list[Job] = []
        self._active: list[Job] = []
        self._resolved: dict[str, ResolvedRequest] = {}  # validated jobs, kept until they start
        self._inputs: dict[str, Any] = {}  # their input images, decoded at the requested size
        self._avg_batch_s: float | None = None
        self._thread: threading.Thread | None = None
        self._heartbeat: threading.Thread | None = None
        self._busy = False

    # -- control ----------------------------------------------------------------------------
    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking jobs; the running batch may finish within the drain timeout. Again: hand back now."""
        now = time.monotonic()
        if self._stopping.is_set():
            self._deadline = now
        else:
            drain = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
            self._deadline = now + drain
            self._stopping.set()
        log.info("worker %s stopping (hand-back deadline in %.1fs)", self.name, max(0.0, self._deadline - now))

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def start_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._run_catching, name=f"worker-{self.name}", daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run_catching(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("worker %s failed", self.name)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.state = "loading"
            self.backend = self.load_backend()
            self.info = self.backend.describe()
            self._start_up()
            if self._stopping.is_set():
                return
            self._start_heartbeat()
            # Redis down, full or refusing: wait for it (however long), and stop when told to.
            backoff = 0.2
            while not self._stopping.is_set():
                try:
                    self._send_heartbeat()
                    break
                except QueueError as e:
                    log.warning("worker %s: queue unavailable (%s); retrying in %.1fs", self.name, e, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
            self.state = "ready"
            self.ready.set()
            log.info("worker %s ready: model %s on %s", self.name, self.info["id"], self.info["device"])
            # No queue error ends the worker: the round is tried again, and the jobs it held stay held.
            backoff = 0.2
            while not self._stopping.is_set():
                try:
                    if self.reason is not None:
                        self._wait_for_backend()
                        continue
                    self._round()
                    backoff = 0.2
                    self._store_outage = None
                except QueueError as e:
                    log.warning("worker %s: queue unavailable (%s); retrying in %.1fs", self.name, e, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
        except Exception as e:
            self.state = "failed"
            self.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            if self._buffer:
                self._hand_back(self._buffer)
                self._buffer = []
            if self.state != "failed":
                self.state = "stopped"
            self.stopped.set()
            with_timeout(lambda: self.queue.deregister(self.name))

    def _start_up(self) -> None:
        """Warm up (without warm-up: check the backend); while the backend cannot serve, report why and wait."""
        while not self._stopping.is_set():
            try:
                if self.do_warmup:
                    self.state = "warming up"
                    started = time.perf_counter()
                    self.backend.warmup()
                    log.info("worker %s warmed up in %.2fs", self.name, time.perf_counter() - started)
                else:
                    reason = self.backend.health()
                    if reason is not None:
                        raise BackendUnavailable(reason)
                return
            except BackendUnavailable as e:
                self.reason = str(e)
                self._wait_for_backend()

    def _wait_for_backend(self) -> None:
        """Take no jobs while the backend cannot serve: hand back what is buffered, report why, probe until it can."""
        was_ready = self.ready.is_set()
        self.state = "waiting for backend"
        log.warning("worker %s: the backend cannot serve (%s); taking no jobs until it can", self.name, self.reason)
        if self._buffer:
            self._hand_back(self._buffer)
            self._buffer = []
        self._start_heartbeat()
        self._heartbeat_now()
        backoff = 0.5
        while not self._stopping.wait(backoff):
            reason = self.backend.health()
            if reason is None:
                log.info("worker %s: the backend can serve again", self.name)
                self.reason = None
                self.state = "ready" if was_ready else "loading"
                self._heartbeat_now()
                return
            self.reason = reason
            backoff = min(backoff * 2, 5.0)

    def _retry_later(self, jobs: list[Job], reason: str) -> None:
        """Jobs that ran into an unavailable backend: back to the queue, unless they already had their attempts."""
        spent = [j for j in jobs if self.max_attempts is not None and j.attempts >= self.max_attempts]
        error = {
            "code": "backend_unavailable",
            "message": f"the model service was unavailable on each of the job's {self.max_attempts} attempts "
            f"(last: {reason})",
        }
        for job in spent:
            self._write(lambda job=job: self.queue.fail(job, error))
            self._count_finished("failed")
        self._hand_back([j for j in jobs if j not in spent])

    def _round(self) -> None:
        room = self.max_batch_images - len(self._buffer)
        jobs = list(self._buffer)
        if room > 0:
            jobs += self._reserve(room, block_s=0.0 if jobs else 1.0)
        if jobs and self.batch_wait_s > 0 and len(jobs) < self.max_batch_images:
            jobs += self._reserve(self.max_batch_images - len(jobs), block_s=self.batch_wait_s)
        if self.reason is not None:
            # The heartbeat's probe found the backend down while we waited for jobs: don't start them (that
            # would spend an attempt); the wait hands them back.
            self._buffer = jobs
            return
        self._buffer = []
        jobs = [j for j in jobs if self._validate(j)]
        self._resolved = {j.id: self._resolved[j.id] for j in jobs}  # forget jobs handed back meanwhile
        self._inputs = {j.id: self._inputs[j.id] for j in jobs if j.id in self._inputs}
        if not jobs:
            return
        group, rest = self._group(jobs)
        self._buffer = rest
        self._run(group)

    def _reserve(self, max_jobs: int, block_s: float) -> list[Job]:
        jobs = self.queue.reserve(self.name, max_jobs, block_s)
        if self.metrics is not None:
            redelivered = sum(1 for j in jobs if j.deliveries > 1)
            if redelivered:
                self.metrics.jobs_redelivered.inc(redelivered)
            dead = self.queue.take_dead_lettered()
            if dead:
                self.metrics.jobs_dead_lettered.inc(dead)
                self.metrics.jobs_finished.labels(status="failed").inc(dead)
        for job in jobs:
            if job.deliveries > 1:
                log.info("worker %s: job %s re-delivered (delivery %d)", self.name, job.id, job.deliveries)
        return jobs

    def _validate(self, job: Job) -> bool:
        if job.id in self._resolved:
            return True
        try:
            resolved = self.backend.resolve(job.request)
            if resolved.strength is not None:
                self._inputs[job.id] = self._input_image(job, resolved)
            self._resolved[job.id] = resolved
        except InvalidRequestError as e:
            error = {"code": "invalid_request", "field": e.field, "message": e.message}
            self._write(lambda: self.queue.fail(job, error))
            self._count_finished("failed")
            return False
        return True

    @staticmethod
    def _input_image(job: Job, request: ResolvedRequest):
        if job.input_image is None:
            raise InvalidRequestError("image", "strength asks for image-to-image, but the job has no input image")
        try:
            return fit_input_image(job.input_image, request.width, request.height)
        except ValueError as e:
            raise InvalidRequestError("image", f"the input image {e}") from None

    def _group(self, jobs: list[Job]) -> tuple[list[Job], list[Job]]:
        key = self._resolved[jobs[0].id].batch_key
        group, rest, images = [], [], 0
        for job in jobs:
            resolved = self._resolved[job.id]
            if resolved.batch_key == key and (not group or images + resolved.images <= self.max_batch_images):
                group.append(job)
                images += resolved.images
            else:
                rest.append(job)
        return group, rest

    def _run(self, group: list[Job]) -> None:
        try:
            runnable = self.queue.start(self.name, group)
        except QueueError:
            self._buffer = group + self._buffer  # still ours: try again when the queue is back
            raise
        resolved = {job.id: self._resolved.pop(job.id) for job in group}
        inputs = {job.id: self._inputs.pop(job.id, None) for job in group}
        if not runnable:
            return
        batch = ResolvedRequest.concat([resolved[job.id] for job in runnable])
        batch_inputs = None
        if batch.strength is not None:
            batch_inputs = [inputs[job.id] for job in runnable for _ in range(resolved[job.id].images)]
        steps = BatchSteps(
            self.queue,
            runnable,
            [resolved[job.id].images for job in runnable],
            on_canceled=self._store_cancellation,
            deadline=lambda: self._deadline,
        )
        canceled = steps.canceled
        self._busy = True
        self._active = runnable
        started = time.perf_counter()
        try:
            output = self.backend.generate(
                batch, steps.on_step, batch_inputs, steps.on_preview if steps.wants_previews else None
            )
        except StopBatch as stop:
            self._active = []
            if stop.reason == "hand back":
                self._hand_back([j for j in runnable if j.id not in canceled])
            return
        except BackendUnavailable as e:
            self._active = []
            self.reason = str(e)
            log.warning("worker %s: batch of %d image(s) handed back: %s", self.name, batch.images, e)
            self._retry_later([j for j in runnable if j.id not in canceled], str(e))
            return
        except Exception as e:
            self._active = []
            log.exception("worker %s: batch of %d image(s) failed", self.name, batch.images)
            error = {"code": "generation_failed", "message": f"the model failed on this batch: {type(e).__name__}: {e}"}
            for job in runnable:
                if job.id not in canceled:
                    self._write(lambda job=job: self.queue.fail(job, error))
                    self._count_finished("failed")
            return
        finally:
            self._busy = False
        elapsed = time.perf_counter() - started
        self._avg_batch_s = elapsed if self._avg_batch_s is None else 0.8 * self._avg_batch_s + 0.2 * elapsed
        try:
            self._deliver([(job, resolved[job.id]) for job in runnable], canceled, batch, output)
        finally:
            self._active = []

    def _deliver(self, runnable: list[tuple[Job, ResolvedRequest]], canceled: set[str], batch: ResolvedRequest,
                 output) -> None:  # fmt: skip
        m = self.metrics
        if m is not None:
            m.batch_size.observe(batch.images)
            for stage in ("text", "unet", "decode"):
                m.stage_seconds.labels(stage=stage).observe(output.timings[f"{stage}_s"])
        offset = 0
        for job, request in runnable:
            images = output.images[offset : offset + request.images]
            offset += request.images
            if job.id in canceled:
                continue
            t0 = time.perf_counter()
            model, unet_sha256 = self.backend.provenance
            try:
                encoded = [encode_image(a, request.output_format, image_parameters(request, i, model, unet_sha256))
                           for i, a in enumerate(images)]  # fmt: skip
            except Exception as e:  # this job's images, not the worker: its batch mates are still delivered
                log.exception("worker %s: encoding the images of job %s failed", self.name, job.id)
                error = {"code": "generation_failed", "message": f"encoding the images failed: {type(e).__name__}: {e}"}
                self._write(lambda job=job, error=error: self.queue.fail(job, error))
                self._count_finished("failed")
                continue
            encode_s = time.perf_counter() - t0
            result = {
                "model": self.info["id"],
                "seeds": list(request.seeds),
                "timings": {**output.timings, "encode_s": encode_s},
                "batch_size": batch.images,
                "format": request.output_format,
                "count": request.images,
                "size": [request.height, request.width],
                "steps": request.steps,
                "guidance_scale": request.guidance_scale,
            }
            stored = self._write(
                lambda job=job, encoded=encoded, result=result: self.queue.complete(job, encoded, result)
            )
            if m is not None:
                m.stage_seconds.labels(stage="encode").observe(encode_s)
                if stored:
                    m.images_generated.inc(request.images)
                    now = time.time()
                    m.e2e_latency.observe(max(0.0, now - job.created))
                    if job.started:
                        m.queue_wait.observe(max(0.0, job.started - job.created))
            if stored:
                self._count_finished("succeeded")

    def _store_cancellation(self, job: Job) -> None:
        self._write(lambda: self.queue.mark_canceled(job))
        self._count_finished("canceled")

    def _count_finished(self, status: str) -> None:
        if self.metrics is not None:
            self.metrics.jobs_finished.labels(status=status).inc()

    store_retry_s = 60.0  # how long one outage of the queue may hold up a finished batch
    _store_outage: float | None = None  # when the current one began (monotonic); reset after each round

    def _write(self, fn: Callable[[], Any]) -> Any:
        """A queue write after work was done (a result, a failure, a cancellation).

        While the queue cannot take it (Redis down or full) the worker keeps what it has and retries, for
        ``store_retry_s`` of the outage (stopping: until 30 s past the drain deadline at most). Then it gives
        up: a generated batch is handed back and runs again elsewhere (if even the hand-back fails, the queue
        reclaims the jobs of a silent worker); a job whose cancellation was not stored is finished as canceled
        by the worker that takes it next. A hand-written loop, not the Redis client's retries: it runs for a
        deadline, on every queue error (a full Redis is not a connection error), and ends in a hand-back.
        Later writes of the same outage are tried once, so a batch does not wait once per job.
        """
        backoff = 0.1
        while True:
            try:
                stored = fn()
                self._store_outage = None
                return stored
            except QueueError as e:
                now = time.monotonic()
                if self._store_outage is None:
                    self._store_outage = now
                deadline = self._store_outage + self.store_retry_s
                if self._stopping.is_set() and self._deadline is not None:
                    deadline = min(deadline, self._deadline + 30)
                if now >= deadline:
                    log.error("worker %s: giving up a queue write (%s)", self.name, e)
                    if not self._busy:  # the batch's images are done: hand it back (not while still running)
                        handed, self._active = self._active, []
                        self._hand_back(handed)
                    return None
                log.warning("worker %s: queue unavailable while storing a result (%s); retrying", self.name, e)
                time.sleep(min(backoff, deadline - now))
                backoff = min(backoff * 2, 2.0)

    def _hand_back(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if j.status in (QUEUED, RUNNING)]
        if not jobs:
            return
        log.info("worker %s: handing back %d job(s)", self.name, len(jobs))
        with_timeout(lambda: self.queue.release(jobs))

    # -- heartbeat --------------------------------------------------------------------------
    def _send_heartbeat(self) -> None:
        self.queue.heartbeat(
            self.name,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "state": self.state,
                "busy": self._busy,
                "device": self.info["device"] if self.info else None,
                "model": self.info,
                "heartbeat_s": self.heartbeat_s,
                "max_batch_images": self.max_batch_images,
                "avg_batch_s": self._avg_batch_s,
                "reason": self.reason,
            },
            held=[*self._buffer, *self._active],
        )

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.name}", daemon=True)
            self._heartbeat.start()

    def _heartbeat_now(self) -> None:
        """An extra heartbeat so a change of state shows at once (/readyz); the loop retries a failed one."""
        try:
            self._send_heartbeat()
        except QueueError as e:
            log.debug("heartbeat failed: %s", e)

    def _probe_backend(self) -> None:
        # Only an idle, ready worker: a running batch finds out by itself, a waiting worker probes in its loop.
        if self.state != "ready" or self._busy or self.reason is not None or self.backend is None:
            return
        reason = self.backend.health()
        if reason is not None and self.state == "ready" and self.reason is None:
            self.reason, self.state = reason, "waiting for backend"

    def _heartbeat_loop(self) -> None:
        while not self.stopped.wait(self.heartbeat_s):
            try:
                self._probe_backend()
            except Exception:
                log.exception("backend health probe failed")
            try:
                self._send_heartbeat()
            except QueueError as e:
                log.debug("heartbeat failed: %s", e)
            except Exception:
                log.exception("heartbeat failed")


def with_timeout(fn: Callable[[], Any]) -> Any:
    """Best effort (hand-back, deregistration): one call, which the Redis client retries by itself on a
    dropped connection; if it still fails, the queue reclaims the jobs of a silent worker."""
    try:
        return fn()
    except QueueError as e:
        log.warning("queue write given up (%s); the queue's reclaim covers it", e)
        return None
