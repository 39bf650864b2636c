"""``snapgen serve`` and ``snapgen worker`` (added to the ``snapgen`` CLI through ``add_commands``).

Heavy imports (FastAPI, torch) stay inside the commands, so ``snapgen --help`` stays fast, and
``serve --redis`` imports no torch: it runs from the `api` extra alone (the slim image).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

KERNELS_HELP = (
    "the U-Net's and decoder's kernels: torch (default) or triton (fused; CUDA, or the CPU through "
    "TRITON_INTERPRET=1: slow, for checking); triton turns the U-Net's TorchScript trace off"
)
GRAPH_HELP = (
    "run each batch's sampler and decoder as one CUDA graph per batch bucket, recorded at warm-up (CUDA only; "
    "progress at the end of a batch, cancellation between batches; batches with previews run step by step)"
)


def add_commands(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="run the generation API (embedded: with its own worker; --redis: API only)",
        description="Without --redis: the API, an in-process queue and one worker running the model. "
        "With --redis: the API only; start workers with `snapgen worker --redis ...`. "
        "Every option is also a SNAPGEN_* environment variable (docs/server.md).",
    )
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")
    p.add_argument("--redis", dest="redis_url", metavar="URL", help="redis://HOST:PORT/DB: scaled-out mode")
    p.add_argument("--model", type=Path, help="model directory (embedded mode; default: the embedded default model)")
    p.add_argument("--model-name", help="model name shown by the API (default: the directory name)")
    p.add_argument("--device", help="cpu or cuda:N (embedded mode)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="weights dtype (embedded mode)")
    p.add_argument("--api-processes", type=int, help="API processes (Redis mode only; metrics are aggregated)")
    p.add_argument("--api-keys-file", type=Path, help="one API key per line; or SNAPGEN_API_KEYS=k1,k2")
    p.add_argument("--allow-unauthenticated", action="store_true", default=None,
                   help="allow a non-loopback --host without API keys")  # fmt: skip
    p.add_argument("--mobile-dir", type=Path, help="directory of Core ML bundles to list and serve")
    p.add_argument("--max-batch", dest="max_batch_images", type=int, help="images per batch (embedded worker)")
    p.add_argument("--kernels", choices=["torch", "triton"], help=KERNELS_HELP + " (embedded mode)")
    p.add_argument("--graph", action="store_true", default=None, help=GRAPH_HELP + " (embedded mode)")
    p.add_argument("--max-queue", dest="max_queue_depth", type=int, help="waiting jobs before 429 (default 256)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    w = sub.add_parser(
        "worker",
        help="run a generation worker on a Redis queue",
        description="Takes jobs from the Redis queue, batches compatible ones and runs them on one device. "
        "SIGTERM: finish or hand back the running batch, then exit.",
    )
    w.add_argument("--redis", dest="redis_url", metavar="URL", help="redis://HOST:PORT/DB (or SNAPGEN_REDIS_URL)")
    w.add_argument("--model", type=Path, help="model directory (default: the embedded default model)")
    w.add_argument("--model-name", help="model name shown by the API (default: the directory name)")
    w.add_argument("--device", help="cpu or cuda:N")
    w.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    w.add_argument("--channels-last", action="store_true", default=None)
    w.add_argument("--compile", action="store_true", default=None, help="torch.compile the U-Net")
    w.add_argument("--trace-unet", action=argparse.BooleanOptionalAction, default=None,
                   help="TorchScript-trace the U-Net (default: on unless --compile; same images, faster)")  # fmt: skip
    w.add_argument("--kernels", choices=["torch", "triton"], help=KERNELS_HELP)
    w.add_argument("--graph", action="store_true", default=None, help=GRAPH_HELP)
    w.add_argument("--threads", dest="torch_threads", type=int, help="torch CPU threads")
    w.add_argument("--backend", choices=["torch", "triton"],
                   help="torch: run the model in this process (default); triton: call the models of a Triton server "
                   "(`snapgen export triton`), keeping the sampler here")  # fmt: skip
    w.add_argument("--triton-url", metavar="URL", help="grpc://HOST:8001 (default protocol) or http://HOST:8000")
    w.add_argument("--name", dest="worker_name", help="consumer name (default HOST-PID)")
    w.add_argument("--max-batch", dest="max_batch_images", type=int, help="images per batch (default 8)")
    w.add_argument("--metrics-port", dest="worker_metrics_port", type=int, help="serve this worker's /metrics here")
    w.add_argument("--host", help="bind address of --metrics-port (default 127.0.0.1)")
    w.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    w.set_defaults(func=cmd_worker)


# What the `api` extra brings (pyproject.toml); `snapgen serve --redis` needs these and nothing of the model stack.
API_MODULES = ("fastapi", "uvicorn", "pydantic", "pydantic_settings", "redis", "prometheus_client", "httpx")
INSTALL_API = "pip install 'snapgen[api]' (the API alone, with --redis) or 'snapgen[serve]' (with the model)"
INSTALL_SERVE = "pip install 'snapgen[serve]'"


_FLAGS = (
    "host", "port", "redis_url", "model", "model_name", "device", "dtype", "api_processes", "api_keys_file",
    "allow_unauthenticated", "mobile_dir", "max_batch_images", "max_queue_depth", "log_level", "channels_last",
    "compile", "trace_unet", "torch_threads", "worker_name", "worker_metrics_port", "backend", "triton_url",
    "kernels", "graph",
)  # fmt: skip


def _settings(args):
    from pydantic import ValidationError

    from snapgen.cli import CLIError

    from .settings import settings_from

    overrides = {name: getattr(args, name, None) for name in _FLAGS}
    try:
        settings = settings_from(overrides)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        raise CLIError(f"invalid settings (flags or SNAPGEN_* variables): {problems}") from None
    try:
        settings.all_api_keys()
    except OSError as e:
        raise CLIError(f"--api-keys-file {settings.api_keys_file}: {e.strerror or e}") from None
    return settings


def _model_dir(settings):
    from snapgen.cli import CLIError

    if settings.model is not None:
        directory = Path(settings.model)
        if not (directory / "model_index.json").is_file():
            raise CLIError(f"--model/SNAPGEN_MODEL {directory}: not a snapgen model directory (no model_index.json)")
        return directory.resolve()
    from snapgen.model_dir import default_model_dir

    directory = default_model_dir()
    if not (directory / "model_index.json").is_file():
        raise CLIError(
            f"the embedded default model is not installed at {directory} (it ships with the package); "
            "pass --model DIR or set SNAPGEN_MODEL (a random test model: `snapgen init-model --out DIR`)"
        )
    return directory


def _check_engine(settings) -> None:
    """Refuse at start, naming the flag, what the model's load would refuse later: CUDA graphs without a CUDA
    device, Triton kernels where Triton cannot run (torch is imported for these two only)."""
    from snapgen.cli import CLIError, check_kernels
    from snapgen.devices import DeviceError, check_device

    if settings.graph:
        if not settings.device.startswith("cuda"):
            raise CLIError(
                f"--graph (SNAPGEN_GRAPH) records CUDA graphs, which need a CUDA device; the device is "
                f"{settings.device}: give --device cuda:N, or leave --graph off"
            )
        try:
            check_device(settings.device)
        except DeviceError as e:
            raise CLIError(str(e)) from None
    check_kernels(settings.kernels, settings.device, "--kernels")
    if settings.kernels == "triton":
        from snapgen.models import kernels

        reason = kernels.available()
        if reason is not None:
            raise CLIError(f"--kernels triton: {reason}")


def _logging(settings) -> None:
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _prepare_multiprocess_metrics() -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for stale in Path(directory).glob("*.db"):  # values of an earlier run must not count
            stale.unlink(missing_ok=True)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="snapgen-metrics-")


def _check_can_listen(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, so a busy port fails in one line now, not after the model loads.

    With SO_REUSEADDR, as uvicorn binds: a port left in TIME_WAIT by an earlier server is free to it."""
    import errno
    import socket

    from snapgen.cli import CLIError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise CLIError(f"--host {host}: not an address this machine can listen on ({e})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            flag = f"--port {port}" if e.errno in (errno.EADDRINUSE, errno.EACCES) else f"--host {host}"
            raise CLIError(f"{flag}: cannot listen on {host}:{port}: {e.strerror or e}") from None


def cmd_serve(args) -> None:
    from snapgen.cli import MODEL_MODULES, CLIError, require_modules

    require_modules(API_MODULES, "the API", INSTALL_API)
    from .security import is_loopback

    settings = _settings(args)
    if not settings.all_api_keys() and not is_loopback(settings.host) and not settings.allow_unauthenticated:
        raise CLIError(
            f"--host {settings.host} is reachable from other machines, and no API keys are configured: set "
            "SNAPGEN_API_KEYS (or --api-keys-file), or pass --allow-unauthenticated to serve without keys"
        )
    if settings.embedded:
        if settings.api_processes > 1:
            raise CLIError("--api-processes needs --redis: the embedded mode is one process with its own worker")
        require_modules(
            MODEL_MODULES,
            "without --redis, serve runs the model in this process and",
            f"{INSTALL_SERVE}, or give --redis URL to run the API alone (workers elsewhere)",
        )
        settings = settings.model_copy(update={"model": _model_dir(settings)})
        _check_engine(settings)
    elif args.model is not None:
        raise CLIError("`serve --redis` runs the API only; give --model to `snapgen worker`")
    elif args.kernels is not None or args.graph:
        raise CLIError("`serve --redis` runs the API only; give --kernels and --graph to `snapgen worker`")
    _check_can_listen(settings.host, settings.port)
    _logging(settings)

    import uvicorn

    options = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        timeout_graceful_shutdown=max(5, int(settings.drain_timeout_s)),
    )
    if settings.api_processes > 1:
        _prepare_multiprocess_metrics()
        os.environ.update(settings.to_env())
        uvicorn.run("server.api:app_from_env", factory=True, workers=settings.api_processes, **options)
        return
    from .api import create_app

    uvicorn.run(create_app(settings), **options)


def cmd_worker(args) -> None:
    from snapgen.cli import MODEL_MODULES, CLIError, require_modules

    require_modules(API_MODULES + MODEL_MODULES, "a worker", INSTALL_SERVE)
    settings = _settings(args)
    if not settings.redis_url:
        raise CLIError("a worker needs --redis URL (or SNAPGEN_REDIS_URL); `snapgen serve` alone runs its own worker")
    settings = settings.model_copy(update={"model": _model_dir(settings)})
    _check_engine(settings)
    _logging(settings)
    from .worker_process import run_worker_process

    run_worker_process(settings)
