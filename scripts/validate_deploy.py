"""Checks of the self-hosting files that need no Docker engine and no cluster (run by validate-deploy.sh).

    python scripts/validate_deploy.py compose --compose-cmd "docker compose"   # the compose file's invariants
    python scripts/validate_deploy.py dashboard [--rules-out FILE]           # Grafana queries name real metrics
    python scripts/validate_deploy.py k8s                                     # cross-references + KEDA trigger

Each prints what it checked and exits 1 with one line per problem. The functions are imported by
tests/test_deploy.py, which also feeds them broken inputs.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
K8S_DIR = ROOT / "deploy" / "k8s"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"

# Metrics the dashboard may name that snapgen does not export, each documented by its exporter:
# NVIDIA Triton's (docs/user_guide/metrics.md of triton-inference-server/server), the DCGM exporter's
# default fields (etc/default-counters.csv of NVIDIA/dcgm-exporter 4.5.3-4.8.2, the compose image), and
# Prometheus's own per-target `up`.
EXTERNAL_METRICS = {
    "nv_inference_request_success": "triton", "nv_inference_request_failure": "triton",
    "nv_inference_count": "triton", "nv_inference_exec_count": "triton", "nv_gpu_utilization": "triton",
    "nv_gpu_memory_used_bytes": "triton", "nv_gpu_memory_total_bytes": "triton", "nv_gpu_power_usage": "triton",
    "DCGM_FI_DEV_GPU_UTIL": "dcgm", "DCGM_FI_DEV_FB_USED": "dcgm", "DCGM_FI_DEV_FB_FREE": "dcgm",
    "DCGM_FI_DEV_POWER_USAGE": "dcgm", "DCGM_FI_DEV_GPU_TEMP": "dcgm",
    "up": "prometheus",
}  # fmt: skip


# --------------------------------------------------------------------------- exported metric names
def exported_metrics() -> set[str]:
    """Every sample name server/metrics.py can expose (API, workers and the queue-wide gauges), and the
    process_* family prometheus-client adds to every worker's /metrics."""
    sys.path.insert(0, str(ROOT))
    from prometheus_client import REGISTRY

    from server import metrics

    metrics.worker_metrics()  # created lazily; registers the worker families
    families = []
    for collector in list(REGISTRY._collector_to_names):  # the registered collectors
        families.extend(collector.describe() if hasattr(collector, "describe") else collector.collect())

    from server.queue import QueueStats

    snapshot = QueueStats(queued=0, running=0, workers={"w": {"ts": 0}}, model=None)  # lists the queue-wide gauges
    families.extend(metrics._Snapshot(snapshot, True).collect())
    names: set[str] = set()
    for family in families:
        if not family.name.startswith(("snapgen_", "process_")):
            continue  # python_*/gc_*: not worth a chart; process_* (CPU, memory) is on every worker's /metrics
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif family.type == "summary":
            names |= {family.name, family.name + "_sum", family.name + "_count"}
        else:
            names.add(family.name)
    return names


# ------------------------------------------------------------------------------ PromQL metric names
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan", "atan2",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\$\{?\w+\}?", "1m", s)  # Grafana variables ($__rate_interval, ${var})
    names = set(re.findall(r'\{[^}]*__name__\s*=\s*"([^"]+)"', expr))
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    for match in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)", s):
        word = match.group(1)
        rest = s[match.end() :].lstrip()
        if rest.startswith("("):
            continue  # a function (rate, sum, histogram_quantile, ...)
        if word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows' nested panels included."""
    data = json.loads(path.read_text())
    out = []

    def walk(panels):
        for panel in panels or []:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels"))

    walk(data.get("panels"))
    return out


