"""The Grafana dashboard against what runs: no panel empty by design, in the cpu profile or the gpu one.

Statically: every metric a panel queries is one that server/metrics.py exports or one documented by the
exporter that runs beside it (Triton, NVIDIA's DCGM exporter), every panel has a query on what runs in
every profile, the gpu profile runs the DCGM exporter that the GPU query and the `dcgm` scrape job need,
and no scrape target is down by design. Live: the cpu-profile topology (redis-server, `snapgen serve
--redis`, a `snapgen worker` with its /metrics, Prometheus with deploy/prometheus/prometheus.yml) serves
generations, and every panel's queries are evaluated by that Prometheus.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "server"))

import validate_deploy as vd  # noqa: E402
from server_harness import Proc, RedisServer, Server, clean_env, free_port, snapgen, wait_until  # noqa: E402

DASHBOARD = vd.DASHBOARD_DIR / "snapgen.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
# Jobs of services that run only in some profiles (found by DNS, so absent ones have no target).
PROFILE_JOBS = {"triton": ["triton"], "dcgm": ["dcgm-exporter"]}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out += panels(panel) if panel.get("type") == "row" else [panel]
    return out


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    import compose

    return [str(Path(compose.__file__).parent / "docker-compose")]


# ------------------------------------------------------------------------------------------- static
def test_a_panel_on_triton_or_dcgm_alone_is_refused(tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    dash["panels"].append({"type": "timeseries", "title": "GPU only", "targets": [
        {"expr": "avg(DCGM_FI_DEV_GPU_UTIL)"}, {"expr": "100 * avg(nv_gpu_utilization)"}]})  # fmt: skip
    dash["panels"].append({"type": "timeseries", "title": "typo", "targets": [{"expr": "avg(DCGM_FI_DEV_GPU_UTILS)"}]})
    path = tmp_path / "d.json"
    path.write_text(json.dumps(dash))
    problems, _ = vd.check_dashboards([path], vd.exported_metrics())
    assert len(problems) == 2, problems
    assert "panel 'GPU only' queries only DCGM_FI_DEV_GPU_UTIL, nv_gpu_utilization: empty" in problems[1]
    assert "DCGM_FI_DEV_GPU_UTILS is not exported" in problems[0]  # an exporter's metric is named, not a prefix
    assert vd.check_dashboards([DASHBOARD], vd.exported_metrics())[0] == []


def test_the_gpu_panel_queries_what_each_profile_runs():
    (gpu,) = [p for p in panels(json.loads(DASHBOARD.read_text())) if p["title"].startswith("Worker utilization")]
    exprs = " ".join(t["expr"] for t in gpu["targets"])
    assert "DCGM_FI_DEV_GPU_UTIL" in exprs  # gpu profile: the dcgm-exporter service
    assert "nv_gpu_utilization" in exprs  # profile triton
    assert 'process_cpu_seconds_total{job="snapgen-worker"}' in exprs  # every profile: the workers' CPU


def test_gpu_profile_runs_the_dcgm_exporter_prometheus_scrapes(compose_cmd):
    gpu, cpu = vd.compose_config(compose_cmd, []), vd.compose_config(compose_cmd, ["cpu"])
    exporter = gpu["services"]["dcgm-exporter"]
    image, tag = exporter["image"].rsplit(":", 1)
    assert image == "nvcr.io/nvidia/k8s/dcgm-exporter" and tag[0].isdigit()  # a release, not `latest`
    assert vd._gpu_devices(exporter)[0]["count"] == -1  # `count: all`: every GPU of the host
    assert "/health" in vd._healthcheck_text(exporter) and "9400" in vd._healthcheck_text(exporter)
    assert "dcgm-exporter" not in cpu["services"]
    jobs = {j["job_name"]: j for j in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]}
    for job, names in PROFILE_JOBS.items():
        assert [n for sd in jobs[job]["dns_sd_configs"] for n in sd["names"]] == names
    assert jobs["dcgm"]["dns_sd_configs"][0]["port"] == 9400  # the exporter's default listen address


def test_scrape_target_check_catches_a_target_down_by_design(compose_cmd):
    configs = {"gpu": vd.compose_config(compose_cmd, []), "cpu": vd.compose_config(compose_cmd, ["cpu"]),
               "gpu+triton": vd.compose_config(compose_cmd, ["gpu", "triton"]),
               "gpu-pinning": vd.compose_config(compose_cmd, [], ("deploy/compose.gpu-pinning.yml",))}  # fmt: skip
    prometheus = yaml.safe_load(PROMETHEUS_YML.read_text())
    assert vd.check_scrape_targets(prometheus, configs) == []
    broken = copy.deepcopy(prometheus)
    dcgm = next(j for j in broken["scrape_configs"] if j["job_name"] == "dcgm")
    del dcgm["dns_sd_configs"]
    dcgm["static_configs"] = [{"targets": ["dcgm-exporter:9400"]}]
    broken["scrape_configs"].append({"job_name": "x", "dns_sd_configs": [{"names": ["nope"], "type": "A", "port": 1}]})
    problems = vd.check_scrape_targets(broken, configs)
    assert any("static target dcgm-exporter:9400 is down whenever dcgm-exporter does not run (cpu)" in p
               for p in problems), problems  # fmt: skip
    assert any("nope is not a service" in p for p in problems), problems


# --------------------------------------------------------------------------------------------- live
def prometheus_config(api: str, worker: str) -> dict:
    """deploy/prometheus/prometheus.yml for processes on this host: the api's static target and the worker
    DNS job point at the started processes; the profile-only jobs (no such service here, so no target in
    the cpu profile either) are left out. Scraped every second so that a short test sees rates."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] in PROFILE_JOBS:
            assert "static_configs" not in job, f"{job['job_name']}: a static target is down in the cpu profile"
            continue
        if job["job_name"] == "snapgen-api":
            assert job["static_configs"] == [{"targets": ["api:8000"]}]
            job["static_configs"] = [{"targets": [api]}]
        elif job["job_name"] == "snapgen-worker":
            assert "worker-cpu" in job.pop("dns_sd_configs")[0]["names"]
            job["static_configs"] = [{"targets": [worker]}]
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


