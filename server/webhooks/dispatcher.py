"""The dispatcher: the thread that delivers a queue's outbox, with retries, off the worker's path."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .events import Outbox, WebhookDelivery, payload
from .policy import policy_for
from .sender import DELIVERED, GIVE_UP, REFUSED, RETRY, Attempt, Sender

log = logging.getLogger("snapgen.webhooks")


@dataclass
class _Pending:
    delivery: WebhookDelivery
    attempts: int = 0
    body: bytes | None = None


class Dispatcher:
    """A thread that delivers a queue's outbox: takes deliveries, sends each on a small pool of threads (the
    deliveries of one job one at a time, in order), retries with exponential backoff and acknowledges.

    Retry rule: ``max_attempts`` attempts at most; the n-th retry waits ``retry_s * 2**(n-1)`` (at most
    ``retry_max_s``, or the receiver's Retry-After when it is longer). A 2xx is delivered; 408, 429, 5xx,
    timeouts and connection errors are retried; any other answer, or a URL the policy refuses by now, gives
    up at once. Nothing here touches a job: a receiver that is down costs deliveries, never results.
    """

    def __init__(
        self,
        outbox: Outbox,
        sender: Sender,
        name: str,
        render: Callable[[WebhookDelivery], bytes] = payload,
        max_attempts: int = 10,
        retry_s: float = 1.0,
        retry_max_s: float = 300.0,
        hold_s: float = 5.0,
        concurrency: int = 8,
        max_held: int = 256,
        metrics: Any = None,
    ):
        self.outbox, self.sender, self.name, self.render = outbox, sender, name, render
        self.max_attempts, self.retry_s, self.retry_max_s = max_attempts, retry_s, retry_max_s
        self.hold_s, self.concurrency, self.max_held, self.metrics = hold_s, concurrency, max_held, metrics
        self._cv = threading.Condition()
        self._heap: list[tuple[float, int, _Pending]] = []  # (due, seq, pending): waiting for their time
        self._seq = itertools.count()
        self._busy: set[str] = set()  # jobs with a delivery in flight
        self._queued: dict[str, deque[_Pending]] = defaultdict(deque)  # due, but their job is busy
        self._in_flight: dict[str, _Pending] = {}
        self._unacked: list[WebhookDelivery] = []  # done, the acknowledgement still to be stored
        self._stop = threading.Event()
        self._drain_until: float | None = None
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"webhook-{name}")
        self._thread: threading.Thread | None = None
        self.stopped = threading.Event()

    # -- control ----------------------------------------------------------------------------------
    def start_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._run_catching, name=f"webhooks-{self.name}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop: at once, or once the outbox is empty and nothing is in flight, within ``drain_s``. Deliveries
        still owed stay in the outbox (Redis: another dispatcher takes them over)."""
        with self._cv:
            self._drain_until = time.monotonic() + drain_s
            self._cv.notify_all()
        if drain_s <= 0:
            self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def held(self) -> int:
        with self._cv:
            return len(self._heap) + sum(map(len, self._queued.values())) + len(self._in_flight)

    def _run_catching(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("webhook dispatcher %s failed", self.name)
        finally:
            self.stopped.set()

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        from ..queue.base import QueueError

        next_hold, backoff, drained = 0.0, 0.2, False
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_hold:
                    next_hold = now + self.hold_s
                    self._hold_and_ack()
                self._dispatch_due(now)
                with self._cv:
                    held = len(self._heap) + sum(map(len, self._queued.values())) + len(self._in_flight)
                    busy = bool(self._in_flight)
                    next_due = self._heap[0][0] if self._heap else None
                    draining = self._drain_until is not None
                if draining and ((held == 0 and drained) or now >= self._drain_until):
                    break
                # Block in the outbox only when nothing of ours needs a look sooner.
                block = 0.05 if busy or draining else min(1.0, max(0.0, 1.0 if next_due is None else next_due - now))
                if held >= self.max_held:
                    with self._cv:
                        self._cv.wait(max(block, 0.05))
                    continue
                try:
                    taken = self.outbox.take_webhook_deliveries(self.name, min(100, self.max_held - held), block)
                    backoff, drained = 0.2, not taken
                except QueueError as e:
                    log.warning("webhook dispatcher %s: outbox unavailable (%s); retrying", self.name, e)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                for delivery in taken:
                    self._schedule(_Pending(delivery), time.monotonic())
        finally:
            self._stop.set()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._hold_and_ack()
            left = self.held()
            if left:
                log.info("webhook dispatcher %s stopped with %d delivery(ies) owed, left in the outbox", self.name,
                         left)  # fmt: skip

    def _schedule(self, pending: _Pending, due: float) -> None:
        with self._cv:
            heapq.heappush(self._heap, (due, next(self._seq), pending))
            self._cv.notify_all()

    def _dispatch_due(self, now: float) -> None:
        with self._cv:
            while self._heap and self._heap[0][0] <= now:
                _, _, pending = heapq.heappop(self._heap)
                self._queued[pending.delivery.job.id].append(pending)
            for job_id in list(self._queued):
                if len(self._in_flight) >= self.concurrency:
                    break
                if job_id in self._busy:
                    continue
                pending = self._queued[job_id].popleft()
                if not self._queued[job_id]:
                    del self._queued[job_id]
                self._busy.add(job_id)
                self._in_flight[pending.delivery.id] = pending
                self._pool.submit(self._attempt, pending)

    def _hold_and_ack(self) -> None:
        from ..queue.base import QueueError

        with self._cv:
            unacked, self._unacked = self._unacked, []
            held = [p.delivery for _, _, p in self._heap] + [p.delivery for q in self._queued.values() for p in q]
            held += [p.delivery for p in self._in_flight.values()]
        try:
            for i, delivery in enumerate(unacked):
                self.outbox.ack_webhook_delivery(self.name, delivery)
                unacked[i] = None
            if held:
                self.outbox.hold_webhook_deliveries(self.name, held)
        except QueueError as e:
            log.warning("webhook dispatcher %s: outbox unavailable (%s)", self.name, e)
            with self._cv:
                self._unacked.extend(d for d in unacked if d is not None)

    # -- one attempt (pool threads) ---------------------------------------------------------------
    def _attempt(self, pending: _Pending) -> None:
        delivery = pending.delivery
        url = delivery.job.webhook or ""
        try:
            if pending.body is None:
                pending.body = self.render(delivery)
            attempt = self.sender.send(url, delivery.id, pending.body)
        except Exception as e:  # a bug (rendering, sending): give this delivery up, keep the dispatcher
            log.exception("webhook %s of job %s: attempt failed", delivery.id, delivery.job.id)
            attempt = Attempt(GIVE_UP, detail=f"{type(e).__name__}: {e}")
        pending.attempts += 1
        self._count_attempt(attempt)
        done = attempt.outcome != RETRY or pending.attempts >= self.max_attempts
        if done:
            outcome = {DELIVERED: "delivered", REFUSED: "refused"}.get(attempt.outcome, "failed")
            if outcome != "delivered":
                log.warning("webhook %s (job %s, %s) to %s %s after %d attempt(s): %s", delivery.id, delivery.job.id,
                            delivery.event, _redact(url), outcome, pending.attempts, attempt.detail)  # fmt: skip
            if self.metrics is not None:
                self.metrics.deliveries.labels(outcome=outcome).inc()
            self._ack(delivery)
        else:
            wait = min(self.retry_max_s, self.retry_s * 2 ** (pending.attempts - 1))
            if attempt.retry_after_s is not None:
                wait = max(wait, min(attempt.retry_after_s, self.retry_max_s))
            log.info("webhook %s (job %s) attempt %d: %s; retrying in %.1fs", delivery.id, delivery.job.id,
                     pending.attempts, attempt.detail, wait)  # fmt: skip
        with self._cv:
            self._in_flight.pop(delivery.id, None)
            self._busy.discard(delivery.job.id)
            if not done:
                heapq.heappush(self._heap, (time.monotonic() + wait, next(self._seq), pending))
            self._cv.notify_all()

    def _ack(self, delivery: WebhookDelivery) -> None:
        from ..queue.base import QueueError

        try:
            self.outbox.ack_webhook_delivery(self.name, delivery)
        except QueueError as e:
            log.warning("webhook %s: acknowledging failed (%s); retried later", delivery.id, e)
            with self._cv:
                self._unacked.append(delivery)

    def _count_attempt(self, attempt: Attempt) -> None:
        if self.metrics is None:
            return
        result = f"{attempt.status // 100}xx" if attempt.status else "error"
        self.metrics.attempts.labels(result=result).inc()


def _redact(url: str) -> str:
    """A URL for the logs: its query (often a token) left out."""
    return url.split("?", 1)[0]


def build_dispatcher(queue: Outbox, settings, name: str) -> Dispatcher | None:
    """The dispatcher of a process that runs a worker, from the settings; None (and a warning) without a secret."""
    if not settings.webhook_secret:
        log.info("no SNAPGEN_WEBHOOK_SECRET: %s delivers no webhooks", name)
        return None
    from .. import metrics

    sender = Sender(settings.webhook_secret, policy_for(tuple(settings.webhook_allowed_hosts)),
                    settings.webhook_timeout_s)  # fmt: skip
    return Dispatcher(
        queue,
        sender,
        name,
        max_attempts=settings.webhook_max_attempts,
        retry_s=settings.webhook_retry_s,
        retry_max_s=settings.webhook_retry_max_s,
        hold_s=max(0.05, settings.claim_idle_s / 3),
        metrics=metrics.webhook_metrics(),
    )
