"""Webhooks through the server: the API's checks (in process), the embedded server (uvicorn, the tiny model) and
Redis mode with worker processes, each against a real HTTP receiver on 127.0.0.1 (webhook_receiver.py), whose
signature check is written from the spec."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
from server_harness import (
    STARTUP_TIMEOUT,
    Proc,
    RedisServer,
    Server,
    clean_env,
    finished,
    free_port,
    metric_values,
    snapgen,
    wait_job,
    wait_until,
)
from webhook_receiver import SECRET, Receiver, spec_verify

from server.api import create_app
from server.queue import MemoryJobQueue
from server.settings import Settings
from server.webhooks import build_dispatcher

ASYNC = {"Prefer": "respond-async"}
WEBHOOK_ENV = {
    "SNAPGEN_WEBHOOK_SECRET": SECRET,
    "SNAPGEN_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    "SNAPGEN_WEBHOOK_RETRY_S": "0.2",
    "SNAPGEN_WEBHOOK_RETRY_MAX_S": "0.5",
    "SNAPGEN_WEBHOOK_MAX_ATTEMPTS": "4",
    "SNAPGEN_TORCH_THREADS": "1",
    "SNAPGEN_WARMUP": "false",
}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def call(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def local_settings(**overrides) -> Settings:
    return Settings(webhook_secret=[SECRET], webhook_allowed_hosts=["127.0.0.1"], **overrides)


# -- the API's checks (in process, no model) -------------------------------------------------------
@pytest.mark.parametrize(
    "url, message",
    [
        ("http://169.254.169.254/latest/meta-data/", "never receive webhooks"),
        ("http://[fe80::1]:8080/hook", "never receive webhooks"),
        ("http://[fd00:ec2::254]/", "never receive webhooks"),
        ("http://8.8.8.8/hook", "SNAPGEN_WEBHOOK_ALLOWED_HOSTS"),  # public, but this server allows 127.0.0.1 only
        ("ftp://127.0.0.1/hook", "http:// or https://"),
        ("http://user:pw@127.0.0.1/hook", "credentials"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_refused_webhook_urls_answer_422_naming_the_field(url, message):
    app = create_app(local_settings(), queue=MemoryJobQueue(), start_worker=False)
    response = call(app, "POST", "/v1/generate", json={"prompt": "x", "webhook": url}, headers=ASYNC)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "webhook" and message in error["message"], error


def test_webhook_fields_are_checked():
    app = create_app(local_settings(), queue=MemoryJobQueue(), start_worker=False)
    hook = "http://127.0.0.1:9/hook"
    cases = [
        ({"webhook_events_filter": ["completed"]}, "webhook_events_filter", "without a webhook URL"),
        ({"webhook": hook, "webhook_events_filter": []}, "webhook_events_filter", "at least 1"),
        ({"webhook": hook, "webhook_events_filter": ["done"]}, "webhook_events_filter.0", "'completed'"),
        ({"webhook": 5}, "webhook", "allowed: an http:// or https:// URL"),
        ({"webhook": "http://127.0.0.1/" + "a" * 2048}, "webhook", "at most 2048"),
    ]
    for extra, field, message in cases:
        response = call(app, "POST", "/v1/generate", json={"prompt": "x", **extra}, headers=ASYNC)
        assert response.status_code == 422, (extra, response.text)
        error = response.json()["error"]
        assert error["field"] == field and message in error["message"], (extra, error)
    # Without a secret the server cannot sign: a job with a webhook is refused, saying what to set.
    unsigned = create_app(Settings(webhook_allowed_hosts=["127.0.0.1"]), queue=MemoryJobQueue(), start_worker=False)
    response = call(unsigned, "POST", "/v1/generate", json={"prompt": "x", "webhook": hook}, headers=ASYNC)
    assert response.status_code == 422 and response.json()["error"]["field"] == "webhook"
    assert "SNAPGEN_WEBHOOK_SECRET" in response.json()["error"]["message"]
    # Accepted: the request echo shows the webhook and the default filter (all of Cog's events).
    accepted = call(app, "POST", "/v1/generate", json={"prompt": "x", "webhook": hook}, headers=ASYNC)
    assert accepted.status_code == 202, accepted.text
    echo = call(app, "GET", f"/v1/jobs/{accepted.json()['id']}").json()["request"]
    assert echo["webhook"] == hook and echo["webhook_events_filter"] == ["start", "output", "logs", "completed"]


def test_a_canceled_queued_job_sends_completed(receiver):
    # The memory queue's outbox and a real dispatcher; no worker, so the job stays queued until canceled.
    settings = local_settings(webhook_retry_s=0.1)
    queue = MemoryJobQueue()
    app = create_app(settings, queue=queue, start_worker=False)
    dispatcher = build_dispatcher(queue, settings, "test")
    dispatcher.start_thread()
    try:
        body = {"prompt": "x", "webhook": receiver.url("/c"), "webhook_events_filter": ["start", "completed"]}
        job_id = call(app, "POST", "/v1/generate", json=body, headers=ASYNC).json()["id"]
        assert call(app, "DELETE", f"/v1/jobs/{job_id}").json()["status"] == "canceled"
        wait_until(lambda: receiver.at("/c"), 10, "the completed event")
        [delivery] = receiver.at("/c")
        assert delivery["json"]["type"] == "job.completed" and delivery["json"]["data"]["status"] == "canceled"
        assert delivery["json"]["data"]["error"]["code"] == "canceled"
        assert spec_verify(SECRET, delivery["headers"], delivery["body"])
    finally:
        dispatcher.stop()
        dispatcher.join(10)


# -- the embedded server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hooked(tiny_model, log_dir):
    """`snapgen serve` (embedded) that signs webhooks and may send them to 127.0.0.1, retrying fast."""
    port = free_port()
    env = clean_env(**WEBHOOK_ENV, SNAPGEN_DRAIN_TIMEOUT_S="2")
    args = snapgen("serve", "--model", str(tiny_model), "--port", str(port))
    proc = Proc("embedded-webhooks", args, env, log_dir).start()
    try:
        yield Server(proc, port).wait_ready()
    finally:
        proc.stop(signal.SIGTERM, timeout=30)


def test_events_arrive_signed_in_order_with_links(hooked, receiver):
    with hooked.client() as client:
        body = {"prompt": "a red circle", "steps": 2, "seed": 5, "webhook": receiver.url("/all")}
        job_id = client.post("/v1/generate", json=body, headers=ASYNC).json()["id"]
        job = wait_job(client, job_id, finished, "the job")
        wait_until(lambda: any(r["json"]["type"] == "job.completed" for r in receiver.at("/all")), 30, "completed")
        got = receiver.at("/all")
        # Every event of a 2-step job: start, the progress of each step, then completed, in that order.
        assert [r["json"]["type"] for r in got] == ["job.start", "job.output", "job.output", "job.completed"]
        assert [r["json"]["data"]["progress"]["step"] for r in got[1:3]] == [1, 2]
        assert all(spec_verify(SECRET, r["headers"], r["body"]) for r in got)
        assert len({r["headers"]["webhook-id"] for r in got}) == 4  # one id per delivery
        assert all(abs(int(r["headers"]["webhook-timestamp"]) - time.time()) < 60 for r in got)
        assert all(r["json"]["timestamp"].endswith("Z") for r in got)
        assert got[0]["json"]["data"]["status"] == "running"
        completed = got[-1]["json"]["data"]
        # The job as GET /v1/jobs/{id} shows it, its images as links (this job's response_format is b64_json).
        assert completed["status"] == "succeeded" and completed["id"] == job_id
        assert completed["request"] == job["request"] and completed["progress"] == job["progress"]
        [image] = completed["result"]["data"]
        assert image["seed"] == 5 and image["url"] == f"{hooked.url}/v1/images/{job_id}/0.png"
        assert client.get(image["url"]).content[:8] == b"\x89PNG\r\n\x1a\n"


def test_retries_carry_the_same_id_and_the_filter_holds(hooked):
    receiver = Receiver(fail_first=2)
    try:
        with hooked.client() as client:
            body = {"prompt": "x", "steps": 2, "webhook": receiver.url("/done"), "webhook_events_filter": ["completed"]}
            job_id = client.post("/v1/generate", json=body, headers=ASYNC).json()["id"]
            wait_until(lambda: len(receiver.at("/done")) >= 3, 30, "two failures, then the delivery")
            time.sleep(0.5)  # nothing more comes: delivered
            got = receiver.at("/done")
            assert len(got) == 3
            assert len({r["headers"]["webhook-id"] for r in got}) == 1 and len({r["body"] for r in got}) == 1
            assert all(spec_verify(SECRET, r["headers"], r["body"]) for r in got)
            assert {r["json"]["type"] for r in got} == {"job.completed"}  # only what the filter asked for
            assert got[0]["json"]["data"]["id"] == job_id
            metrics = metric_values(client.get("/metrics").text)
            assert metrics['snapgen_webhook_attempts_total{result="5xx"}'] >= 2
    finally:
        receiver.close()


def test_a_receiver_that_is_down_costs_the_webhook_not_the_result(hooked):
    down = Receiver()
    down.close()  # nothing listens there now
    with hooked.client() as client:
        before = metric_values(client.get("/metrics").text).get('snapgen_webhook_deliveries_total{outcome="failed"}', 0)
        started = time.monotonic()
        body = {"prompt": "x", "steps": 2, "webhook": down.url("/gone")}
        response = client.post("/v1/generate", json=body)  # synchronous: the result comes as always
        assert response.status_code == 200, response.text
        assert response.json()["data"][0]["b64_json"] and time.monotonic() - started < 30
        job = client.get(f"/v1/jobs/{response.json()['id']}").json()
        assert job["status"] == "succeeded" and job["result"]["data"][0]["b64_json"]

        def given_up():
            values = metric_values(client.get("/metrics").text)
            return values.get('snapgen_webhook_deliveries_total{outcome="failed"}', 0) >= before + 4  # 4 events

        wait_until(given_up, 30, "the deliveries given up after their attempts")


# -- Redis mode --------------------------------------------------------------------------------------
def test_a_delivery_owed_by_a_killed_worker_is_delivered_by_another(tiny_model, log_dir, tmp_path_factory):
    redis = RedisServer(log_dir, tmp_path_factory.mktemp("redis-webhooks")).start()
    receiver = Receiver(fail_first=10**6)  # down until the worker holding the delivery is dead
    port = free_port()
    api = Proc("webhooks-api", snapgen("serve", "--redis", redis.url, "--port", str(port)),
               clean_env(**WEBHOOK_ENV), log_dir).start()  # fmt: skip
    # The first attempt fails, the next is 60 s away: the delivery stays owed by its dispatcher.
    worker_env = clean_env(**{**WEBHOOK_ENV, "SNAPGEN_WEBHOOK_RETRY_S": "60"}, SNAPGEN_CLAIM_IDLE_S="1.5",
                           SNAPGEN_HEARTBEAT_S="0.3", SNAPGEN_DRAIN_TIMEOUT_S="0.5")  # fmt: skip
    workers = {
        name: Proc(
            name,
            snapgen("worker", "--redis", redis.url, "--model", str(tiny_model), "--name", name, "--threads", "1"),
            worker_env,
            log_dir,
        ).start()  # fmt: skip
        for name in ("hw1", "hw2")
    }
    server = Server(api, port)
    outbox = "snapgen:webhooks"
    try:

        def both_ready():
            for proc in (api, *workers.values()):
                if not proc.alive():
                    raise AssertionError(f"{proc.name} exited:\n{proc.log_tail()}")
            body = httpx.get(f"{server.url}/readyz", timeout=5).json()
            return body["status"] == "ready" and "2 worker(s)" in body["checks"]["model"]

        wait_until(both_ready, STARTUP_TIMEOUT, "the API and two workers", interval=0.2)
        with server.client() as client:
            body = {"prompt": "x", "steps": 2, "webhook": receiver.url("/r"), "webhook_events_filter": ["completed"]}
            job_id = client.post("/v1/generate", json=body, headers=ASYNC).json()["id"]
            assert wait_job(client, job_id, finished, "the job")["status"] == "succeeded"  # the receiver is down
            wait_until(lambda: receiver.at("/r"), 30, "the first attempt")
            pending = redis.client().xpending_range(outbox, "dispatchers", min="-", max="+", count=10)
            [entry] = pending
            holder = entry["consumer"].decode()
            workers[holder].stop(signal.SIGKILL)
            receiver.fail_first = 0
            wait_until(lambda: len(receiver.at("/r")) >= 2, 60, "the delivery, by the other worker's dispatcher")
            first, second = receiver.at("/r")[:2]
            assert first["headers"]["webhook-id"] == second["headers"]["webhook-id"]  # the same delivery
            assert second["body"] == first["body"] and spec_verify(SECRET, second["headers"], second["body"])
            assert second["json"]["data"]["id"] == job_id and second["json"]["data"]["status"] == "succeeded"
            wait_until(lambda: redis.client().xlen(outbox) == 0, 10, "the outbox emptied (acknowledged)")
            other = next(name for name in workers if name != holder)
            assert "took over 1 delivery" in workers[other].log_tail(200)
            # Every event through Redis (lua/webhook.lua from start.lua, webhook_output.lua, retain.lua).
            body = {"prompt": "x", "steps": 2, "webhook": receiver.url("/all")}
            job_id = client.post("/v1/generate", json=body, headers=ASYNC).json()["id"]
            wait_until(lambda: any(r["json"]["type"] == "job.completed" for r in receiver.at("/all")), 30, "completed")
            got = receiver.at("/all")
            assert [r["json"]["type"] for r in got] == ["job.start", "job.output", "job.output", "job.completed"]
            assert [r["json"]["data"]["status"] for r in got] == ["running", "running", "running", "succeeded"]
            assert all(spec_verify(SECRET, r["headers"], r["body"]) and r["json"]["data"]["id"] == job_id for r in got)
    finally:
        for proc in (*workers.values(), api):
            proc.stop(signal.SIGTERM, timeout=30)
        redis.stop()
        receiver.close()