def check_dashboards(paths: list[Path], known: set[str]) -> tuple[list[str], list[str]]:
    """Problems, and every query (for a promtool syntax check)."""
    problems, exprs = [], []
    if not paths:
        problems.append(f"no dashboard JSON under {DASHBOARD_DIR}")
    for path in paths:
        queries = dashboard_queries(path)
        if not queries:
            problems.append(f"{path.name}: no queries")
        for title, expr in queries:
            exprs.append(expr)
            names = promql_metric_names(expr)
            if not names:
                problems.append(f"{path.name}: panel {title!r}: no metric in {expr!r}")
            for name in sorted(names):
                if name not in known and name not in EXTERNAL_METRICS:
                    problems.append(
                        f"{path.name}: panel {title!r}: {name} is not exported by server/metrics.py "
                        "nor a documented Triton / DCGM exporter metric"
                    )
        # Triton and the DCGM exporter run in some profiles only: a panel needs a query on what always runs.
        by_panel: dict[str, set[str]] = {}
        for title, expr in queries:
            by_panel.setdefault(title, set()).update(promql_metric_names(expr))
        for title, names in by_panel.items():
            if names and names <= EXTERNAL_METRICS.keys():
                problems.append(
                    f"{path.name}: panel {title!r} queries only {', '.join(sorted(names))}: empty without "
                    "Triton / the DCGM exporter (the cpu profile); add a query on snapgen's own metrics"
                )
    return problems, exprs


def write_rules_file(exprs: list[str], out: Path) -> None:
    """The queries as recording rules, so `promtool check rules` parses every one of them."""
    rules = [
        {"record": f"snapgen_dashboard:query{i}", "expr": re.sub(r"\$__rate_interval|\$__interval", "5m", e)}
        for i, e in enumerate(exprs)
    ]
    out.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, sort_keys=False))


# ------------------------------------------------------------------------------------------ compose
def compose_config(compose_cmd: list[str], profiles: list[str], extra_files: tuple[str, ...] = ()) -> dict:
    args = [*compose_cmd, "-f", str(ROOT / "docker-compose.yml")]
    for f in extra_files:
        args += ["-f", str(ROOT / f)]
    for p in profiles:
        args += ["--profile", p]
    out = subprocess.run([*args, "config", "--format", "json"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} config failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def _gpu_devices(service: dict) -> list[dict]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])]


