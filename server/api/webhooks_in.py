"""The webhook of a POST /v1/generate body, checked before a job is queued: the URL against this server's policy
(server/webhooks/, its host resolved), a secret to sign with, and the events filter with Cog's default."""

from ..queue import Job
from ..settings import Settings
from ..webhooks import DEFAULT_EVENTS, EVENTS, WebhookRefused, policy_for
from .errors import APIError
from .schemas import GenerateRequest


async def apply_webhook(job: Job, body: GenerateRequest, settings: Settings, base: str) -> Job:
    """``job`` with the body's webhook, its events (all of them when the body names none) and ``base``, where
    this server was reached (the links in the webhook bodies). APIError 422 naming the field."""
    if body.webhook is None:
        if body.webhook_events_filter is not None:
            raise APIError(422, "invalid_request", "webhook_events_filter: without a webhook URL there is nothing "
                           "to filter; add webhook or leave the filter out", field="webhook_events_filter")  # fmt: skip
        return job
    if not settings.webhook_secret:
        raise APIError(422, "invalid_request", "webhook: this server cannot sign webhooks (no SNAPGEN_WEBHOOK_SECRET "
                       "is set), so it takes no job with one; its operator can set one (docs/server.md, Webhooks)",
                       field="webhook")  # fmt: skip
    try:
        await policy_for(tuple(settings.webhook_allowed_hosts)).acheck(body.webhook)
    except WebhookRefused as e:
        raise APIError(422, "invalid_request", f"webhook: {e}", field="webhook") from None
    wanted = set(body.webhook_events_filter or DEFAULT_EVENTS)
    job.webhook, job.webhook_events, job.base_url = body.webhook, tuple(e for e in EVENTS if e in wanted), base
    return job
