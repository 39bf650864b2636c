"""The HTTP API without the model stack: `snapgen serve --redis` runs where torch, diffusers, transformers
and safetensors are not installed (the `api` extra, the slim image), and the commands that need them say
what to install instead of failing with a traceback.

Two ways: the project's own .venv with those modules made unimportable (fast), and a fresh virtual
environment with `pip install '.[api]'` from the sources the Dockerfile's `api` stage copies (real: pip
resolves the extra, and nothing in it pulls torch in), serving generations run by a worker from .venv.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "server"))

from server_harness import (  # noqa: E402
    JOB_TIMEOUT,
    STARTUP_TIMEOUT,
    Proc,
    RedisServer,
    Server,
    clean_env,
    decode,
    free_port,
    metric_values,
    snapgen,
    wait_until,
)

from snapgen.cli import MODEL_MODULES  # noqa: E402

PIP_TIMEOUT = 900

# Runs `snapgen` (main(ARGS)) with the model stack unimportable: every attempt to import it is printed to
# stderr with the importing code, so that one swallowed by a try/except is seen too (the CLI's own probe,
# snapgen.cli.missing_modules, which imports nothing, is not an import).
BLOCKED = r"""
import sys, traceback
BLOCKED = set(sys.argv[1].split(","))

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_name != "missing_modules":
                frame = frame.f_back
            if frame is None:
                where = "".join(traceback.format_stack(limit=8)[:-1])
                print(f"BLOCKED IMPORT {name}\n{where}", file=sys.stderr, flush=True)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
from snapgen.cli import main
code = main(sys.argv[2:])
print(f"exit status {code}", file=sys.stderr, flush=True)
sys.exit(code)
"""


def blocked_snapgen(*args: str) -> list[str]:
    return [sys.executable, "-c", BLOCKED, ",".join(MODEL_MODULES), *args]


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slim-logs")


@pytest.fixture(scope="module")
def redis(log_dir, tmp_path_factory):
    server = RedisServer(log_dir, tmp_path_factory.mktemp("slim-redis")).start()
    yield server
    server.stop()


def async_job(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/generate", json=body, headers={"Prefer": "respond-async"})
    assert response.status_code == 202, response.text
    return response.json()


# ------------------------------------------------------------------- the model stack made unimportable
def test_serve_redis_runs_with_the_model_stack_unimportable(redis, log_dir):
    port = free_port()
    proc = Proc("blocked-api", blocked_snapgen("serve", "--redis", redis.url, "--port", str(port)), clean_env(),
                log_dir).start()  # fmt: skip
    api = Server(proc, port)
    try:

        def up():
            if not proc.alive():
                raise AssertionError(f"the API exited:\n{proc.log_tail()}")
            return httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200

        wait_until(up, STARTUP_TIMEOUT, "the API with torch unimportable", interval=0.1)
        with api.client() as client:
            assert client.get("/openapi.json").status_code == 200
            assert client.get("/docs").status_code == 200
            ready = client.get("/readyz")  # Redis answers; no worker yet
            assert ready.status_code == 503 and "worker" in ready.json()["checks"]["model"], ready.text
            assert client.get("/v1/models").json()["data"] == []  # no worker has described a model yet
            invalid = client.post("/v1/generate", json={"prompt": "x", "steps": 0})
            assert invalid.status_code == 422 and invalid.json()["error"]["field"] == "steps", invalid.text
            job = async_job(client, prompt="queued while no worker runs", steps=1)
            assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
            assert "snapgen_requests_total" in client.get("/metrics").text
    finally:
        code = proc.stop(signal.SIGTERM, timeout=30)
    log = proc.log_path.read_text()
    assert "BLOCKED IMPORT" not in log, log
    assert code in (0, -signal.SIGTERM), log


@pytest.mark.parametrize(
    "args, what, install",
    [
        (["serve"], "without --redis, serve runs the model in this process", "'snapgen[serve]', or give --redis"),
        (["worker", "--redis", "redis://127.0.0.1:1/0"], "a worker needs torch", "pip install 'snapgen[serve]'"),
        (["init-model", "--out", "unused"], "snapgen init-model needs torch", "pip install 'snapgen[model]'"),
        (["generate", "a red circle"], "snapgen generate needs torch", "pip install 'snapgen[model]'"),
    ],
)  # fmt: skip
def test_commands_that_need_the_model_say_what_to_install(tmp_path, args, what, install):
    out = subprocess.run(blocked_snapgen(*args), capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env=clean_env())  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert what in out.stderr and install in out.stderr, out.stderr
    assert "diffusers, transformers, safetensors, which are not installed" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "BLOCKED IMPORT" not in out.stderr, out.stderr


# ---------------------------------------------------------------------------- the slim image, statically
def api_stage() -> tuple[list[str], str]:
    """The files the Dockerfile's `api` stage copies and the requirement its pip install names."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    stage = re.search(r"^FROM \S+ AS api\n(.*?)(?=^FROM )", text, re.S | re.M)
    assert stage, "deploy/Dockerfile has no `api` stage"
    copies = [src for line in stage.group(1).splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]]
    pip = re.search(r'pip install .*?"(\.\[[^\]]+\])"', stage.group(1))
    assert pip, "the api stage installs no `.[EXTRAS]`"
    return copies, pip.group(1)


