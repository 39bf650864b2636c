"""Run the ``tritonserver`` binary of the nvidia-pytriton wheel (Triton 2.51) without Docker, CPU-only if need be.

    python -m triton_export.server REPO [--http-port 8000 --grpc-port 8001 --metrics-port 8002]

The wheel has the binary (``pytriton/tritonserver/bin/tritonserver``, its libraries in
``nvidia_pytriton.libs``), the python backend (``backends/python``) and one python-backend stub per
Python 3.x (``python_backend_stubs/3.X``). What it takes to run it outside NVIDIA's container, as pytriton
itself does it:

* a backend directory of our own (a temporary one): ``python/`` with the backend library and the stub
  built for *this* interpreter's version; the stub embeds Python and runs each ``model.py``;
* ``PATH`` with this environment's ``bin`` first: the stub's embedded interpreter finds its prefix, and so
  the site-packages where snapgen is installed, from the ``python3`` on ``PATH``. That is how the
  python-backend models import snapgen: they run in this virtual environment;
* ``LD_LIBRARY_PATH`` with this interpreter's ``LIBDIR`` first: the stub links ``libpython3.X.so``, and the
  system's copy (another patch release) crashes it with an ``_thread.RLock`` ``_recursion_count`` error;
  then the wheel's libraries, which the copied backend library no longer finds through its relative RPATH.

The wheel has no onnxruntime backend; for a repository that needs one, ``ort_backend.py`` is installed
as a Python-based backend named ``onnxruntime`` (see there).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path


class TritonServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wheel_paths() -> dict[str, Path]:
    """Where the nvidia-pytriton wheel keeps the binary, its libraries, the python backend and the stub."""
    try:
        import pytriton
    except ImportError:
        raise TritonServerError(
            "nvidia-pytriton is not installed: pip install -e '.[triton]' (scripts/setup.sh does)"
        ) from None
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    paths = {
        "binary": root / "bin" / "tritonserver",
        "libs": root.parent.parent / "nvidia_pytriton.libs",
        "python_backend": root / "backends" / "python",
        "stub": root / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    for name, path in paths.items():
        if not path.exists():
            raise TritonServerError(f"the nvidia-pytriton wheel has no {name} at {path} (Python {version})")
    return paths


def needs_onnxruntime(repository: Path) -> bool:
    return any('backend: "onnxruntime"' in p.read_text() for p in repository.glob("*/config.pbtxt"))


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Triton's environment: this venv's python3 first on PATH, this interpreter's libpython first to load."""
    env = dict(os.environ if base is None else base)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(wheel_paths()["libs"])]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started Triton dies, even by SIGKILL (Linux),
    so a killed test run or worker leaves no tritonserver behind (its own session is out of reach of ^C)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class TritonServer:
    """``tritonserver --model-repository REPO`` as a child process on free (or given) loopback ports.

    ``with TritonServer(repo) as triton: triton.grpc_url`` starts it, waits until every model is ready and
    stops it (SIGTERM) at the end. ``start``/``stop`` can be called again (the same ports: a restart).
    """

    def __init__(
        self,
        repository: str | Path,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ):
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise TritonServerError(f"model repository {self.repository}: no such directory")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.env = env
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen | None = None
        self._backends: Path | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    # -- life cycle ----------------------------------------------------------------------------
    def _backend_directory(self) -> Path:
        if self._backends is None:
            paths = wheel_paths()
            directory = Path(tempfile.mkdtemp(prefix="snapgen-triton-backends-"))
            python = directory / "python"
            shutil.copytree(paths["python_backend"], python, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(paths["stub"], python / "triton_python_backend_stub")
            if needs_onnxruntime(self.repository):
                (directory / "onnxruntime").mkdir()
                shutil.copy(Path(__file__).with_name("ort_backend.py"), directory / "onnxruntime" / "model.py")
            self._backends = directory
        return self._backends

    def command(self) -> list[str]:
        return [
            str(wheel_paths()["binary"]),
            f"--model-repository={self.repository}",
            f"--backend-directory={self._backend_directory()}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true", "--strict-readiness=true", "--exit-timeout-secs=5", "--log-verbose=0",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, wait: bool = True, timeout: float = 300.0) -> TritonServer:
        if self.alive():
            return self
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), env=environment(self.env), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent)  # fmt: skip
        if wait:
            self.wait_ready(timeout)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """Server and every model ready (``--strict-readiness``): ``GET /v2/health/ready`` answers 200."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = None if self.process is None else self.process.returncode
                raise TritonServerError(f"tritonserver exited ({code}) before it was ready:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (Triton unloads its models and exits), SIGKILL after ``timeout``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        if self._backends is not None:
            shutil.rmtree(self._backends, ignore_errors=True)
            self._backends = None
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m triton_export.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path, help="model repository (snapgen export triton --out REPO)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args(argv)
    try:
        server = TritonServer(args.repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, log_path="/dev/stdout")  # fmt: skip
    except TritonServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        server.start()
        print(f"triton ready: {server.grpc_url} {server.http_url} metrics {server.metrics_url}", flush=True)
        while server.alive() and not stop:
            time.sleep(0.5)
    except TritonServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
