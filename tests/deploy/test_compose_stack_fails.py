"""A broken copy of docker-compose.yml does not come up: the harness (compose_processes.py) says which service's
healthcheck never passed, why, and its log tail, and says it fast.

Each case changes one thing in a copy of the file (resolved with the repository as project directory, so its
relative paths still point here) and starts the CPU stack with short timeouts.
"""

from __future__ import annotations

import re
import time

import pytest
from compose_processes import ROOT, ComposeStack, StackError, interpolation_env, resolve

COMPOSE = ROOT / "docker-compose.yml"
SERVICES = ["api", "worker-cpu", "redis", "prometheus"]


def broken_stack(tmp_path, old: str, new: str, services=SERVICES) -> ComposeStack:
    text = COMPOSE.read_text()
    assert text.count(old) == 1, f"{old!r} is not (once) in docker-compose.yml: update this test"
    tmp_path.mkdir(parents=True, exist_ok=True)
    copy = tmp_path / "docker-compose.yml"
    copy.write_text(text.replace(old, new))
    model = resolve(copy, ["cpu"], interpolation_env(SNAPGEN_TORCH_THREADS="1"))
    return ComposeStack(model, tmp_path / "stack", services=services, scale={"worker-cpu": 2})


@pytest.mark.parametrize(
    "old, new, service, says",
    [
        # A flag the CLI does not have: the api exits at once (argparse, status 2).
        ('command: ["serve", "--redis", "redis://redis:6379/0"', 'command: ["serve", "--redis-url", "redis://redis:6379/0"',
         "api", "unrecognized arguments: --redis-url"),
        # A misspelt variable is ignored, so the workers have no Redis URL.
        ("    SNAPGEN_REDIS_URL: redis://redis:6379/0", "    SNAPGEN_REDIS_URLL: redis://redis:6379/0",
         "worker-cpu", "a worker needs --redis URL"),
        # Without it the api refuses to listen on 0.0.0.0 with no keys.
        ("SNAPGEN_ALLOW_UNAUTHENTICATED: ${SNAPGEN_ALLOW_UNAUTHENTICATED:-true}",
         "SNAPGEN_ALLOW_UNAUTHENTICATD: ${SNAPGEN_ALLOW_UNAUTHENTICATED:-true}", "api", "no API keys are configured"),
    ],
    ids=["command", "worker-env", "api-env"],
)  # fmt: skip
def test_a_broken_service_fails_the_stack_fast(tmp_path, old, new, service, says):
    stack = broken_stack(tmp_path, old, new)
    start = time.monotonic()
    with pytest.raises(StackError) as failure:
        stack.up(timeout=90)
    elapsed = time.monotonic() - start
    message = str(failure.value)
    assert message.startswith(f"service {service}: healthcheck never passed (the process exited with status")
    assert says in message and re.search(rf"--- log tail of {service}-\d ---", message), message
    assert elapsed < 45, f"took {elapsed:.0f}s to notice"
    # Nothing left running.
    assert not any(r.proc and r.proc.alive() for rs in stack.replicas.values() for r in rs)


def test_a_healthcheck_on_the_wrong_port_never_passes(tmp_path):
    """Prometheus alone (the file's healthcheck passes in test_compose_stack.py), its healthcheck on 9091."""
    stack = broken_stack(tmp_path, "http://127.0.0.1:9090/-/ready", "http://127.0.0.1:9091/-/ready",
                         services=["prometheus"])  # fmt: skip
    with pytest.raises(StackError) as failure:
        stack.up(timeout=15)
    message = str(failure.value)
    assert message.startswith("service prometheus: healthcheck never passed (not healthy within 15s"), message
    assert "healthcheck: CMD wget -q -O /dev/null http://127.0.0.1:9091/-/ready" in message
    assert "last: exit 4" in message, message  # wget: network failure (connection refused)
    assert "Server is ready to receive web requests" in message  # the log tail: Prometheus itself was fine
