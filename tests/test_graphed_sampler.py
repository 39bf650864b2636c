"""The sampler as one graph (snapgen/graphed.py), on the CPU: the recorded function run without capture gives the
bytes of the step-by-step recipe; batches are padded up to their bucket; a worker in graph mode reports progress
once per batch and runs batches with previews step by step. Capture itself needs CUDA and is refused without it."""

from __future__ import annotations

import asyncio
import io
import threading
import uuid
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from server.backends import TorchBackend
from server.queue import FAILED, SUCCEEDED, Job, MemoryJobQueue
from server.worker import Worker
from snapgen.graphed import Bucket, GraphedSampler, SamplerGraphs, batch_buckets, bucket_batch
from snapgen.request import GenerationRequest

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow star"]
NEGATIVES = ["", "green", "", "red"]


def graphed_backend(model, max_batch=4) -> TorchBackend:
    """A backend whose graphs run uncaptured: everything a CUDA graph does except the capture."""
    backend = TorchBackend(model, trace_unet=False)
    backend.graphs = SamplerGraphs(backend, max_batch, capture=False)
    return backend


@pytest.fixture(scope="module")
def backend(tiny_model):
    return graphed_backend(tiny_model)


def step_by_step(backend, request):
    graphs, backend.graphs = backend.graphs, None
    try:
        return backend.generate(request)
    finally:
        backend.graphs = graphs


def request_of(backend, images, guidance, seed=5):
    return backend.resolve(
        GenerationRequest(PROMPTS[:images], NEGATIVES[:images], seed=list(range(seed, seed + images)), steps=2,
                          guidance_scale=guidance)
    )  # fmt: skip


