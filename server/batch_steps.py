"""What a worker does after each sampling step of a batch: report progress (with the step previews of the
jobs that asked for them), notice cancellations, and stop the batch when it must.

:class:`BatchSteps` gives the backend its two callbacks, ``on_preview`` and ``on_step``; raising
:class:`StopBatch` from ``on_step`` ends sampling (every job canceled, or the worker's hand-back deadline).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from snapgen.image_files import encode_preview

from .queue import Job, JobQueue, QueueError

PROGRESS_INTERVAL_S = 0.02  # progress at most 50 times a second (the last step always)


class StopBatch(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # "canceled" or "hand back"


class BatchSteps:
    """The step callbacks of one batch of ``jobs`` (``images[i]``: how many images job i makes).

    ``on_canceled(job)`` stores a cancellation the queue reported; ``deadline()`` is the monotonic time at
    which the worker hands the batch back (None: no deadline).
    """

    def __init__(
        self,
        queue: JobQueue,
        jobs: list[Job],
        images: list[int],
        on_canceled: Callable[[Job], None],
        deadline: Callable[[], float | None],
    ):
        self.queue, self.jobs = queue, jobs
        self.on_canceled, self.deadline = on_canceled, deadline
        self.canceled: set[str] = set()
        self._last_report = 0.0
        self._previews: dict[str, bytes] = {}
        # The first image of each job that asked for previews, by its place in the batch.
        self._preview_index: dict[str, int] = {}
        offset = 0
        for job, count in zip(jobs, images):
            if job.preview:
                self._preview_index[job.id] = offset
            offset += count

    @property
    def wants_previews(self) -> bool:
        return bool(self._preview_index)

    @property
    def active(self) -> list[Job]:
        return [j for j in self.jobs if j.id not in self.canceled]

    def on_preview(self, step: int, steps: int, images: list) -> None:
        for job_id, index in self._preview_index.items():
            if job_id not in self.canceled:
                self._previews[job_id] = encode_preview(images[index])

    def on_step(self, step: int, steps: int, latents) -> None:
        now = time.monotonic()
        if step == steps or now - self._last_report >= PROGRESS_INTERVAL_S:
            self._last_report = now
            active = self.active
            try:
                newly = self.queue.progress(active, step, steps, dict(self._previews))
            except QueueError:  # progress is best effort: the batch goes on, its results are kept
                newly = set()
            for job in active:
                if job.id in newly:
                    self.canceled.add(job.id)
                    self.on_canceled(job)
        self._previews.clear()
        if len(self.canceled) == len(self.jobs):
            raise StopBatch("canceled")
        deadline = self.deadline()
        if deadline is not None and now >= deadline:
            raise StopBatch("hand back")