@pytest.fixture(scope="module")
def cpu_stack(tiny_model, tmp_path_factory):
    """redis, the API (`serve --redis`), one worker with --metrics-port, Prometheus scraping both."""
    prometheus_bin = shutil.which("prometheus")
    if prometheus_bin is None:
        pytest.fail("prometheus is not installed: bash scripts/system-deps.sh")
    work = tmp_path_factory.mktemp("cpu-stack")
    redis = RedisServer(work, work / "redis").start()
    api_port, metrics_port, prom_port = free_port(), free_port(), free_port()
    api = Proc("api", snapgen("serve", "--redis", redis.url, "--port", str(api_port)), clean_env(), work).start()
    worker = Proc("worker", snapgen("worker", "--redis", redis.url, "--model", str(tiny_model), "--threads", "1",
                                    "--metrics-port", str(metrics_port)), clean_env(), work).start()  # fmt: skip
    config = work / "prometheus.yml"
    translated = prometheus_config(f"127.0.0.1:{api_port}", f"127.0.0.1:{metrics_port}")
    config.write_text(yaml.safe_dump(translated))
    for rules in translated.get("rule_files") or []:  # relative to the config file, as in the container
        shutil.copy(PROMETHEUS_YML.parent / rules, work / rules)
    prom = Proc("prometheus", [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{prom_port}"], clean_env(), work).start()  # fmt: skip
    procs = [prom, worker, api, redis]
    try:
        Server(api, api_port).wait_ready()  # ready = Redis answers and the worker has warmed up
        yield f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{prom_port}"
    finally:
        for proc in procs:
            proc.stop(signal.SIGTERM, timeout=30)


def query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "success", (expr, r.text)
    return r.json()["data"]["result"]


def finite(result: list[dict]) -> list[float]:
    return [v for v in (float(s["value"][1]) for s in result) if math.isfinite(v)]


def test_every_panel_shows_data_in_the_cpu_profile(cpu_stack):
    api, prom = cpu_stack

    def targets_up():
        active = httpx.get(f"{prom}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return active if len(active) == 2 and all(t["health"] == "up" for t in active) else None

    active = wait_until(targets_up, 60, "Prometheus to scrape the api and the worker", interval=0.5)
    assert {t["labels"]["job"] for t in active} == {"snapgen-api", "snapgen-worker"}

    def scraped(images: int):
        wait_until(lambda: [v for v in finite(query(prom, "sum(snapgen_images_generated_total)")) if v >= images],
                   30, f"Prometheus to scrape {images} images from the worker", interval=0.5)  # fmt: skip
        time.sleep(1.5)  # and the api's counters, on their own schedule

    # Two rounds: a labelled series (route, stage, status) is born with its first value, so a rate needs a
    # second round after Prometheus has seen the first.
    with httpx.Client(base_url=api, timeout=120) as client:
        for round_ in ((1,), (2, 1)):
            for n in round_:
                r = client.post("/v1/generate", json={"prompt": "a red circle", "n": n, "steps": 2})
                assert r.status_code == 200, r.text
            assert client.get("/v1/models").status_code == 200
            scraped(1 if len(round_) == 1 else 4)

    empty_by_profile, report = [], []
    for panel in panels(json.loads(DASHBOARD.read_text())):
        panel_values = []
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "5m")
            values = finite(query(prom, expr))
            panel_values += values
            names = vd.promql_metric_names(target["expr"])
            report.append(f"{panel['title']} / {target['refId']}: {len(values)} series")
            if not values:
                # Only what runs in another profile may be missing here.
                assert names <= vd.EXTERNAL_METRICS.keys(), f"{panel['title']}: no data for {expr}"
                empty_by_profile.append(expr)
        assert panel_values, f"panel {panel['title']!r} is empty in the cpu profile"
    print("\n".join(report))
    assert all(("nv_" in e or "DCGM_" in e) for e in empty_by_profile) and len(empty_by_profile) == 5, empty_by_profile
