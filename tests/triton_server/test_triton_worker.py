"""The Triton worker backend end to end, against real parts: the nvidia-pytriton `tritonserver` serving the
python-backend repository, redis-server, `snapgen serve --redis` and `snapgen worker --backend triton`.

Triton runs with explicit model control so that a test can unload a model; the last test stops Triton
and starts it again, so the order matters.
"""

from __future__ import annotations

import base64
import re
import signal
from dataclasses import dataclass

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
    snapgen,
    wait_job,
    wait_until,
)

from triton_export.server import TritonServer

# Three python-backend stubs each import torch, diffusers and transformers: on two cores shared with other work
# that can take minutes. A passing run waits only as long as it needs.
TRITON_STARTUP_TIMEOUT = 900.0

PROMPT = "a red circle to the left of a blue square"
ASYNC = {"Prefer": "respond-async"}
MODELS = ("snapgen_text_encoder", "snapgen_unet", "snapgen_decoder")


@pytest.fixture(scope="module")
def triton(python_repo, log_dir):
    server = TritonServer(
        python_repo,
        log_path=log_dir / "triton-python.log",
        env=clean_env(SNAPGEN_TORCH_THREADS="1"),
        extra_args=["--model-control-mode=explicit", "--load-model=*"],
    )
    try:
        server.start(timeout=TRITON_STARTUP_TIMEOUT)
        yield server
    finally:
        server.close()


@dataclass
class Cluster:
    redis: RedisServer
    api: Server
    worker: Proc
    triton: TritonServer

    def client(self) -> httpx.Client:
        return self.api.client()

    def job_hash(self, job_id: str) -> dict[str, str]:
        raw = self.redis.client().hgetall(f"snapgen:job:{job_id}")
        return {k.decode(): v.decode() for k, v in raw.items()}

    def readyz(self) -> httpx.Response:
        return httpx.get(f"{self.api.url}/readyz", timeout=10)

    def triton_client(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.triton.grpc_url.removeprefix("grpc://"))


@pytest.fixture(scope="module")
def cluster(tiny_model, triton, log_dir, tmp_path_factory):
    redis = RedisServer(log_dir, tmp_path_factory.mktemp("triton-redis")).start()
    port = free_port()
    api = Proc("triton-api", snapgen("serve", "--redis", redis.url, "--port", str(port)), clean_env(), log_dir).start()
    worker_env = clean_env(SNAPGEN_HEARTBEAT_S="0.5", SNAPGEN_CLAIM_IDLE_S="120", SNAPGEN_MAX_DELIVERIES="3")
    args = snapgen("worker", "--redis", redis.url, "--model", str(tiny_model), "--backend", "triton",
                   "--triton-url", triton.grpc_url, "--name", "tw1", "--threads", "1")  # fmt: skip
    worker = Proc("triton-worker", args, worker_env, log_dir).start()
    server = Server(api, port)
    try:

        def worker_ready():
            for proc in (api, worker):
                if not proc.alive():
                    raise AssertionError(f"{proc.name} exited:\n{proc.log_tail()}")
            body = httpx.get(f"{server.url}/readyz", timeout=5).json()
            return body["status"] == "ready" and body["checks"]["model"] == "ok (1 worker(s))"

        wait_until(worker_ready, STARTUP_TIMEOUT, "the API and the Triton worker", interval=0.2)
        yield Cluster(redis, server, worker, triton)
    finally:
        for proc in (worker, api):
            proc.stop(signal.SIGTERM, timeout=30)
        redis.stop()


def test_triton_parsed_the_exported_configs(cluster):
    client = cluster.triton_client()
    for name in MODELS:
        assert client.is_model_ready(name)
        config = client.get_model_config(name, as_json=True)["config"]
        assert config["backend"] == "python" and config["max_batch_size"] == 16
        assert config["instance_group"][0]["kind"] == "KIND_CPU" and "dynamic_batching" in config
    unet = client.get_model_config("snapgen_unet", as_json=True)["config"]
    inputs = {i["name"]: (i["data_type"], i["dims"]) for i in unet["input"]}
    assert inputs["sample"] == ("TYPE_FP32", ["4", "-1", "-1"])
    assert inputs["encoder_attention_mask"] == ("TYPE_BOOL", ["32"])
    assert unet["parameters"]["snapgen_component"]["string_value"] == "unet"


def test_images_equal_the_in_process_pipeline(cluster, reference_pngs):
    """Same prompt, seed and steps: the PNG bytes of `snapgen generate`, also with guidance and n=2."""
    with cluster.client() as client:
        raw = client.post("/v1/generate", json={"prompt": PROMPT, "seed": 3, "steps": 2},
                          headers={"Accept": "image/png"})  # fmt: skip
        assert raw.status_code == 200, raw.text
        assert raw.content == reference_pngs(PROMPT, seed=3, steps=2)[0]
        body = {"prompt": PROMPT, "seed": 11, "steps": 3, "n": 2, "guidance_scale": 3.0}
        guided = client.post("/v1/generate", json=body)
        assert guided.status_code == 200, guided.text
        got = [base64.b64decode(d["b64_json"]) for d in guided.json()["data"]]
        assert got == reference_pngs(PROMPT, seed=11, steps=3, n=2, guidance=3.0)
        [card] = client.get("/v1/models").json()["data"]
        assert card["id"] == "tiny" and card["workers"] == 1


