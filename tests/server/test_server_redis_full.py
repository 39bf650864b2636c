"""A Redis at its maxmemory (policy noeviction) and the retention caps, against real parts: redis-server,
`snapgen serve --redis` and one `snapgen worker` process. The tests share the cluster and run in order.
"""

from __future__ import annotations

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
    clean_env,
    fill_redis,
    finished,
    free_port,
    metric_values,
    snapgen,
    wait_job,
    wait_until,
)

ASYNC = {"Prefer": "respond-async"}
MAX_JOBS = 3


@dataclass
class Cluster:
    redis: RedisServer
    api: Server
    worker: Proc

    def ready(self) -> bool:
        return httpx.get(f"{self.api.url}/readyz", timeout=5).status_code == 200

    def room_again(self) -> None:
        r = self.redis.client()
        r.config_set("maxmemory", "0")
        for pattern in ("filler:*", "data:*"):
            keys = r.keys(pattern)
            if keys:
                r.delete(*keys)
        wait_until(self.ready, 60, "the API to be ready again", interval=0.1)


@pytest.fixture(scope="module")
def cluster(tiny_model, log_dir, tmp_path_factory):
    redis = RedisServer(log_dir, tmp_path_factory.mktemp("redis-full-data")).start()
    limits = {"SNAPGEN_RESULT_MAX_JOBS": str(MAX_JOBS), "SNAPGEN_REDIS_HIGH_WATER": "0.9"}
    port = free_port()
    api = Proc("api-full", snapgen("serve", "--redis", redis.url, "--port", str(port)), clean_env(**limits),
               log_dir).start()  # fmt: skip
    worker_env = clean_env(SNAPGEN_HEARTBEAT_S="0.5", SNAPGEN_CLAIM_IDLE_S="60", **limits)
    args = snapgen("worker", "--redis", redis.url, "--model", str(tiny_model), "--name", "wf", "--threads", "1")
    worker = Proc("worker-full", args, worker_env, log_dir).start()
    server = Server(api, port)
    cluster = Cluster(redis, server, worker)
    try:

        def up():
            for proc in (api, worker):
                if not proc.alive():
                    raise AssertionError(f"{proc.name} exited:\n{proc.log_tail()}")
            return cluster.ready()

        wait_until(up, STARTUP_TIMEOUT, "the API and the worker", interval=0.2)
        yield cluster
    finally:
        for proc in (worker, api):
            proc.stop(signal.SIGTERM, timeout=30)
        redis.stop()


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "queue_unavailable" and int(response.headers["retry-after"]) >= 1


def test_new_jobs_are_refused_before_redis_is_full(cluster):
    r = cluster.redis.client()
    for i in range(1000):  # some data (small values: no large buffers), so that 5 % of it is room enough
        r.set(f"data:{i}", b"d" * 10_000)
    r.config_set("maxmemory", str(int(int(r.info("memory")["used_memory"]) / 0.95)))  # 95 % used
    with httpx.Client(base_url=cluster.api.url, timeout=JOB_TIMEOUT) as client:
        time.sleep(1.0)  # the API looks at Redis's memory at most every half second
        assert_refused(client.post("/v1/generate", json={"prompt": "x"}))
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "full" in ready.json()["checks"]["queue"], ready.text
        assert r.set("data:still-writable", b"1")  # Redis itself still takes writes: there is room for results
        cluster.room_again()
        assert client.post("/v1/generate", json={"prompt": "room again", "steps": 1}).status_code == 200


def test_a_worker_keeps_its_result_while_redis_is_full_and_stores_it_when_room_comes_back(cluster):
    r = cluster.redis.client()
    with httpx.Client(base_url=cluster.api.url, timeout=JOB_TIMEOUT) as client:
        response = client.post("/v1/generate", json={"prompt": "stored later", "steps": 50, "n": 8}, headers=ASYNC)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        wait_job(client, job_id, lambda b: b["status"] == "running" and b["progress"]["step"] >= 1, "the job to start")
        fill_redis(r)
        wait_until(lambda: "while storing a result" in cluster.worker.log_tail(400), JOB_TIMEOUT,
                   "the worker to be refused storing its result")  # fmt: skip
        time.sleep(1.0)  # a few refused retries later
        assert cluster.worker.alive(), cluster.worker.log_tail()
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        assert_refused(client.post("/v1/generate", json={"prompt": "x"}))
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "full" in ready.json()["checks"]["queue"], ready.text

        cluster.room_again()
        done = wait_job(client, job_id, finished, "the stored result")
        assert done["status"] == "succeeded" and len(done["result"]["data"]) == 8, done
        assert all(d["b64_json"] for d in done["result"]["data"])
        assert cluster.worker.alive() and "Traceback" not in cluster.worker.log_tail(400)
        assert client.post("/v1/generate", json={"prompt": "after", "steps": 1}).status_code == 200


def test_finished_jobs_beyond_the_cap_are_evicted_oldest_first(cluster):
    with httpx.Client(base_url=cluster.api.url, timeout=JOB_TIMEOUT) as client:
        before = metric_values(client.get("/metrics").text).get("snapgen_results_evicted_total", 0)
        ids = []
        for i in range(MAX_JOBS + 3):
            response = client.post("/v1/generate", json={"prompt": f"evict {i}", "steps": 1}, headers=ASYNC)
            ids.append(response.json()["id"])
            client.delete(f"/v1/jobs/{ids[-1]}")  # canceled at once, or (if already running) at its next step
            wait_job(client, ids[-1], finished, f"job {i}")
        codes = [client.get(f"/v1/jobs/{job_id}").status_code for job_id in ids]
        assert codes == [404] * 3 + [200] * MAX_JOBS
        values = metric_values(client.get("/metrics").text)
        assert values["snapgen_results_retained"] == MAX_JOBS
        assert values["snapgen_results_evicted_total"] >= before + 3
        keys = cluster.redis.client().keys("snapgen:job:*")
        assert {k.decode().rsplit(":", 1)[1] for k in keys} == set(ids[3:])
