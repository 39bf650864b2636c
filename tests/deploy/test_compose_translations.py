"""compose_processes.py's translations of the CPU profile, as prepared before anything starts: each service's
command line, environment and Prometheus config differ from the file's only where a container differs from a
process (the list: compose_processes.py's docstring)."""

from __future__ import annotations

import yaml
from compose_processes import ROOT, ComposeStack, interpolation_env, resolve

SERVICES = ["api", "worker-cpu", "redis", "prometheus"]


def prepared(tmp_path) -> ComposeStack:
    model = resolve(ROOT / "docker-compose.yml", ["cpu"], interpolation_env(SNAPGEN_TORCH_THREADS="1"))
    stack = ComposeStack(model, tmp_path, services=SERVICES, scale={"worker-cpu": 2})
    for replicas in stack.replicas.values():
        for replica in replicas:
            stack._prepare(replica)
    return stack


def test_commands_and_environment(tmp_path):
    stack = prepared(tmp_path)
    redis_url = f"redis://127.0.0.1:{stack.port('redis', 6379)}/0"
    (api,) = stack.replicas["api"]
    assert api.argv[1:] == ["serve", "--redis", redis_url, "--host", "0.0.0.0", "--port", str(api.port(8000))]
    assert api.argv[0].endswith("/snapgen") and api.env["SNAPGEN_API_PROCESSES"] == "2"
    assert api.env["SNAPGEN_ALLOW_UNAUTHENTICATED"] == "true" and "SNAPGEN_PUBLIC_URL" not in api.env
    one, two = stack.replicas["worker-cpu"]
    assert one.port(9100) != two.port(9100)
    for worker in (one, two):
        assert worker.argv[1:] == ["worker", "--metrics-port", str(worker.port(9100))]
        assert worker.env["SNAPGEN_REDIS_URL"] == redis_url and worker.env["SNAPGEN_TORCH_THREADS"] == "1"
        assert "SNAPGEN_MODEL" not in worker.env  # passed through only when set: the embedded default model
    (redis,) = stack.replicas["redis"]
    assert redis.argv[1:] == ["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction",
                              "--port", str(redis.port(6379)), "--bind", "127.0.0.1"]  # fmt: skip
    assert redis.cwd.resolve() == (tmp_path / "volumes" / "redis-data").resolve()  # the image's WORKDIR /data
    (prometheus,) = stack.replicas["prometheus"]
    root = prometheus.root
    assert prometheus.argv[1:] == [f"--config.file={root}/etc/prometheus/prometheus.yml",
                                   f"--storage.tsdb.path={root}/prometheus", "--storage.tsdb.retention.time=15d",
                                   f"--web.listen-address=127.0.0.1:{prometheus.port(9090)}"]  # fmt: skip


def test_the_prometheus_config_keeps_all_but_its_targets(tmp_path):
    stack = prepared(tmp_path)
    (prometheus,) = stack.replicas["prometheus"]
    original = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    rewritten = yaml.safe_load((prometheus.root / "etc/prometheus/prometheus.yml").read_text())
    alerts = prometheus.root / "etc/prometheus/alerts.yml"
    assert alerts.read_text() == (ROOT / "deploy/prometheus/alerts.yml").read_text()  # the compose file's mount
    targets = {}
    for config in (original, rewritten):
        for job in config["scrape_configs"]:
            targets.setdefault(job["job_name"], []).append(
                sorted(t for s in job.pop("static_configs", []) for t in s["targets"])
            )
            job.pop("dns_sd_configs", None)
    assert rewritten == original  # global, rule_files, every job and its settings
    workers = sorted(f"127.0.0.1:{r.port(9100)}" for r in stack.replicas["worker-cpu"])
    assert targets["snapgen-api"][1] == [f"127.0.0.1:{stack.port('api', 8000)}"]
    assert targets["snapgen-worker"][1] == workers