def _healthcheck_text(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return " ".join(test) if isinstance(test, list) else str(test)


def check_compose(default: dict, cpu: dict, full: dict) -> list[str]:
    """Invariants of the three configurations: default (gpu), --profile cpu, --profile gpu --profile triton."""
    problems = []
    svc, cpu_svc, full_svc = default.get("services", {}), cpu.get("services", {}), full.get("services", {})
    for name in ("api", "worker", "redis", "prometheus", "grafana"):
        if name not in svc:
            problems.append(f"default profile: service {name} is missing")
    if "triton" in svc:
        problems.append("default profile: triton must be behind the `triton` profile")
    if "triton" not in full_svc:
        problems.append("--profile triton: no triton service")
    for name in ("api", "worker-cpu", "redis", "prometheus", "grafana"):
        if name not in cpu_svc:
            problems.append(f"cpu profile: service {name} is missing")
    for name, s in cpu_svc.items():
        if _gpu_devices(s):
            problems.append(f"cpu profile: service {name} reserves a GPU")
    worker = svc.get("worker", {})
    if worker and (not _gpu_devices(worker) or _gpu_devices(worker)[0].get("count") not in (1, "1")):
        problems.append("worker: needs deploy.resources.reservations.devices [{driver: nvidia, count: 1, gpu}]")
    for config_name, services in (("default", svc), ("cpu", cpu_svc), ("gpu+triton", full_svc)):
        for name in ("worker", "worker-cpu"):
            s = services.get(name)
            if s is None:
                continue
            if s.get("container_name"):
                problems.append(f"{config_name}: {name}: container_name prevents --scale")
            if s.get("ports"):
                problems.append(f"{config_name}: {name}: published ports prevent --scale")
            if "9100" not in " ".join(s.get("command") or []):
                problems.append(f"{config_name}: {name}: no --metrics-port 9100 (Prometheus scrapes workers there)")
    dcgm = svc.get("dcgm-exporter")
    if dcgm is None:
        problems.append("default (gpu) profile: no dcgm-exporter (the dashboard's GPU utilization comes from it)")
    elif not _gpu_devices(dcgm) or _gpu_devices(dcgm)[0].get("count") not in ("all", -1):
        problems.append("dcgm-exporter: needs deploy.resources.reservations.devices [{driver: nvidia, count: all}]")
    triton = full_svc.get("triton", {})
    if triton and not _gpu_devices(triton):
        problems.append("triton: reserves no GPU")
    if triton and not str(triton.get("image", "")).startswith("nvcr.io/nvidia/tritonserver:"):
        problems.append("triton: not NVIDIA's tritonserver image")
    redis = svc.get("redis", {})
    command = " ".join(redis.get("command") or [])
    if "--appendonly yes" not in command:
        problems.append("redis: persistence off (needs --appendonly yes)")
    if not any(v.get("target") == "/data" and v.get("type") == "volume" for v in redis.get("volumes") or []):
        problems.append("redis: /data is not on a named volume")
    expected_health = {
        "api": "/readyz",
        "redis": "redis-cli ping",
        "triton": "/v2/health/ready",
    }
    if dcgm is not None:
        expected_health["dcgm-exporter"] = "/health"
    for name, needle in expected_health.items():
        s = full_svc.get(name) or svc.get(name) or {}
        if needle not in _healthcheck_text(s):
            problems.append(f"{name}: healthcheck should use {needle}")
    for config_name, services in (("default", svc), ("cpu", cpu_svc), ("gpu+triton", full_svc)):
        for name, s in services.items():
            for dep, cond in (s.get("depends_on") or {}).items():
                if dep not in services:
                    problems.append(f"{config_name}: {name} depends on {dep}, which is not in this profile")
                elif cond.get("condition") == "service_healthy" and not services[dep].get("healthcheck"):
                    problems.append(f"{config_name}: {name} waits for {dep} to be healthy but {dep} has no healthcheck")
        for name in ("api", "worker", "worker-cpu"):
            if (
                name in services
                and (services[name].get("depends_on") or {}).get("redis", {}).get("condition") != "service_healthy"
            ):
                problems.append(f"{config_name}: {name} should depend on redis with condition service_healthy")
    return problems


def check_scrape_targets(prometheus: dict, configs: dict[str, dict]) -> list[str]:
    """No scrape target that is down by design: a static target must be a service of every configuration
    (profile set), and each name a DNS job looks up must be a service of at least one (a name the
    running stack lacks then gives no target at all, rather than one that is always down)."""
    problems = []
    everywhere = set.intersection(*(set(c.get("services", {})) for c in configs.values()))
    anywhere = set.union(*(set(c.get("services", {})) for c in configs.values()))
    for job in prometheus.get("scrape_configs") or []:
        name = job.get("job_name", "?")
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                host = target.rsplit(":", 1)[0]
                missing = [c for c, config in configs.items() if host not in config.get("services", {})]
                if host not in everywhere:
                    problems.append(f"job {name}: static target {target} is down whenever {host} does not run "
                                    f"({', '.join(missing)}); use dns_sd_configs")  # fmt: skip
        for dns in job.get("dns_sd_configs") or []:
            for host in dns.get("names") or []:
                if host not in anywhere:
                    problems.append(f"job {name}: {host} is not a service of any configuration")
    return problems


# ---------------------------------------------------------------------------------------- kubernetes
def load_manifests(directory: Path = K8S_DIR) -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}


