"""A job whose images cannot be encoded fails alone: the worker goes on and its batch mates are delivered."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import numpy as np

from server.backends import Backend, BackendOutput
from server.queue import FAILED, SUCCEEDED, Job, MemoryJobQueue
from server.worker import Worker
from snapgen.request import GenerationRequest, ModelCard

CARD = ModelCard(id="fake", sizes=((8, 8),), default_steps=1, max_steps=4, guidance_scale=1.0)


class BrokenImages(Backend):
    """Images of prompts that start with "broken" are float arrays, which no image file can hold."""

    card, provenance = CARD, ("fake", None)

    def describe(self):
        return {**CARD.to_dict(), "device": "cpu", "dtype": "float32", "backend": "BrokenImages"}

    def resolve(self, request):
        return request.resolve(CARD)

    def generate(self, request, on_step=None, inputs=None, on_preview=None):
        images = [np.zeros((8, 8, 3), np.float64 if p.startswith("broken") else np.uint8) for p in request.prompts]
        return BackendOutput(images=images, timings={"text_s": 0.0, "unet_s": 0.0, "decode_s": 0.0})


def test_a_job_whose_images_cannot_be_encoded_fails_alone():
    queue = MemoryJobQueue()
    loop = asyncio.new_event_loop()
    jobs = [Job(id=uuid.uuid4().hex, request=GenerationRequest(p, seed=1)) for p in ("broken", "fine", "fine too")]
    for job in jobs:
        loop.run_until_complete(queue.submit(job, 10))
    worker = Worker(queue, BrokenImages, warmup=False, heartbeat_s=0.2, max_batch_images=8)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [loop.run_until_complete(queue.get(j.id)) for j in jobs]
            if all(s.status in (SUCCEEDED, FAILED) for s in states):
                break
            time.sleep(0.05)
        assert [s.status for s in states] == [FAILED, SUCCEEDED, SUCCEEDED]
        assert "encoding the images failed" in states[0].error["message"]
        assert worker.state == "ready" and thread.is_alive()  # still serving
    finally:
        worker.stop(0)
        thread.join(30)
        loop.close()