def test_compose_api_service_builds_the_slim_target():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    api = compose["services"]["api"]
    assert api["build"]["target"] == "api" and api["image"] == "snapgen:api"
    assert api["command"][:2] == ["serve", "--redis"]  # the only mode the slim image can run
    copies, requirement = api_stage()
    assert requirement == ".[api]"
    for worker in ("worker", "worker-cpu"):  # the workers keep the full image, the Dockerfile's last stage
        assert "target" not in compose["services"][worker]["build"], worker
    text = (ROOT / "pyproject.toml").read_text()
    base = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    requirements = [line.strip() for line in base.splitlines() if line.strip().startswith('"')]
    assert requirements and not [r for r in requirements if re.match(r'"(torch|diffusers|transformers)\b', r)]


# -------------------------------------------------------------------------- a fresh venv, `.[api]` only
def pinned_like_the_main_venv(path: Path) -> Path:
    """Constraints: the versions .venv has (tested together), so the fresh venv resolves to them; torch
    (a local CPU wheel) and editable or URL installs are left out."""
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    lines = [line for line in freeze.stdout.splitlines()
             if "==" in line and " @ " not in line and not line.startswith(("-e", "torch=="))]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def slim_venv(tmp_path_factory) -> Path:
    """`python -m venv`, then `pip install '.[api]'` from a copy of what the Dockerfile's api stage copies."""
    base = tmp_path_factory.mktemp("slim")
    copies, requirement = api_stage()
    source = base / "src"
    source.mkdir()
    for name in copies:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    started = time.monotonic()
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-c", str(pinned_like_the_main_venv(base / "pins.txt")), "-c", str(ROOT / "constraints.txt"),
         f"{source}{requirement[1:]}"],
        capture_output=True, text=True, timeout=PIP_TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"pip install '.[api]' into a fresh venv: {time.monotonic() - started:.0f} s")
    return venv


def test_the_api_extra_installs_no_model_stack(slim_venv):
    python = str(slim_venv / "bin" / "python")
    for module in MODEL_MODULES:
        out = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, cwd=slim_venv)
        assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, f"{module} is installed: {out.stderr}"
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    names = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert {"snapgen", "fastapi", "uvicorn", "redis", "numpy", "pillow"} <= names, names
    heavy = [n for n in names if n in {"torch", "diffusers", "transformers", "safetensors", "accelerate", "triton"}
             or n.startswith(("nvidia-", "cuda-"))]  # fmt: skip
    assert not heavy, heavy
    # The package came from the venv, not from this checkout.
    where = subprocess.run([python, "-c", "import snapgen, server; print(snapgen.__file__, server.__file__)"],
                           capture_output=True, text=True, cwd=slim_venv, check=True)  # fmt: skip
    assert str(ROOT) not in where.stdout and str(slim_venv) in where.stdout, where.stdout


def test_slim_api_serves_generations_run_by_a_worker(slim_venv, redis, tiny_model, log_dir):
    port = free_port()
    # The compose api service's command and its two processes; no PYTHONPATH, so only the venv's package is seen.
    env = {k: v for k, v in clean_env(SNAPGEN_API_PROCESSES="2").items() if k != "PYTHONPATH"}
    api = Proc("slim-api", [str(slim_venv / "bin" / "snapgen"), "serve", "--redis", redis.url, "--host", "127.0.0.1",
                            "--port", str(port)], env, log_dir).start()  # fmt: skip
    worker = Proc("slim-worker", snapgen("worker", "--redis", redis.url, "--model", str(tiny_model), "--name", "w1",
                                         "--threads", "1"), clean_env(), log_dir).start()  # fmt: skip
    server = Server(api, port)
    try:
        server.wait_ready()
        with server.client() as client:
            ready = client.get("/readyz").json()
            assert ready["status"] == "ready" and "1 worker(s)" in ready["checks"]["model"], ready
            [card] = client.get("/v1/models").json()["data"]
            assert card["id"] == "tiny" and card["workers"] == 1, card
            response = client.post("/v1/generate", json={"prompt": "a red circle", "seed": 5, "n": 2, "steps": 2},
                                   timeout=JOB_TIMEOUT)  # fmt: skip
            assert response.status_code == 200, response.text
            data = response.json()["data"]
            assert [d["seed"] for d in data] == [5, 6]
            assert {decode(d["b64_json"]).size for d in data} == {(128, 128)}
            metrics = metric_values(client.get("/metrics").text)
            assert metrics['snapgen_requests_total{method="POST",route="/v1/generate",status="200"}'] >= 1
            assert metrics["snapgen_workers"] == 1
    finally:
        worker.stop(signal.SIGTERM, timeout=30)
        code = api.stop(signal.SIGTERM, timeout=30)
    assert code in (0, -signal.SIGTERM), api.log_tail()
