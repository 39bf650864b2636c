"""Webhooks: signatures checked the way a receiver would (written here from the Standard Webhooks spec, not with
the server's code), the URL policy, the sender and the dispatcher against a real HTTP receiver on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import uuid

import pytest
from server_harness import RedisServer, wait_until
from webhook_receiver import SECRET, Receiver, spec_verify

from server.queue import Job, MemoryJobQueue, RedisJobQueue
from server.webhooks import (
    Dispatcher,
    OutputThrottle,
    Sender,
    WebhookDelivery,
    WebhookPolicy,
    WebhookRefused,
    WebhookVerificationError,
    new_secret,
    parse_secret,
    sign,
    verify,
)
from snapgen.request import GenerationRequest

LOCAL = WebhookPolicy(["127.0.0.1"])


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


# -- signing -----------------------------------------------------------------------------------------
def test_the_spec_test_vector():
    # The Standard Webhooks specification's published example (its reference libraries test it too).
    key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_sender_headers_verify_independently_and_with_the_helper():
    other = new_secret()
    sender = Sender([SECRET, other], LOCAL)
    body = b'{"type":"job.completed"}'
    headers = sender.headers("msg_1", body)
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert len(headers["webhook-signature"].split(" ")) == 2  # one per secret: a receiver with either verifies
    assert spec_verify(SECRET, headers, body) and spec_verify(other, headers, body)
    assert not spec_verify(new_secret(), headers, body)
    assert verify(SECRET, headers, body) == {"type": "job.completed"}
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, headers, body + b" ")
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, {**headers, "webhook-id": "msg_2"}, body)
    old = sender.headers("msg_1", body, timestamp=int(time.time()) - 600)
    assert spec_verify(SECRET, old, body)
    with pytest.raises(WebhookVerificationError, match="too far"):
        verify(SECRET, old, body)


@pytest.mark.parametrize("secret", ["abc", "whsec_" + base64.b64encode(b"short").decode(), "whsec_!!!!"])
def test_bad_secrets_are_refused_with_the_rule(secret):
    with pytest.raises(ValueError, match="whsec_"):
        parse_secret(secret)


# -- the URL policy --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
        "http://[fe80::1]/hook",
        "http://[::ffff:169.254.169.254]/hook",  # the same, IPv4-mapped
        "http://[fd00:ec2::254]/hook",  # AWS's IPv6 metadata address
        "http://100.100.100.200/hook",
        "http://0.0.0.0:8080/hook",
        "http://224.0.0.1/hook",
    ],
)
def test_link_local_and_metadata_are_never_allowed(url):
    policy = WebhookPolicy(["public", "0.0.0.0/0", "::/0"])  # even with everything listed
    with pytest.raises(WebhookRefused, match="never"):
        policy.resolve(url)


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://example.com/x", "http:// or https://"),
        ("http:///path", "no host"),
        ("https://user:pw@example.com/", "credentials"),
        ("http://exa mple.com/", "ASCII without spaces"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://" + "a" * 2100 + ".com/", "longer than"),
    ],
)
def test_url_syntax(url, message):
    with pytest.raises(WebhookRefused, match=message):
        WebhookPolicy(["public"]).resolve(url)


def test_private_and_loopback_need_an_entry():
    public = WebhookPolicy(["public"])
    for url in ("http://127.0.0.1:9/x", "http://10.1.2.3/x", "http://192.168.0.1/x", "http://[::1]/x"):
        with pytest.raises(WebhookRefused, match="SNAPGEN_WEBHOOK_ALLOWED_HOSTS"):
            public.resolve(url)
    assert public.resolve("https://8.8.8.8/x")[1] == ["8.8.8.8"]
    # A name that resolves to loopback is checked by its addresses (DNS rebinding gains nothing).
    with pytest.raises(WebhookRefused, match="loopback"):
        public.resolve("http://localhost:9/x")
    assert LOCAL.resolve("http://127.0.0.1:9/x")[1] == ["127.0.0.1"]
    with pytest.raises(WebhookRefused):
        LOCAL.resolve("https://8.8.8.8/x")  # no `public` entry: only what is listed
    network = WebhookPolicy(["10.0.0.0/8"])
    assert network.resolve("http://10.9.8.7/x")[1] == ["10.9.8.7"]
    named = WebhookPolicy(["localhost", "*.example.com"])
    assert "127.0.0.1" in named.resolve("http://localhost:9/x")[1]
    assert named._name_allowed("hooks.example.com") and not named._name_allowed("example.com")
    with pytest.raises(WebhookRefused, match="sends no webhooks"):
        WebhookPolicy([]).resolve("https://8.8.8.8/x")
    with pytest.raises(ValueError, match="not a webhook host entry"):
        WebhookPolicy(["not a host"])


# -- the sender ------------------------------------------------------------------------------------
def test_sender_outcomes(receiver):
    sender = Sender([SECRET], LOCAL, timeout_s=5)
    receiver.statuses = {"/ok": 204, "/down": 503, "/gone": 410, "/slow-down": 429, "/moved": 302}
    receiver.extra_headers = {"Retry-After": "7"}
    assert sender.send(receiver.url("/ok"), "m1", b"{}").outcome == "delivered"
    assert sender.send(receiver.url("/down"), "m2", b"{}").outcome == "retry"
    assert sender.send(receiver.url("/gone"), "m3", b"{}").outcome == "give_up"
    assert sender.send(receiver.url("/moved"), "m4", b"{}").outcome == "give_up"  # redirects are not followed
    limited = sender.send(receiver.url("/slow-down"), "m5", b"{}")
    assert (limited.outcome, limited.status, limited.retry_after_s) == ("retry", 429, 7.0)
    assert [r["path"] for r in receiver.requests] == ["/ok", "/down", "/gone", "/moved", "/slow-down"]
    first = receiver.requests[0]
    assert first["headers"]["Content-Type"] == "application/json" and first["headers"]["webhook-id"] == "m1"
    assert spec_verify(SECRET, first["headers"], first["body"])
    # Refused by the policy: nothing is sent.
    refused = Sender([SECRET], WebhookPolicy(["public"])).send(receiver.url("/ok"), "m6", b"{}")
    assert refused.outcome == "refused" and len(receiver.requests) == 5
    # Nobody listening: retried.
    closed = Receiver()
    closed.close()
    assert sender.send(closed.url(), "m7", b"{}").outcome == "retry"


# -- the dispatcher --------------------------------------------------------------------------------
class ListOutbox:
    """The outbox interface over a list, as the memory queue keeps one."""

    def __init__(self):
        self.cv = threading.Condition()
        self.new: list[WebhookDelivery] = []
        self.acked: list[str] = []

    def put(self, delivery: WebhookDelivery) -> None:
        with self.cv:
            self.new.append(delivery)
            self.cv.notify_all()

    def take_webhook_deliveries(self, consumer, max_count, block_s):
        with self.cv:
            if not self.new and block_s > 0:
                self.cv.wait_for(lambda: self.new, timeout=block_s)
            taken, self.new = self.new[:max_count], self.new[max_count:]
            return taken

    def ack_webhook_delivery(self, consumer, delivery):
        with self.cv:
            self.acked.append(delivery.id)

    def hold_webhook_deliveries(self, consumer, deliveries):
        pass


class _Job:
    def __init__(self, job_id: str, url: str):
        self.id, self.webhook = job_id, url


def _delivery(msg_id: str, job_id: str, url: str, event: str = "completed") -> WebhookDelivery:
    return WebhookDelivery(msg_id, event, time.time(), _Job(job_id, url))


def _render(delivery: WebhookDelivery) -> bytes:
    return json.dumps({"type": f"job.{delivery.event}", "id": delivery.id}).encode()


def _dispatcher(outbox, **kw) -> Dispatcher:
    kw = {"retry_s": 0.05, "retry_max_s": 0.2, "hold_s": 0.1, **kw}
    return Dispatcher(outbox, Sender([SECRET], LOCAL, timeout_s=5), "test", render=_render, **kw)


def test_dispatcher_retries_with_the_same_id_then_acknowledges():
    receiver = Receiver(fail_first=3)
    outbox = ListOutbox()
    dispatcher = _dispatcher(outbox, max_attempts=5)
    dispatcher.start_thread()
    try:
        outbox.put(_delivery("msg_a", "job1", receiver.url()))
        wait_until(lambda: outbox.acked == ["msg_a"], 20, "the delivery acknowledged")
        assert len(receiver.requests) == 4  # three 500s, then a 200
        assert {r["headers"]["webhook-id"] for r in receiver.requests} == {"msg_a"}
        assert len({r["body"] for r in receiver.requests}) == 1  # the same body; each attempt signed anew
        assert all(spec_verify(SECRET, r["headers"], r["body"]) for r in receiver.requests)
        gaps = [b["time"] - a["time"] for a, b in zip(receiver.requests, receiver.requests[1:])]
        assert gaps[1] > gaps[0] * 1.3 and gaps[2] > gaps[1] * 1.3  # exponential backoff
    finally:
        dispatcher.stop()
        dispatcher.join(10)
        receiver.close()
    assert dispatcher.stopped.is_set()


def test_dispatcher_gives_up_after_the_attempts_and_on_a_4xx():
    receiver = Receiver(fail_first=100)
    receiver.statuses = {"/refuses": 400}
    outbox = ListOutbox()
    dispatcher = _dispatcher(outbox, max_attempts=3)
    dispatcher.start_thread()
    try:
        outbox.put(_delivery("msg_down", "job1", receiver.url("/down")))
        outbox.put(_delivery("msg_400", "job2", receiver.url("/refuses")))
        wait_until(lambda: sorted(outbox.acked) == ["msg_400", "msg_down"], 20, "both given up")
        paths = [r["path"] for r in receiver.requests]
        assert paths.count("/down") == 3 and paths.count("/refuses") == 1
    finally:
        dispatcher.stop()
        dispatcher.join(10)
        receiver.close()


def test_dispatcher_keeps_one_jobs_events_in_order(receiver):
    outbox = ListOutbox()
    dispatcher = _dispatcher(outbox)
    for i, event in enumerate(["start", "output", "output", "completed"]):
        outbox.put(_delivery(f"msg_{i}", "job1", receiver.url(), event))
    dispatcher.start_thread()
    try:
        wait_until(lambda: len(outbox.acked) == 4, 20, "four deliveries")
        assert [r["headers"]["webhook-id"] for r in receiver.requests] == ["msg_0", "msg_1", "msg_2", "msg_3"]
    finally:
        dispatcher.stop()
        dispatcher.join(10)


def test_dispatcher_drains_on_stop(receiver):
    outbox = ListOutbox()
    dispatcher = _dispatcher(outbox)
    dispatcher.start_thread()
    for i in range(5):
        outbox.put(_delivery(f"msg_{i}", f"job{i}", receiver.url()))
    dispatcher.stop(drain_s=10)
    dispatcher.join(15)
    assert dispatcher.stopped.is_set() and sorted(outbox.acked) == [f"msg_{i}" for i in range(5)]


def test_output_throttle():
    throttle = OutputThrottle(0.5)
    assert throttle.due("j", 1, 8, now=0.0)  # the first step
    assert not throttle.due("j", 2, 8, now=0.1)
    assert throttle.due("j", 3, 8, now=0.6)
    assert throttle.due("j", 8, 8, now=0.7)  # the last step, always
    throttle.forget("j")
    assert throttle.due("j", 5, 8, now=0.8)


# -- the queues' outboxes --------------------------------------------------------------------------
_LOOP = asyncio.new_event_loop()  # one loop: a queue's async Redis client stays bound to the loop it met first


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("wlogs"), tmp_path_factory.mktemp("wdata")).start()
    yield server
    server.stop()


def _redis_queue(redis_server, prefix: str, **kw) -> RedisJobQueue:
    return RedisJobQueue(redis_server.url, prefix=prefix, **kw)


@pytest.fixture(params=["memory", "redis"])
def queue(request, redis_server):
    if request.param == "memory":
        q = MemoryJobQueue(webhook_output_interval_s=60)
    else:
        q = _redis_queue(redis_server, f"w{uuid.uuid4().hex[:8]}", claim_idle_s=60, webhook_output_interval_s=60)
    yield q
    q.close()


def _job(events=("start", "output", "completed"), webhook="http://127.0.0.1:9/h") -> Job:
    request = GenerationRequest("a red circle", width=128, height=128, steps=3, guidance_scale=1.0, seed=1)
    return Job(id=uuid.uuid4().hex, request=request, webhook=webhook, webhook_events=tuple(events),
               base_url="http://api")  # fmt: skip


def _run(queue, *jobs: Job) -> None:
    for job in jobs:
        _LOOP.run_until_complete(queue.submit(job, max_depth=10))
    reserved = queue.reserve("w1", 10, 1.0)
    running = queue.start("w1", reserved)
    for step in (1, 2, 3):
        queue.progress(running, step, 3)
    for job in running:
        assert queue.complete(job, [b"png"], {"count": 1, "seeds": [1], "format": "png", "timings": {}})


def test_a_queue_writes_the_events_a_job_asked_for(queue):
    everything, only_completed, none = _job(), _job(["completed"]), _job(webhook=None, events=())
    _run(queue, everything, only_completed, none)
    taken = queue.take_webhook_deliveries("d1", 100, 1.0)
    mine = [(d.event, d.job.status, d.job.step) for d in taken if d.job.id == everything.id]
    # Steps 1 and 3 of 3: the first and the last always, step 2 within the 60 s output interval.
    assert mine == [("start", "running", 0), ("output", "running", 1), ("output", "running", 3),
                    ("completed", "succeeded", 3)]  # fmt: skip
    assert [d.event for d in taken if d.job.id == only_completed.id] == ["completed"]
    assert not [d for d in taken if d.job.id == none.id]
    assert len({d.id for d in taken}) == len(taken) == 5
    done = next(d for d in taken if d.event == "completed" and d.job.id == everything.id)
    assert done.job.webhook == everything.webhook and done.job.base_url == "http://api"
    assert done.job.result["count"] == 1 and abs(done.at - time.time()) < 30
    for delivery in taken:
        queue.ack_webhook_delivery("d1", delivery)
    assert queue.take_webhook_deliveries("d1", 100, 0.0) == []
    # A queued job canceled: completed, with the canceled state.
    canceled = _job(["completed"])
    _LOOP.run_until_complete(queue.submit(canceled, max_depth=10))
    _LOOP.run_until_complete(queue.cancel(canceled.id))
    [delivery] = queue.take_webhook_deliveries("d1", 100, 1.0)
    assert delivery.event == "completed" and delivery.job.status == "canceled"


def test_redis_outbox_held_deliveries_stay_and_a_silent_dispatchers_are_taken_over(redis_server):
    prefix = f"w{uuid.uuid4().hex[:8]}"
    a, b = (_redis_queue(redis_server, prefix, claim_idle_s=0.3) for _ in range(2))
    try:
        _run(a, _job(["completed"]))
        [owed] = a.take_webhook_deliveries("a", 10, 1.0)
        for _ in range(3):  # "a" holds it: however long it keeps it, "b" does not take it
            time.sleep(0.2)
            a.hold_webhook_deliveries("a", [owed])
            assert b.take_webhook_deliveries("b", 10, 0.0) == []
        time.sleep(0.5)  # "a" went silent
        [taken] = b.take_webhook_deliveries("b", 10, 0.0)
        assert (taken.id, taken.event, taken.job.id) == (owed.id, owed.event, owed.job.id)  # the same webhook-id
        b.ack_webhook_delivery("b", taken)
        assert redis_server.client().xlen(f"{prefix}:webhooks") == 0
    finally:
        a.close()
        b.close()