def test_buckets_are_powers_of_two_up_to_the_largest_batch():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert [bucket_batch(n, (1, 2, 4, 6)) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        bucket_batch(7, (1, 2, 4, 6))
    with pytest.raises(ValueError):
        batch_buckets(0)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_a_full_bucket_gives_the_step_by_step_bytes(backend, guidance):
    request = request_of(backend, 2, guidance)
    steps = []
    graphed = backend.generate(request, on_step=lambda step, n, latents: steps.append((step, n, tuple(latents.shape))))
    reference = step_by_step(backend, request)
    assert len(graphed.images) == 2
    for ours, theirs in zip(graphed.images, reference.images, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # Progress once, at the end: a graph runs no Python between its steps.
    assert steps == [(2, 2, (2, 4, 16, 16))]
    assert set(graphed.timings) == {"text_s", "unet_s", "decode_s", "total_s"}
    assert Bucket(2, 128, 128, 2, guidance) in backend.graphs._samplers


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_a_padded_batch_drops_its_padding(backend, guidance):
    request = request_of(backend, 3, guidance)
    graphed = backend.generate(request)
    assert len(graphed.images) == 3
    # The padding repeats the last image's inputs; the graph runs at the bucket's batch size, so its images are
    # those of the step-by-step recipe at that size ...
    padded = replace(request, prompts=request.prompts + request.prompts[-1:], seeds=request.seeds + request.seeds[-1:],
                     negative_prompts=request.negative_prompts + request.negative_prompts[-1:])  # fmt: skip
    reference = step_by_step(backend, padded)
    for ours, theirs in zip(graphed.images, reference.images[:3], strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # ... and within a grey level of a batch of 3 (batch-size-dependent BLAS sums, as between any two batch sizes).
    unpadded = step_by_step(backend, request)
    for ours, theirs in zip(graphed.images, unpadded.images, strict=True):
        assert np.abs(ours.astype(int) - theirs).max() <= 1


def test_one_sampler_serves_different_inputs_in_turn(backend):
    first, second = request_of(backend, 1, 1.0, seed=11), request_of(backend, 1, 1.0, seed=12)
    a = backend.generate(first).images[0]
    b = backend.generate(second).images[0]
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(backend.generate(first).images[0], a)
    np.testing.assert_array_equal(step_by_step(backend, second).images[0], b)


def test_requests_a_graph_cannot_run_take_the_step_by_step_path(backend):
    graphs = backend.graphs
    big = request_of(backend, 4, 1.0)
    assert graphs.accepts(big) and not graphs.accepts(big, previews=True)
    assert not graphs.accepts(replace(big, prompts=big.prompts * 2, negative_prompts=big.negative_prompts * 2,
                                      seeds=tuple(range(8))))  # fmt: skip
    assert not graphs.accepts(replace(big, strength=0.5))
    previews, steps = [], []
    backend.generate(request_of(backend, 1, 1.0), lambda s, n, x: steps.append(s), None,
                     lambda s, n, images: previews.append(s))  # fmt: skip
    assert steps == [1, 2] and previews == [1, 2]


def test_cancellation_between_batches(backend):
    class Canceled(Exception):
        pass

    def cancel(step, steps, latents):
        raise Canceled

    with pytest.raises(Canceled):
        backend.generate(request_of(backend, 1, 1.0), cancel)


def test_samplers_check_their_inputs_and_the_cache_keeps_the_newest(backend):
    sampler = GraphedSampler(backend, Bucket(2, 128, 128, 2, 1.0), capture=False)
    text = backend.encode_text(["a"])
    with pytest.raises(ValueError, match="1 to 2 rows"):
        sampler(backend.encode_text(["a"] * 3), None, torch.zeros(3, 4, 16, 16))
    with pytest.raises(ValueError, match="takes no unconditional text"):
        sampler(text, text, torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="rows of text"):
        sampler(text, None, torch.zeros(2, 4, 16, 16))
    with pytest.raises(ValueError, match="rows of shape"):
        sampler(text, None, torch.zeros(1, 4, 8, 8))
    graphs = SamplerGraphs(backend, 2, capture=False, max_graphs=2)
    for steps in (1, 2, 3):
        graphs.sampler(Bucket(1, 128, 128, steps, 1.0))
    assert [b.steps for b in graphs._samplers] == [2, 3]


def test_graphs_are_refused_without_cuda(tiny_model, backend):
    with pytest.raises(ValueError, match="CUDA"):
        TorchBackend(tiny_model, graph=True)
    with pytest.raises(ValueError, match="CUDA"):
        SamplerGraphs(backend, 4, capture=True)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedSampler(backend, Bucket(1, 128, 128, 2, 1.0), capture=True)


class RecordingQueue(MemoryJobQueue):
    """Progress reports as (job ids, step, steps, whether previews came with it)."""

    def __init__(self):
        super().__init__()
        self.reports = []

    def progress(self, jobs, step, steps, previews=None):
        self.reports.append(([j.id for j in jobs], step, steps, bool(previews)))
        return super().progress(jobs, step, steps, previews)


def test_a_worker_in_graph_mode(tiny_model):
    made = []

    def load():
        made.append(graphed_backend(tiny_model, max_batch=4))
        return made[-1]

    queue, loop = RecordingQueue(), asyncio.new_event_loop()
    worker = Worker(queue, load, warmup=True, heartbeat_s=0.2, max_batch_images=4)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()

    def run(job):
        loop.run_until_complete(queue.submit(job, 10))
        for _ in range(1200):
            final = loop.run_until_complete(queue.get(job.id))
            if final.status in (SUCCEEDED, FAILED):
                break
            threading.Event().wait(0.05)
        assert final.status == SUCCEEDED, final.error
        encoded = loop.run_until_complete(queue.images(job.id, final.result["count"]))
        return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in encoded]

    try:
        plain = Job(id=uuid.uuid4().hex, request=GenerationRequest("a red circle", n=2, seed=5))
        images = run(plain)
        backend = made[0]
        # Warm-up made the graph of every batch bucket at the default steps and guidance: the job used one.
        assert sorted(b.batch for b in backend.graphs._samplers) == [1, 2, 4]
        reference = step_by_step(backend, backend.resolve(GenerationRequest("a red circle", n=2, seed=5)))
        for ours, theirs in zip(images, reference.images, strict=True):
            np.testing.assert_array_equal(ours, theirs)
        assert [r[1:] for r in queue.reports if r[0] == [plain.id]] == [(2, 2, False)]

        with_previews = Job(id=uuid.uuid4().hex, request=GenerationRequest("a red circle", seed=6), preview=True)
        run(with_previews)
        reports = [r[1:] for r in queue.reports if r[0] == [with_previews.id]]
        assert [r[0] for r in reports] == [1, 2] and all(r[2] for r in reports)
    finally:
        worker.stop(0)
        thread.join(30)
        loop.close()
