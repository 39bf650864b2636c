"""What an outbox holds (:class:`WebhookDelivery`), which progress reports become events, and the body sent."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..queue.base import Job

# What webhook_events_filter accepts (Cog's names). `logs` is taken for Cog's clients and never sent: a job has no
# logs. Only a webhook given: every event, as Cog does.
EVENTS = ("start", "output", "logs", "completed")
DEFAULT_EVENTS = EVENTS


@dataclass
class WebhookDelivery:
    """One event of one job, to be POSTed to ``job.webhook``."""

    id: str  # webhook-id: the same on every attempt, whichever dispatcher makes it
    event: str  # start | output | completed
    at: float  # when it happened (unix time)
    job: Job  # the job as it was then
    ref: str = ""  # the outbox's handle (Redis: the stream entry id)


class Outbox(Protocol):
    """What a dispatcher needs of a queue (:class:`server.queue.JobQueue` implements it)."""

    def take_webhook_deliveries(self, consumer: str, max_count: int, block_s: float) -> list[WebhookDelivery]:
        """New deliveries, and those of dispatchers that went silent (Redis)."""

    def ack_webhook_delivery(self, consumer: str, delivery: WebhookDelivery) -> None:
        """Delivered or given up: out of the outbox."""

    def hold_webhook_deliveries(self, consumer: str, deliveries: list[WebhookDelivery]) -> None:
        """This dispatcher is alive and still has these: no other dispatcher may take them."""


class OutputThrottle:
    """Which progress reports become ``output`` events: the first and the last step of a run, and otherwise at
    most one every ``interval_s`` per job (Cog throttles the same way)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def due(self, job_id: str, step: int, steps: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self._last.get(job_id)
        if last is not None and step < steps and now - last < self.interval_s and step > 1:
            return False
        self._last[job_id] = now
        return True

    def forget(self, job_id: str) -> None:
        self._last.pop(job_id, None)


def payload(delivery: WebhookDelivery) -> bytes:
    """The request body: ``{"type": "job.<event>", "timestamp", "data": the job as GET /v1/jobs/{id} shows it}``,
    its images always as links (``data.result.data[i].url``), the same bytes on every attempt."""
    from ..api.bodies import job_view

    job = delivery.job
    stamp = datetime.fromtimestamp(delivery.at, tz=timezone.utc).isoformat(timespec="microseconds")
    body = {
        "type": f"job.{delivery.event}",
        "timestamp": stamp.replace("+00:00", "Z"),
        "data": job_view(job, (job.base_url or "").rstrip("/")),
    }
    return json.dumps(body, separators=(",", ":")).encode()
