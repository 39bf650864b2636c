"""Redis plumbing for :class:`~server.queue.redis_queue.RedisJobQueue`: the Lua scripts, the clients, and
what a Redis error means for the queue's users.

redis-py is imported lazily: the embedded mode runs without it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from importlib import resources
from typing import Any

from ..webhooks.events import OutputThrottle
from .base import (
    DEFAULT_RESULT_MAX_BYTES,
    DEFAULT_RESULT_MAX_JOBS,
    DEFAULT_RESULT_TTL_S,
    QueueError,
    QueueStoreFull,
    QueueUnavailable,
    Watch,
)

# Scripts that give a job its final state share the retention code (lua/retain.lua), put in front of them;
# those and the scripts that write webhook events share lua/webhook.lua, in front of everything.
_RETAINING = ("cancel", "start", "finish", "dead_letter")
_WEBHOOKS = (*_RETAINING, "webhook_output")
_NAMES = ("submit", "cancel", "start", "progress", "finish", "release", "dead_letter", "webhook_output")


def _load_scripts() -> dict[str, str]:
    folder = resources.files(__package__) / "lua"
    retain, webhook = (folder / "retain.lua").read_text(), (folder / "webhook.lua").read_text()
    return {
        name: (webhook if name in _WEBHOOKS else "") + (retain if name in _RETAINING else "")
        + (folder / f"{name}.lua").read_text()
        for name in _NAMES
    }  # fmt: skip


# Read at import: a missing script (package data not shipped) fails at start-up, not at the first job.
SCRIPTS: dict[str, str] = _load_scripts()

# Refusals that pass by themselves (a replica promoted, a dataset loading, a long script, a failed save).
_TRANSIENT = ("LOADING", "MISCONF", "READONLY", "BUSY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN")


def _retry(aio: bool):
    """redis-py retries a command on connection errors and timeouts (a pooled connection that died with a
    Redis restart, a failover, a short network blip): twice, after 0.1 and 0.2 s. Longer outages reach the
    caller as QueueUnavailable: the API answers 503 at once, the worker's own loops wait for Redis."""
    from redis.backoff import ExponentialBackoff

    if aio:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry
    return Retry(ExponentialBackoff(cap=0.2, base=0.05), 2)


def client_kwargs(socket_timeout_s: float) -> dict[str, Any]:
    return dict(socket_connect_timeout=2.0, socket_timeout=socket_timeout_s, health_check_interval=10)


def sync_client(url: str, socket_timeout_s: float):
    import redis

    return redis.Redis.from_url(url, retry=_retry(False), **client_kwargs(socket_timeout_s))


def async_client(url: str, socket_timeout_s: float):
    import redis.asyncio as aioredis

    # A bounded pool: a burst of hundreds of requests waits for one of 64 connections instead of
    # opening hundreds at once, whose connects then time out (seen: 503s at 200 concurrent clients
    # on 2 cores).
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=30.0, retry=_retry(True), **client_kwargs(socket_timeout_s)
    )
    return aioredis.Redis(connection_pool=pool)


def translate(e: BaseException) -> Exception:
    """A Redis error as a queue error: QueueUnavailable (or QueueStoreFull) when waiting helps, QueueError
    otherwise, so no caller needs redis-py's exceptions and no Redis error kills a worker."""
    import redis.exceptions as rex

    if isinstance(e, QueueError):
        return e
    if isinstance(e, (rex.ConnectionError, rex.TimeoutError, OSError)):
        return QueueUnavailable(f"Redis is unreachable: {e}")
    if isinstance(e, rex.OutOfMemoryError) or (isinstance(e, rex.ResponseError) and str(e).startswith("OOM")):
        return QueueStoreFull(
            f"Redis is full (maxmemory reached): no job can be accepted or stored until finished results "
            f"expire or are evicted ({e})"
        )
    if isinstance(e, rex.ResponseError) and str(e).split(" ", 1)[0] in _TRANSIENT:
        return QueueUnavailable(f"Redis cannot serve requests now: {e}")
    if isinstance(e, rex.ResponseError) and "NOGROUP" in str(e):
        return QueueUnavailable(f"the consumer group is gone (Redis lost its data?): {e}")
    return QueueError(f"Redis refused a request: {type(e).__name__}: {e}")