def triton_counters(text: str, name: str) -> dict[str, float]:
    """model -> value of one of Triton's per-model counters, from its Prometheus text (version 1)."""
    found = re.findall(rf'^{name}{{model="(\w+)",version="1"}} (\S+)$', text, flags=re.M)
    return {model: float(value) for model, value in found}


def test_triton_metrics_count_the_calls(cluster):
    text = httpx.get(cluster.triton.metrics_url, timeout=10).text
    success = triton_counters(text, "nv_inference_request_success")
    # Warm-up (1 step) + the two requests above (2 steps; 3 steps with guidance: one batched call per step).
    assert success["snapgen_unet"] >= 1 + 2 + 3, text
    assert success["snapgen_decoder"] >= 3 and success["snapgen_text_encoder"] >= 1 + 1 + 2
    assert triton_counters(text, "nv_inference_exec_count")["snapgen_unet"] >= 1
    assert not re.search(r'^nv_inference_request_failure{model="snapgen_\w+",reason="\w+",version="1"} [1-9]',
                         text, flags=re.M)  # fmt: skip


def test_a_repository_of_another_model_is_refused(cluster, tiny_model, tmp_path):
    """The worker's --model must be the exported directory: another model's sizes or sampler would be wrong."""
    import json
    import shutil

    from server.triton_backend import TritonBackend, TritonRepositoryMismatch
    from snapgen.request import ResolvedRequest

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    index = json.loads((other / "model_index.json").read_text())
    index["resolutions"] = [[128, 128], [128, 64]]
    (other / "model_index.json").write_text(json.dumps(index))
    backend = TritonBackend(other, cluster.triton.grpc_url)
    assert backend.health() is None
    with pytest.raises(TritonRepositoryMismatch, match="model snapgen_text_encoder was not exported from this model"):
        backend.generate(ResolvedRequest(("a red circle",), ("",), (0,), 1, 1.0, 128, 128))


def test_an_unloaded_model_is_reported_and_jobs_wait(cluster, reference_pngs):
    """The idle worker's heartbeat notices; /readyz says why; a job submitted meanwhile waits, then runs."""
    client = cluster.triton_client()
    client.unload_model("snapgen_unet")
    reason = f"triton at {cluster.triton.grpc_url}: model snapgen_unet not ready"

    def not_ready():
        response = cluster.readyz()
        return response.status_code == 503 and reason in response.json()["error"]["message"] and response

    response = wait_until(not_ready, 60, "/readyz to report the unloaded model")
    assert response.json()["checks"]["model"] == f"no worker is ready: tw1: {reason}"
    with cluster.client() as api:
        submitted = api.post("/v1/generate", json={"prompt": PROMPT, "seed": 5, "steps": 2}, headers=ASYNC)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        wait_until(lambda: cluster.job_hash(job_id).get("status") == "queued", 10, "the job to be queued")
        client.load_model("snapgen_unet", client_timeout=TRITON_STARTUP_TIMEOUT)
        done = wait_job(api, job_id, finished, "the job after the model came back", timeout=STARTUP_TIMEOUT)
        assert done["status"] == "succeeded", done
        assert cluster.job_hash(job_id)["attempts"] == "1"  # it waited instead of running into the outage
        image = api.get(f"/v1/images/{job_id}/0.png")
        assert image.content == reference_pngs(PROMPT, seed=5, steps=2)[0]
    wait_until(lambda: cluster.readyz().status_code == 200, 30, "/readyz to be ready again")


def test_a_stopped_triton_hands_the_running_job_back(cluster, reference_pngs):
    """Triton stops mid-job: the job goes back to the queue (not failed), /readyz says why, and it runs again."""
    with cluster.client() as api:
        submitted = api.post("/v1/generate", json={"prompt": PROMPT, "seed": 8, "steps": 50}, headers=ASYNC)
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        wait_job(api, job_id, lambda b: b["status"] == "running" and b["progress"]["step"] >= 1, "the job to run")
        cluster.triton.stop()
        prefix = f"triton at {cluster.triton.grpc_url}: "

        def not_ready():
            response = cluster.readyz()
            return response.status_code == 503 and prefix in response.json()["error"]["message"] and response

        message = wait_until(not_ready, 60, "/readyz to report the stopped Triton").json()["error"]["message"]
        assert "unreachable" in message or "not live" in message or "not ready" in message, message
        job = cluster.job_hash(job_id)
        assert job["status"] == "queued" and job["attempts"] == "1" and not job.get("error"), job

        cluster.triton.start(timeout=TRITON_STARTUP_TIMEOUT)  # the same ports
        done = wait_job(api, job_id, finished, "the handed-back job", timeout=STARTUP_TIMEOUT)
        assert done["status"] == "succeeded", done
        assert cluster.job_hash(job_id)["attempts"] == "2"
        assert api.get(f"/v1/images/{job_id}/0.png").content == reference_pngs(PROMPT, seed=8, steps=50)[0]
    wait_until(lambda: cluster.readyz().status_code == 200, 30, "/readyz to be ready again")
    assert "handed back" in cluster.worker.log_tail(200)