def _matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_k8s(docs: list[tuple[str, dict]]) -> list[str]:
    """What JSON schemas cannot see: references between objects, and the KEDA ScaledObject (a CRD)."""
    problems = []
    by_kind: dict[str, dict[str, dict]] = {}
    for file, doc in docs:
        meta = doc.get("metadata") or {}
        if not doc.get("apiVersion") or not doc.get("kind") or not meta.get("name"):
            problems.append(f"{file}: an object without apiVersion, kind or metadata.name")
            continue
        by_kind.setdefault(doc["kind"], {})[meta["name"]] = doc
        if doc["kind"] != "Namespace" and meta.get("namespace") != "snapgen":
            problems.append(f"{file}: {doc['kind']}/{meta['name']} is not in namespace snapgen")
    configmaps, secrets = by_kind.get("ConfigMap", {}), by_kind.get("Secret", {})
    pvcs = by_kind.get("PersistentVolumeClaim", {})
    workloads = {(k, n): d for k in _WORKLOADS for n, d in by_kind.get(k, {}).items()}
    for (kind, name), doc in workloads.items():
        spec = doc.get("spec") or {}
        template = spec.get("template") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        selector = (spec.get("selector") or {}).get("matchLabels") or {}
        if not _matches(selector, labels):
            problems.append(f"{kind}/{name}: selector {selector} does not match the pod labels {labels}")
        pod = template.get("spec") or {}
        claim_templates = {(t.get("metadata") or {}).get("name") for t in spec.get("volumeClaimTemplates") or []}
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        for container in pod.get("containers") or []:
            cname = f"{kind}/{name}/{container.get('name')}"
            port_names = {p.get("name") for p in container.get("ports") or [] if p.get("name")}
            port_numbers = {p.get("containerPort") for p in container.get("ports") or []}
            for probe_kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container.get(probe_kind)
                if not probe:
                    continue
                handler = probe.get("httpGet") or probe.get("tcpSocket") or probe.get("grpc")
                if handler is None and "exec" not in probe:
                    problems.append(f"{cname}: {probe_kind} has no handler")
                    continue
                if handler is not None:
                    port = handler.get("port")
                    if isinstance(port, str) and port not in port_names:
                        problems.append(f"{cname}: {probe_kind} names port {port!r}, not declared by the container")
                    if isinstance(port, int) and port not in port_numbers:
                        problems.append(f"{cname}: {probe_kind} uses port {port}, not declared by the container")
            for source in container.get("envFrom") or []:
                ref = source.get("configMapRef") or source.get("secretRef")
                pool = configmaps if "configMapRef" in source else secrets
                if ref and ref.get("name") not in pool and not ref.get("optional"):
                    problems.append(f"{cname}: envFrom refers to a missing {ref.get('name')}")
            for mount in container.get("volumeMounts") or []:
                if mount["name"] not in volumes and mount["name"] not in claim_templates:
                    problems.append(f"{cname}: volumeMount {mount['name']} has no volume")
        for vname, volume in volumes.items():
            claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and claim not in pvcs:
                problems.append(f"{kind}/{name}: volume {vname} claims a missing PVC {claim}")
    for name, service in by_kind.get("Service", {}).items():
        selector = (service.get("spec") or {}).get("selector") or {}
        targets = [
            d
            for d in workloads.values()
            if _matches(selector, ((d["spec"]["template"].get("metadata") or {}).get("labels") or {}))
        ]
        if not targets:
            problems.append(f"Service/{name}: selector {selector} matches no workload")
            continue
        declared = set()
        for target in targets:
            for container in target["spec"]["template"]["spec"].get("containers") or []:
                for p in container.get("ports") or []:
                    declared |= {p.get("name"), p.get("containerPort")}
        for port in service["spec"].get("ports") or []:
            target_port = port.get("targetPort", port.get("port"))
            if target_port not in declared:
                problems.append(f"Service/{name}: targetPort {target_port!r} is not a port of its pods")

    def gpus(workload_name: str) -> int:
        doc = by_kind.get("Deployment", {}).get(workload_name)
        if not doc:
            problems.append(f"Deployment/{workload_name} is missing")
            return 0
        limits = doc["spec"]["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        return int(limits.get("nvidia.com/gpu", 0))

    for required in ("snapgen-worker", "triton"):
        if gpus(required) < 1:
            problems.append(f"Deployment/{required}: no nvidia.com/gpu limit")
    for kind, name in (("Deployment", "snapgen-api"), ("Service", "snapgen-api"), ("Service", "triton"),
                       ("StatefulSet", "redis"), ("Service", "redis")):  # fmt: skip
        if name not in by_kind.get(kind, {}):
            problems.append(f"{kind}/{name} is missing")
    redis = by_kind.get("StatefulSet", {}).get("redis")
    if redis:
        args = " ".join(redis["spec"]["template"]["spec"]["containers"][0].get("args") or [])
        if "--appendonly yes" not in args:
            problems.append("StatefulSet/redis: persistence off (needs --appendonly yes)")
        if not redis["spec"].get("volumeClaimTemplates"):
            problems.append("StatefulSet/redis: no volumeClaimTemplates (data would not survive a restart)")
    problems += check_scaled_objects(by_kind)
    return problems


def check_scaled_objects(by_kind: dict[str, dict[str, dict]]) -> list[str]:
    """The KEDA ScaledObject, field by field (no schema for CRDs here): it must read the queue's stream."""
    sys.path.insert(0, str(ROOT))
    from server.queue import RedisJobQueue

    problems = []
    scaled = by_kind.get("ScaledObject", {})
    if not scaled:
        return ["no KEDA ScaledObject"]
    prefix = ((by_kind.get("ConfigMap", {}).get("snapgen-config") or {}).get("data") or {}).get(
        "SNAPGEN_REDIS_PREFIX", "snapgen"
    )
    queue = RedisJobQueue("redis://unused:6379/0", prefix=prefix)  # connects lazily: only the key names
    redis_services = set(by_kind.get("Service", {}))
    for name, doc in scaled.items():
        where = f"ScaledObject/{name}"
        if doc.get("apiVersion") != "keda.sh/v1alpha1":
            problems.append(f"{where}: apiVersion must be keda.sh/v1alpha1")
        spec = doc.get("spec") or {}
        target = spec.get("scaleTargetRef") or {}
        if target.get("name") not in by_kind.get(target.get("kind", "Deployment"), {}):
            problems.append(f"{where}: scaleTargetRef {target} is not a workload in these manifests")
        lo, hi = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            problems.append(f"{where}: minReplicaCount {lo} / maxReplicaCount {hi} are not 0 <= min <= max")
        triggers = spec.get("triggers") or []
        if not triggers:
            problems.append(f"{where}: no triggers")
        kinds = set()
        for i, trigger in enumerate(triggers):
            t = f"{where}: trigger {i}"
            if trigger.get("type") != "redis-streams":
                problems.append(f"{t}: type {trigger.get('type')!r}, expected redis-streams")
                continue
            meta = trigger.get("metadata") or {}
            non_strings = [k for k, v in meta.items() if not isinstance(v, str)]
            if non_strings:
                problems.append(f"{t}: metadata values must be strings: {non_strings}")
            if meta.get("stream") != queue.stream:
                problems.append(f"{t}: stream {meta.get('stream')!r}, the queue writes {queue.stream!r}")
            if meta.get("consumerGroup") != RedisJobQueue.GROUP:
                problems.append(
                    f"{t}: consumerGroup {meta.get('consumerGroup')!r}, the workers use {RedisJobQueue.GROUP!r}"
                )
            host = str(meta.get("address") or meta.get("host") or "").split(":")[0].split(".")[0]
            if host not in redis_services:
                problems.append(f"{t}: address {meta.get('address')!r} is not a Service of these manifests")
            modes = [k for k in ("pendingEntriesCount", "streamLength", "lagCount") if k in meta]
            if len(modes) != 1:
                problems.append(f"{t}: needs exactly one of pendingEntriesCount, streamLength, lagCount; has {modes}")
            for k in modes:
                if not str(meta[k]).isdigit() or int(meta[k]) < 1:
                    problems.append(f"{t}: {k} must be a positive integer string")
            kinds |= set(modes)
        if "pendingEntriesCount" not in kinds:
            problems.append(f"{where}: no trigger on the stream's pending entries (pendingEntriesCount)")
    return problems


# --------------------------------------------------------------------------------------------- main
def _report(title: str, problems: list[str]) -> int:
    if problems:
        print(f"FAIL {title}:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"ok   {title}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("compose")
    c.add_argument("--compose-cmd", default="docker compose", help="how to run Compose v2 (shell words)")
    d = sub.add_parser("dashboard")
    d.add_argument("--rules-out", type=Path, help="write the queries as a rules file for `promtool check rules`")
    sub.add_parser("k8s")
    args = parser.parse_args(argv)
    if args.what == "compose":
        cmd = shlex.split(args.compose_cmd)
        configs = [compose_config(cmd, p) for p in ([], ["cpu"], ["gpu", "triton"])]
        failed = _report("compose invariants (profiles: default, cpu, gpu+triton)", check_compose(*configs))
        named = dict(zip(("gpu", "cpu", "gpu+triton"), configs))
        named["cpu+triton"] = compose_config(cmd, ["cpu", "triton"])
        named["gpu-pinning"] = compose_config(cmd, [], ("deploy/compose.gpu-pinning.yml",))
        prometheus = yaml.safe_load(PROMETHEUS_YML.read_text())
        return failed | _report(
            f"prometheus scrape targets ({', '.join(named)})", check_scrape_targets(prometheus, named)
        )
    if args.what == "dashboard":
        known = exported_metrics()
        paths = sorted(DASHBOARD_DIR.glob("*.json"))
        problems, exprs = check_dashboards(paths, known)
        if args.rules_out:
            write_rules_file(exprs, args.rules_out)
        return _report(f"dashboard metric names ({len(exprs)} queries, {len(known)} exported names)", problems)
    docs = load_manifests()
    return _report(f"k8s references and KEDA ScaledObject ({len(docs)} objects)", check_k8s(docs))


if __name__ == "__main__":
    sys.exit(main())
