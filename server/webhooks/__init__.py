"""Webhooks for jobs: Standard Webhooks signatures, the URL policy, a sender with retries, and the dispatcher
that delivers a queue's outbox.

A job may name a ``webhook`` URL and the events it wants (Cog's names: ``start``, ``output`` for each step,
``completed``; ``logs`` is accepted and never sent). When such an event happens the queue writes a
:class:`WebhookDelivery` into its outbox, in the same step as the state change (Redis: the same Lua
script), so no event is lost between the two. A :class:`Dispatcher` thread in every process that runs a
worker (the embedded server, each ``snapgen worker``) takes deliveries from the outbox, POSTs them off the
worker's generation path, retries with exponential backoff, and acknowledges them once delivered or given
up. In Redis the outbox is a stream with a consumer group: a dispatcher that dies leaves its deliveries
pending, and another takes them over (XAUTOCLAIM) with the same ``webhook-id``.

Each request is signed as the Standard Webhooks spec says (https://www.standardwebhooks.com/)::

    webhook-id:        the delivery's id, the same on every retry (receivers deduplicate on it)
    webhook-timestamp: unix seconds of this attempt
    webhook-signature: "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), one per secret, space-separated
                       key = base64-decoded secret without its "whsec_" prefix

URL policy (``SNAPGEN_WEBHOOK_ALLOWED_HOSTS``, default ``public``): entries are ``public`` (any globally
routable address), IP addresses or networks (``10.0.0.0/8``, ``127.0.0.1``), and host names
(``hooks.example.com``, ``*.example.com``). Link-local addresses (169.254.0.0/16, fe80::/10, where cloud
metadata services live), the known metadata addresses, unspecified and multicast addresses are never
allowed. The host is resolved and every address checked at submit time and again before every attempt
(the connection goes to an address that was checked, so DNS rebinding gains nothing).

    signing.py     secrets, signatures, and the check a receiver makes (verify)
    policy.py      the URL policy
    sender.py      one attempt: resolve, check, connect to a checked address, POST, classify the answer
    events.py      WebhookDelivery (an outbox entry), the Outbox interface, the output throttle, the body
    dispatcher.py  the dispatcher thread (retries, acknowledgements), built from the settings

The queues hold the outboxes (server/queue/memory.py, redis_webhooks.py and lua/webhook*.lua); the API checks a
job's webhook at submit time (server/api/webhooks_in.py). docs/server.md (Webhooks) is the receiver's reference.
"""

from .dispatcher import Dispatcher, build_dispatcher
from .events import DEFAULT_EVENTS, EVENTS, Outbox, OutputThrottle, WebhookDelivery, payload
from .policy import WebhookPolicy, WebhookRefused, WebhookUnresolvable, parse_url, policy_for
from .sender import Attempt, Sender, classify
from .signing import WebhookVerificationError, new_secret, parse_secret, sign, signature_header, verify

__all__ = [
    "DEFAULT_EVENTS",
    "EVENTS",
    "Attempt",
    "Dispatcher",
    "Outbox",
    "OutputThrottle",
    "Sender",
    "WebhookDelivery",
    "WebhookPolicy",
    "WebhookRefused",
    "WebhookUnresolvable",
    "WebhookVerificationError",
    "build_dispatcher",
    "classify",
    "new_secret",
    "parse_secret",
    "parse_url",
    "payload",
    "policy_for",
    "sign",
    "signature_header",
    "verify",
]
