"""The HTTP API: FastAPI routes and pydantic schemas. Validation and errors only, never a tensor.

The app talks to a :class:`server.queue.JobQueue` and does not know which one it has. In the
embedded mode (no Redis URL) it also starts one worker thread on an in-memory queue.

``schemas`` (request and response models), ``errors`` (the error envelope and its handlers),
``dependencies`` (state, auth, limits), ``middleware``, ``bodies`` (responses built from a job),
``routes/`` (generate, jobs, models, ops) and ``app`` (assembly). Errors always look like
``{"error": {"code", "message", "field"?}}``.
"""

from .app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
