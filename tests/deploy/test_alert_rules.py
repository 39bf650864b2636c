"""deploy/prometheus/alerts.yml: each alert fires when it should and stays quiet when it should (promtool test
rules on tests/deploy/alerts_test.yml), every alert has such a test, and every metric it reads is exported.

The running stack (test_compose_stack.py) shows the rules load and evaluate against the real series.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
UNIT_TESTS = Path(__file__).with_name("alerts_test.yml")
sys.path.insert(0, str(ROOT / "scripts"))

import validate_deploy as vd  # noqa: E402


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed: apt-get install -y --no-install-recommends prometheus "
                    "(bash scripts/system-deps.sh)")  # fmt: skip
    return path


def alert_rules(text: str | None = None) -> list[dict]:
    groups = yaml.safe_load(text if text is not None else ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def run_unit_tests(tmp_path: Path, alerts_text: str) -> subprocess.CompletedProcess:
    """promtool test rules against a copy of the rules without annotations (compared verbatim otherwise)."""
    rules = yaml.safe_load(alerts_text)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / "alerts_test.yml")
    return subprocess.run([promtool(), "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_alerts_fire_when_they_should(tmp_path):
    out = run_unit_tests(tmp_path, ALERTS.read_text())
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_unit_tests_catch_a_broken_alert(tmp_path):
    broken = ALERTS.read_text().replace("max(snapgen_workers) == 0", "max(snapgen_worker) == 0")
    assert broken != ALERTS.read_text()
    out = run_unit_tests(tmp_path, broken)
    assert out.returncode != 0 and "alertname: SnapgenNoWorkers" in out.stdout + out.stderr, out.stdout


def test_every_alert_has_a_firing_case():
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check.get("exp_alerts")}
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    assert set(names) - fired == set()
    assert {"SnapgenNoWorkers", "SnapgenQueueBacklogGrowing", "SnapgenJobFailureRate", "SnapgenJobsDeadLettered",
            "SnapgenApiErrors", "SnapgenTargetDown", "SnapgenRedisFull"} <= set(names)  # fmt: skip


def test_alerts_read_exported_metrics_only():
    known = vd.exported_metrics() | {"up"}  # up: Prometheus's own, per target
    for rule in alert_rules():
        names = vd.promql_metric_names(rule["expr"])
        assert names and names <= known, f"{rule['alert']}: {sorted(names - known)} not exported by server/metrics.py"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_prometheus_loads_the_alerts_beside_its_config():
    config = yaml.safe_load((ALERTS.parent / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]  # relative: the config's directory, in the container too
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    volumes = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in volumes
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    out = subprocess.run([promtool(), "check", "config", str(ALERTS.parent / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0 and f"{len(alert_rules())} rules found" in out.stdout, out.stdout + out.stderr
