"""Scaled-out mode against real parts: redis-server, `snapgen serve --redis` with two API processes
and API keys, and two `snapgen worker` processes. Ends by killing workers, so the order matters.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass

import httpx
import pytest
from server_harness import (
    JOB_TIMEOUT,
    STARTUP_TIMEOUT,
    Proc,
    RedisServer,
    Server,
    assert_same_picture,
    clean_env,
    finished,
    free_port,
    metric_values,
    snapgen,
    sse_events,
    wait_job,
    wait_until,
)

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
RATE_LIMIT = 40
ASYNC = {"Prefer": "respond-async"}


@dataclass
class Cluster:
    redis: RedisServer
    api: Server
    workers: dict[str, Proc]
    metrics_ports: dict[str, int]

    def client(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.api.client(headers=headers)

    def job_hash(self, job_id: str) -> dict[str, str]:
        raw = self.redis.client().hgetall(f"snapgen:job:{job_id}")
        return {k.decode(): v.decode() for k, v in raw.items()}

    def worker_metrics(self, name: str) -> dict[str, float]:
        return metric_values(httpx.get(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics", timeout=10).text)


@pytest.fixture(scope="module")
def cluster(tiny_model, log_dir, tmp_path_factory):
    redis = RedisServer(log_dir, tmp_path_factory.mktemp("redis-data")).start()
    port = free_port()
    api_env = clean_env(SNAPGEN_API_KEYS=f"{KEY_A},{KEY_B}", SNAPGEN_RATE_LIMIT_PER_MINUTE=str(RATE_LIMIT))
    api = Proc("api", snapgen("serve", "--redis", redis.url, "--port", str(port), "--api-processes", "2"), api_env,
               log_dir).start()  # fmt: skip
    worker_env = clean_env(
        SNAPGEN_CLAIM_IDLE_S="2",
        SNAPGEN_HEARTBEAT_S="0.4",
        SNAPGEN_MAX_DELIVERIES="3",
        SNAPGEN_DRAIN_TIMEOUT_S="0.5",
    )
    workers, ports = {}, {}
    for name in ("w1", "w2"):
        ports[name] = free_port()
        args = snapgen("worker", "--redis", redis.url, "--model", str(tiny_model), "--name", name, "--threads", "1",
                       "--metrics-port", str(ports[name]))  # fmt: skip
        workers[name] = Proc(name, args, worker_env, log_dir).start()
    server = Server(api, port)
    try:

        def both_workers():
            for proc in (api, *workers.values()):
                if not proc.alive():
                    raise AssertionError(f"{proc.name} exited:\n{proc.log_tail()}")
            body = httpx.get(f"{server.url}/readyz", timeout=5).json()
            return body["status"] == "ready" and "2 worker(s)" in body["checks"]["model"]

        wait_until(both_workers, STARTUP_TIMEOUT, "the API and two workers", interval=0.2)
        yield Cluster(redis, server, workers, ports)
    finally:
        for proc in (*workers.values(), api):
            proc.stop(signal.SIGTERM, timeout=30)
        redis.stop()


def submit(client, **body) -> str:
    body.setdefault("prompt", "a red circle")
    response = client.post("/v1/generate", json=body, headers=ASYNC)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def test_api_keys(cluster):
    with cluster.client(key=None) as anonymous:
        missing = anonymous.get("/v1/models")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "unauthorized"
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer not-a-key"})
        assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
        assert anonymous.post("/v1/generate", json={"prompt": "x"}).status_code == 401
        for path in ("/healthz", "/readyz", "/metrics"):  # operations endpoints stay open
            assert anonymous.get(path).status_code == 200
    with cluster.client(KEY_A) as a, cluster.client(KEY_B) as b:
        [card] = a.get("/v1/models").json()["data"]
        assert card["id"] == "tiny" and card["workers"] == 2
        job_id = submit(a, steps=1)
        assert wait_job(a, job_id, finished, "key A's job")["status"] == "succeeded"
        assert b.get(f"/v1/jobs/{job_id}").status_code == 404  # jobs are private to their key
        assert b.delete(f"/v1/jobs/{job_id}").status_code == 404


def test_sync_async_and_events_through_redis(cluster):
    with cluster.client() as client:
        response = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 3, "n": 2, "steps": 2})
        assert response.status_code == 200, response.text
        body = response.json()
        assert [d["seed"] for d in body["data"]] == [3, 4] and all(d["b64_json"] for d in body["data"])
        assert cluster.redis.client().ttl(f"snapgen:job:{body['id']}") > 0  # results expire
        job_id = submit(client, prompt="a blue square", steps=3, response_format="url")
        events = sse_events(client, f"/v1/jobs/{job_id}/events")
        assert events[-1][0] == "result"
        url = events[-1][1]["result"]["data"][0]["url"]
        assert client.get(url).headers["content-type"] == "image/png"
        same = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 3, "steps": 2}).json()
        assert_same_picture(same["data"][0]["b64_json"], body["data"][0]["b64_json"])  # any worker, same image


def test_rate_limit_per_key(cluster):
    with cluster.client(KEY_B) as client:
        statuses = []
        for _ in range(2 * RATE_LIMIT + 1):  # enough to cross the limit even if a minute window ends meanwhile
            response = client.post("/v1/generate", json={"prompt": "x", "steps": 0})  # invalid: cheap, still counted
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        assert statuses[-1] == 429 and set(statuses[:-1]) == {422}
        assert response.json()["error"]["code"] == "rate_limited" and int(response.headers["retry-after"]) >= 1
    with cluster.client(KEY_A) as other:  # another key has its own budget
        assert other.post("/v1/generate", json={"prompt": "x", "steps": 0}).status_code == 422


def test_metrics_are_aggregated_across_api_processes(cluster):
    with cluster.client(key=None) as client:
        before = metric_values(client.get("/metrics").text)
        for _ in range(20):
            assert client.get("/healthz").status_code == 200
        key = 'snapgen_requests_total{method="GET",route="/healthz",status="200"}'
        seen = set()
        for _ in range(6):  # scrapes land on either process; all must agree
            values = metric_values(client.get("/metrics").text)
            seen.add(values[key] - before.get(key, 0))
            assert values["snapgen_workers"] == 2 and values["snapgen_queue_up"] == 1
            assert {'snapgen_worker_heartbeat_timestamp_seconds{worker="w1"}',
                    'snapgen_worker_heartbeat_timestamp_seconds{worker="w2"}'} <= set(values)  # fmt: skip
            assert "snapgen_images_generated_total" not in values  # worker metrics live on the workers
        assert seen == {20}
    generated = sum(cluster.worker_metrics(name)["snapgen_images_generated_total"] for name in cluster.workers)
    assert generated >= 5


def test_redis_restart_loses_no_accepted_job(cluster):
    with cluster.client() as client:
        accepted = [submit(client, prompt=f"survivor {i}", steps=4) for i in range(4)]
        cluster.redis.stop(signal.SIGTERM)  # the AOF is fsynced on every write

        down = client.post("/v1/generate", json={"prompt": "x"})
        assert down.status_code == 503, down.text
        assert down.json()["error"]["code"] == "queue_unavailable" and down.headers["retry-after"] == "1"
        assert client.get(f"/v1/jobs/{accepted[0]}").status_code == 503
        assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200
        assert metric_values(client.get("/metrics").text)["snapgen_queue_up"] == 0

        cluster.redis.start()
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "the API to see Redis again", interval=0.1)
        for job_id in accepted:
            done = wait_job(client, job_id, finished, f"accepted job {job_id}")
            assert done["status"] == "succeeded", done
            assert done["result"]["data"][0]["b64_json"]
        assert client.post("/v1/generate", json={"prompt": "after the restart", "steps": 1}).status_code == 200


def test_worker_killed_mid_job_is_finished_by_another(cluster):
    with cluster.client() as client:
        job_id = submit(client, prompt="the worker dies", steps=20, n=2)
        running = wait_job(client, job_id, lambda b: b["status"] == "running" and b["progress"]["step"] >= 1,
                           "the job to start")  # fmt: skip
        assert running["progress"]["step"] < 20
        victim = cluster.job_hash(job_id)["worker"]
        survivor = next(name for name in cluster.workers if name != victim)
        killed_at = time.monotonic()
        cluster.workers[victim].stop(signal.SIGKILL)

        done = wait_job(client, job_id, finished, "the job to finish on the other worker", timeout=JOB_TIMEOUT)
        assert done["status"] == "succeeded" and len(done["result"]["data"]) == 2
        state = cluster.job_hash(job_id)
        assert state["worker"] == survivor and state["attempts"] == "2"
        assert time.monotonic() - killed_at >= 1.5  # reclaimed only after SNAPGEN_CLAIM_IDLE_S (2 s) of silence
        r = cluster.redis.client()
        assert sorted(r.keys(f"snapgen:img:{job_id}:*")) == [f"snapgen:img:{job_id}:{i}".encode() for i in range(2)]
        assert r.xpending("snapgen:jobs", "workers")["pending"] == 0 and r.xlen("snapgen:dead") == 0
        assert cluster.worker_metrics(survivor)["snapgen_jobs_redelivered_total"] >= 1
        # The result is the one a single clean run gives (same seeds).
        again = client.post("/v1/generate", json={**done["request"], "seed": done["request"]["seed"]}).json()
        assert [d["b64_json"] for d in again["data"]] == [d["b64_json"] for d in done["result"]["data"]]
        workers = json.loads(r.hget("snapgen:workers", survivor))
        assert workers["pid"] == cluster.workers[survivor].pid


def test_sigterm_hands_the_running_batch_back(cluster):
    [(name, proc)] = [(n, p) for n, p in cluster.workers.items() if p.alive()]
    with cluster.client() as client:
        job_id = submit(client, prompt="handed back", steps=50, n=4)
        wait_job(client, job_id, lambda b: b["status"] == "running" and b["progress"]["step"] >= 1, "the job to start")
        code = proc.stop(signal.SIGTERM, timeout=60)
        assert code == 0, proc.log_tail()
        assert "handing back 1 job(s)" in proc.log_tail()
        back = client.get(f"/v1/jobs/{job_id}").json()
        assert back["status"] == "queued" and back["progress"]["step"] == 0
        r = cluster.redis.client()
        assert r.xlen("snapgen:jobs") == 1 and r.xpending("snapgen:jobs", "workers")["pending"] == 0
        assert name.encode() not in r.hkeys("snapgen:workers")  # deregistered
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "no worker" in ready.json()["checks"]["model"]
