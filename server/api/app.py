"""Assembles the FastAPI app: shared state, lifespan, middleware, error handlers and routers."""

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..mobile import BundleStore
from ..queue import JobQueue, MemoryJobQueue, RedisJobQueue
from ..security import ApiKeys
from ..settings import Settings
from . import docs_pages, errors, middleware, openapi
from .dependencies import ModelInfoCache
from .routes import generate, jobs, models, openai_images, ops, playground


def create_app(settings: Settings | None = None, queue: JobQueue | None = None, start_worker: bool = True) -> FastAPI:
    """The API on ``queue`` (default: Redis when ``settings.redis_url`` is set, else an in-memory queue).

    With an in-memory queue and ``start_worker``, the app also runs one worker thread (the embedded mode).
    """
    settings = settings or Settings()
    if queue is None:
        queue_class = RedisJobQueue if settings.redis_url else MemoryJobQueue
        queue = queue_class.from_settings(settings)
    keys = ApiKeys(settings.all_api_keys())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = dispatcher = None
        if isinstance(queue, MemoryJobQueue) and start_worker:
            from ..webhooks import build_dispatcher
            from ..worker_process import WEBHOOK_DRAIN_S, build_worker

            worker = build_worker(queue, settings, "embedded")
            worker.start_thread()
            dispatcher = build_dispatcher(queue, settings, "embedded")
            if dispatcher is not None:
                dispatcher.start_thread()
        app.state.worker = worker
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
                await asyncio.to_thread(worker.join, settings.drain_timeout_s + 5)
            if dispatcher is not None:  # the memory outbox ends with the process: deliver what is owed, briefly
                dispatcher.stop(drain_s=WEBHOOK_DRAIN_S)
                await asyncio.to_thread(dispatcher.join, WEBHOOK_DRAIN_S + settings.webhook_timeout_s + 1)
            await queue.aclose()

    app = FastAPI(
        title="snapgen",
        version="0.1.0",
        summary="SnapGen text-to-image generation API",
        description='Errors are `{"error": {"code", "message", "field"?}}`; the OpenAI-compatible routes '
        "(/v1/images/generations, /v1/images/edits, /v1/models/{id}) answer in OpenAI's envelope "
        '`{"error": {"message", "type", "param", "code"}}`. See docs/server.md.',
        lifespan=lifespan,
        # docs_pages serves both pages with their assets from this server: FastAPI's own use a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.queue = queue
    app.state.keys = keys
    app.state.bundles = BundleStore(settings.mobile_dir)
    app.state.model_info = ModelInfoCache()
    app.state.worker = None

    errors.install(app)
    middleware.install(app, settings)
    app.include_router(generate.router(settings.max_prompt_chars))
    app.include_router(openai_images.router(settings.max_prompt_chars))
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(ops.router)
    app.include_router(playground.router)
    openapi.install(app, keys.enabled)
    docs_pages.install(app)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for several API processes: settings come from SNAPGEN_* variables."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(Settings())
