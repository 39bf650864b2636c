"""Prometheus metrics, prefix ``snapgen_``.

Per-process metrics are prometheus-client objects. With several API processes (uvicorn
``--workers``), ``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is imported
(``snapgen serve --api-processes N`` does it) and every scrape aggregates all processes' files.
Queue-wide values (depth, in flight, worker heartbeats) are read from the queue at scrape time,
so every API process reports the same cluster view. In Redis mode, workers are separate
processes (often other machines): their metrics are served by ``snapgen worker --metrics-port``.

API process:   snapgen_requests_total{route,method,status}, snapgen_request_duration_seconds{route,method},
               snapgen_requests_in_flight
Workers:       snapgen_e2e_latency_seconds, snapgen_queue_wait_seconds, snapgen_stage_seconds{stage},
               snapgen_batch_size, snapgen_images_generated_total, snapgen_jobs_finished_total{status},
               snapgen_jobs_redelivered_total, snapgen_jobs_dead_lettered_total,
               snapgen_webhook_deliveries_total{outcome}, snapgen_webhook_attempts_total{result}
From the queue: snapgen_queue_up, snapgen_queue_depth, snapgen_jobs_in_flight, snapgen_workers,
               snapgen_worker_heartbeat_timestamp_seconds{worker}, snapgen_results_retained,
               snapgen_results_retained_bytes, snapgen_results_evicted_total
(In the embedded mode the worker runs inside the API process, so its metrics are at /metrics too.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ApiMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "snapgen_requests", "HTTP requests by route template, method and status", ["route", "method", "status"]
        )
        self.request_duration = Histogram(
            "snapgen_request_duration_seconds",
            "HTTP request duration (for POST /v1/generate without Prefer: respond-async, end to end)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = Gauge("snapgen_requests_in_flight", "HTTP requests being served", multiprocess_mode="livesum")


class WorkerMetrics:
    def __init__(self) -> None:
        self.e2e_latency = Histogram(
            "snapgen_e2e_latency_seconds", "job accepted -> result stored", buckets=LATENCY_BUCKETS
        )
        self.queue_wait = Histogram(
            "snapgen_queue_wait_seconds", "job accepted -> a worker starts it", buckets=LATENCY_BUCKETS
        )
        self.stage_seconds = Histogram(
            "snapgen_stage_seconds", "time per batch in each stage (text, unet, decode; encode per job)", ["stage"],
            buckets=LATENCY_BUCKETS,
        )  # fmt: skip
        self.batch_size = Histogram("snapgen_batch_size", "images per batch the model ran", buckets=BATCH_BUCKETS)
        self.images_generated = Counter("snapgen_images_generated", "images generated and stored")
        self.jobs_finished = Counter("snapgen_jobs_finished", "jobs reaching a final state, by state", ["status"])
        self.jobs_redelivered = Counter(
            "snapgen_jobs_redelivered", "jobs taken over from a worker that stopped responding"
        )
        self.jobs_dead_lettered = Counter(
            "snapgen_jobs_dead_lettered", "jobs moved to the dead-letter stream after too many deliveries"
        )


class WebhookMetrics:
    def __init__(self) -> None:
        self.deliveries = Counter(
            "snapgen_webhook_deliveries",
            "webhook deliveries by outcome: delivered (a 2xx), failed (given up), refused (URL not allowed when sent)",
            ["outcome"],
        )
        self.attempts = Counter(
            "snapgen_webhook_attempts", "webhook HTTP attempts by answer: 2xx, 3xx, 4xx, 5xx or error", ["result"]
        )


API = ApiMetrics()
_worker: WorkerMetrics | None = None
_webhooks: WebhookMetrics | None = None


def worker_metrics() -> WorkerMetrics:
    """Created on first use, so API-only processes do not report empty worker metrics."""
    global _worker
    if _worker is None:
        _worker = WorkerMetrics()
    return _worker


def webhook_metrics() -> WebhookMetrics:
    """Created on first use, by the processes that deliver webhooks (those that run a worker)."""
    global _webhooks
    if _webhooks is None:
        _webhooks = WebhookMetrics()
    return _webhooks


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def _forget_dead_processes(directory: str) -> None:
    """Live gauges of API processes that exited must not count (uvicorn has no child-exit hook)."""
    for path in Path(directory).glob("gauge_live*_*.db"):
        match = re.search(r"_(\d+)\.db$", path.name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:
            pass


class _Snapshot:
    """Queue-wide gauges, read before the scrape (collect() itself cannot await)."""

    def __init__(self, stats, up: bool, full: bool = False):
        self.stats, self.up, self.full = stats, up, full

    def collect(self):
        up = GaugeMetricFamily("snapgen_queue_up", "1 if the job queue (Redis) answered this scrape")
        up.add_metric([], 1.0 if self.up else 0.0)
        yield up
        full = GaugeMetricFamily(
            "snapgen_queue_store_full", "1 while Redis is above SNAPGEN_REDIS_HIGH_WATER of its maxmemory (jobs: 503)"
        )
        full.add_metric([], 1.0 if self.full else 0.0)
        yield full
        if self.stats is None:
            return
        depth = GaugeMetricFamily("snapgen_queue_depth", "jobs waiting for a worker")
        depth.add_metric([], self.stats.queued)
        yield depth
        running = GaugeMetricFamily("snapgen_jobs_in_flight", "jobs taken by a worker and not yet finished")
        running.add_metric([], self.stats.running)
        yield running
        workers = GaugeMetricFamily("snapgen_workers", "workers with a recent heartbeat")
        workers.add_metric([], len(self.stats.workers))
        yield workers
        beats = GaugeMetricFamily(
            "snapgen_worker_heartbeat_timestamp_seconds", "time of each live worker's last heartbeat", labels=["worker"]
        )
        for name, info in sorted(self.stats.workers.items()):
            beats.add_metric([name], float(info.get("ts", 0)))
        yield beats
        # Retention: the queue keeps the totals (in Redis: for the whole cluster), so every process agrees.
        retained = GaugeMetricFamily("snapgen_results_retained", "finished jobs whose results are kept")
        retained.add_metric([], self.stats.retained_jobs)
        yield retained
        retained_bytes = GaugeMetricFamily("snapgen_results_retained_bytes", "bytes of the finished jobs kept")
        retained_bytes.add_metric([], self.stats.retained_bytes)
        yield retained_bytes
        evicted = CounterMetricFamily(
            "snapgen_results_evicted",
            "finished jobs deleted before their TTL to stay within SNAPGEN_RESULT_MAX_JOBS / SNAPGEN_RESULT_MAX_BYTES",
        )
        evicted.add_metric([], self.stats.evicted)
        yield evicted


def render(stats, up: bool, full: bool = False) -> tuple[bytes, str]:
    """The /metrics page: this process's (or all API processes') metrics plus the queue's."""
    directory = multiprocess_dir()
    if directory:
        _forget_dead_processes(directory)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        registry.register(_Snapshot(stats, up, full))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    snapshot = CollectorRegistry()
    snapshot.register(_Snapshot(stats, up, full))
    return generate_latest(REGISTRY) + generate_latest(snapshot), CONTENT_TYPE_LATEST


def serve_worker_metrics(port: int, host: str = "127.0.0.1") -> None:
    """A worker's own /metrics on its own port (prometheus-client's threaded server)."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)
