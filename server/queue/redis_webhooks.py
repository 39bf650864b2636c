"""The webhook outbox of :class:`~server.queue.redis_queue.RedisJobQueue`: the stream ``P:webhooks``, consumer
group ``dispatchers`` (server/webhooks/ delivers it).

The Lua scripts write an entry (lua/webhook.lua) in the same step as the job's state change. A dispatcher
reads new entries with XREADGROUP, keeps those it still has from being taken over (XCLAIM ... JUSTID of its
own pending entries, as a worker's heartbeat does for its jobs), and XACKs and XDELs each once delivered or
given up. The entries of a dispatcher that went silent for ``claim_idle_s`` (its process killed) are taken
over by another with XAUTOCLAIM. The webhook-id is made of the job id and the entry id, so it is the same
whichever dispatcher delivers.
"""

from __future__ import annotations

import logging
import time

from ..webhooks.events import WebhookDelivery
from .base import Job, _s
from .redis_client import RedisStore

log = logging.getLogger("snapgen.webhooks")


class RedisWebhookOutbox(RedisStore):
    WEBHOOK_GROUP = "dispatchers"
    _outbox_ready = False
    _outbox_cursor = "0-0"  # where the next XAUTOCLAIM scan starts
    _next_outbox_reclaim = 0.0

    @property
    def outbox_key(self) -> str:
        return f"{self.prefix}:webhooks"

    def _translate(self, e: BaseException) -> Exception:
        if "NOGROUP" in str(e):
            self._outbox_ready = False  # Redis lost its data: create the group again next time
        return super()._translate(e)

    def _ensure_outbox_group(self) -> None:
        import redis.exceptions as rex

        if self._outbox_ready:
            return
        with self._errors():
            try:
                self.sync.xgroup_create(self.outbox_key, self.WEBHOOK_GROUP, id="0", mkstream=True)
            except rex.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._outbox_ready = True

    def take_webhook_deliveries(self, consumer, max_count, block_s):
        self._ensure_outbox_group()
        entries = []
        with self._errors():
            now = time.monotonic()
            if now >= self._next_outbox_reclaim:
                self._next_outbox_reclaim = now + self.reclaim_interval_s
                reply = self.sync.xautoclaim(self.outbox_key, self.WEBHOOK_GROUP, consumer, self.claim_idle_ms,
                                             self._outbox_cursor, count=max_count)  # fmt: skip
                self._outbox_cursor = _s(reply[0])
                entries += [(sid, fields) for sid, fields in reply[1] if fields]
                if entries:
                    log.info("webhook dispatcher %s took over %d delivery(ies) of a silent one", consumer, len(entries))
            if len(entries) < max_count:
                block = max(1, int(block_s * 1000)) if block_s > 0 and not entries else None
                reply = self.sync.xreadgroup(self.WEBHOOK_GROUP, consumer, {self.outbox_key: ">"},
                                             count=max_count - len(entries), block=block)  # fmt: skip
                for _stream, messages in reply or []:
                    entries += [(sid, fields) for sid, fields in messages if fields]
        deliveries = []
        for sid, fields in entries:
            delivery = self._delivery(_s(sid), fields)
            if delivery is None:
                self.ack_webhook_delivery(consumer, WebhookDelivery("", "", 0.0, None, _s(sid)))
            else:
                deliveries.append(delivery)
        return deliveries

    @staticmethod
    def _delivery(sid: str, fields: dict) -> WebhookDelivery | None:
        try:
            job = Job.from_fields(fields)
            event, at = _s(fields[b"_event"]), float(fields[b"_at"])
        except (KeyError, ValueError) as e:  # not an entry this code wrote: nothing can be sent for it
            log.error("webhook outbox entry %s cannot be read (%s: %s); dropped", sid, type(e).__name__, e)
            return None
        return WebhookDelivery(f"msg_{job.id}_{sid}", event, at, job, sid)

    def ack_webhook_delivery(self, consumer, delivery):
        with self._errors():
            pipe = self.sync.pipeline(transaction=True)
            pipe.xack(self.outbox_key, self.WEBHOOK_GROUP, delivery.ref)
            pipe.xdel(self.outbox_key, delivery.ref)
            pipe.execute()

    def hold_webhook_deliveries(self, consumer, deliveries):
        wanted = {d.ref for d in deliveries}
        if not wanted:
            return
        with self._errors():
            pending = self.sync.xpending_range(self.outbox_key, self.WEBHOOK_GROUP, min="-", max="+", count=10_000,
                                               consumername=consumer)  # fmt: skip
            # Only entries still this dispatcher's: one taken over while it was frozen stays with its new owner.
            mine = [_s(p["message_id"]) for p in pending if _s(p["message_id"]) in wanted]
            if mine:
                self.sync.xclaim(self.outbox_key, self.WEBHOOK_GROUP, consumer, 0, mine, justid=True)