def memory_full(info: dict[str, Any], high_water: float) -> QueueStoreFull | None:
    """From ``INFO memory``: the error to raise when used memory is at or above ``high_water`` of maxmemory
    (None when it is below, or when there is no maxmemory)."""
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0) or 0)
    if limit <= 0 or used < high_water * limit:
        return None
    mib = 1 << 20
    return QueueStoreFull(
        f"Redis is full: {used / mib:.1f} MiB used of its maxmemory {limit / mib:.1f} MiB (new jobs are refused "
        f"above {high_water:.0%}); room comes back as finished results expire or are evicted"
    )


class RedisStore:
    """Configuration, key names, clients and scripts of one queue in Redis; the queue's two halves
    (redis_worker.RedisWorkerSide, redis_queue.RedisJobQueue) build on it."""

    GROUP = "workers"

    def __init__(
        self,
        url: str,
        prefix: str = "snapgen",
        result_ttl_s: int = DEFAULT_RESULT_TTL_S,
        claim_idle_s: float = 30.0,
        max_deliveries: int = 3,
        socket_timeout_s: float = 5.0,
        result_max_jobs: int = DEFAULT_RESULT_MAX_JOBS,
        result_max_bytes: int = DEFAULT_RESULT_MAX_BYTES,
        high_water: float = 0.9,
        webhook_output_interval_s: float = 0.5,
    ):
        self.url = url
        self.prefix = prefix
        self.ttl = int(result_ttl_s)
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.max_deliveries = max_deliveries
        self.reclaim_interval_s = max(0.05, min(claim_idle_s / 2, 5.0))
        self.high_water = high_water
        self._socket_timeout = socket_timeout_s
        self.stream, self.dead, self.events = f"{prefix}:jobs", f"{prefix}:dead", f"{prefix}:events"
        self.workers_key, self.model_key = f"{prefix}:workers", f"{prefix}:model"
        # Finished jobs by finish time, their total bytes, evictions ever (lua/retain.lua).
        self.done_keys = [f"{prefix}:done", f"{prefix}:done:bytes", f"{prefix}:done:evicted"]
        self._retention = [prefix, self.ttl, int(result_max_jobs), int(result_max_bytes)]
        self._sync = None
        self._sync_scripts: dict[str, Any] = {}
        self._aio = None
        self._aio_scripts: dict[str, Any] = {}
        self._subscribers: dict[str, set[Watch]] = defaultdict(set)
        self._listener: asyncio.Task | None = None
        self._next_reclaim = 0.0
        self._group_ready = False
        self._dead_lettered = 0
        self._memory_checked = (0.0, None)  # (monotonic time, the error it found or None)
        self.output_throttle = OutputThrottle(webhook_output_interval_s)  # which progress reports are webhook events

    def job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def image_key(self, job_id: str, index: int) -> str:
        return f"{self.prefix}:img:{job_id}:{index}"

    def input_key(self, job_id: str) -> str:
        return f"{self.prefix}:input:{job_id}"

    def preview_key(self, job_id: str) -> str:
        return f"{self.prefix}:preview:{job_id}"

    # ---- connections ----
    @property
    def sync(self):
        if self._sync is None:
            self._sync = sync_client(self.url, self._socket_timeout)
            self._sync_scripts = {name: self._sync.register_script(src) for name, src in SCRIPTS.items()}
        return self._sync

    @property
    def aio(self):
        if self._aio is None:
            self._aio = async_client(self.url, self._socket_timeout)
            self._aio_scripts = {name: self._aio.register_script(src) for name, src in SCRIPTS.items()}
        return self._aio

    def _script(self, name: str):
        _ = self.sync
        return self._sync_scripts[name]

    def _ascript(self, name: str):
        _ = self.aio
        return self._aio_scripts[name]

    def _translate(self, e: BaseException) -> Exception:
        error = translate(e)
        if "NOGROUP" in str(e):
            self._group_ready = False  # Redis lost its data: create the group again next time
        return error

    @contextlib.contextmanager
    def _errors(self):
        import redis.exceptions as rex

        try:
            yield
        except (rex.RedisError, OSError) as e:
            raise self._translate(e) from e

    def close(self):
        if self._sync is not None:
            self._sync.close()
