"""A worker built from the settings: its backend (in-process PyTorch or Triton), the worker itself, and
the ``snapgen worker`` process that runs one on a Redis queue until SIGTERM."""

from __future__ import annotations

from .backends import Backend, TorchBackend
from .webhooks import build_dispatcher
from .worker import Worker

WEBHOOK_DRAIN_S = 2.0  # on stopping, how long the webhooks already owed may take before they are left to others


def build_worker(queue, settings, name: str) -> Worker:
    """A worker configured from the settings; the embedded server and `snapgen worker` share it."""
    from . import metrics

    return Worker(
        queue,
        lambda: load_backend(settings),
        name=name,
        max_batch_images=settings.max_batch_images,
        batch_wait_ms=settings.batch_wait_ms,
        heartbeat_s=settings.heartbeat_s,
        drain_timeout_s=settings.drain_timeout_s,
        warmup=settings.warmup,
        metrics=metrics.worker_metrics(),
        max_attempts=settings.max_deliveries,
    )


def run_worker_process(settings) -> int:
    """``snapgen worker``: one worker process on a Redis queue, until SIGTERM."""
    from . import metrics
    from .queue import RedisJobQueue

    queue = RedisJobQueue.from_settings(settings)
    worker = build_worker(queue, settings, settings.worker_name)
    worker.install_signal_handlers()
    if settings.worker_metrics_port is not None:
        metrics.serve_worker_metrics(settings.worker_metrics_port, settings.host)
    # Webhooks go out from here, beside the worker and off its path; what is owed when the process ends stays in
    # the outbox for another worker's dispatcher.
    dispatcher = build_dispatcher(queue, settings, worker.name)
    if dispatcher is not None:
        dispatcher.start_thread()
    worker.run()
    if dispatcher is not None:
        dispatcher.stop(drain_s=WEBHOOK_DRAIN_S)
        dispatcher.join(WEBHOOK_DRAIN_S + settings.webhook_timeout_s + 1)
    queue.close()
    return 0


def load_backend(settings) -> Backend:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    model = settings.model
    if model is None:
        from snapgen.model_dir import default_model_dir

        model = default_model_dir()
    if settings.backend == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend(model, settings.triton_url, name=settings.model_name)
    return TorchBackend(
        model,
        device=settings.device,
        dtype=settings.dtype,
        channels_last=settings.channels_last,
        compile=settings.compile,
        trace_unet=settings.trace_unet,
        name=settings.model_name,
        kernels=settings.kernels,
        graph=settings.graph,
        max_batch=settings.max_batch_images,
    )
