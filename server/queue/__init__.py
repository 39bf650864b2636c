"""The job queue: one interface, two implementations.

``MemoryJobQueue`` serves the embedded mode (API and worker in one process); ``RedisJobQueue``
the scaled-out mode (any number of API processes and workers sharing one Redis). The API sees
only the asynchronous half of :class:`JobQueue`, the worker only the blocking half, and neither
knows which implementation it has.

    base.py          job states, errors, Job, QueueStats, Watch, the JobQueue interface
    memory.py        MemoryJobQueue
    redis_queue.py   RedisJobQueue, its API (async) half (the Redis layout is described there)
    redis_worker.py  its worker (blocking) half
    redis_webhooks.py its webhook outbox (the stream the dispatchers deliver)
    redis_client.py  Redis clients, the Lua scripts (lua/*.lua, read at import), Redis errors as queue errors
"""

from .base import (
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    IdempotencyConflict,
    Job,
    JobQueue,
    QueueError,
    QueueFull,
    QueueStats,
    QueueStoreFull,
    QueueUnavailable,
    Watch,
    fingerprint,
)
from .memory import MemoryJobQueue
from .redis_queue import RedisJobQueue

__all__ = [
    "CANCELED",
    "FAILED",
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "TERMINAL",
    "IdempotencyConflict",
    "Job",
    "JobQueue",
    "MemoryJobQueue",
    "QueueError",
    "QueueFull",
    "QueueStats",
    "QueueStoreFull",
    "QueueUnavailable",
    "RedisJobQueue",
    "Watch",
    "fingerprint",
]
