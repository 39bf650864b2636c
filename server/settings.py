"""Server and worker settings: pydantic-settings, every field also a ``SNAPGEN_*`` environment variable.

Command-line flags override the environment; the environment overrides these defaults. Lists
(``SNAPGEN_API_KEYS``, ``SNAPGEN_CORS_ORIGINS``) are comma-separated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SNAPGEN_", extra="ignore", validate_default=True)

    # -- where and how -----------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    redis_url: str | None = Field(None, description="redis://HOST:PORT/DB; unset = embedded mode (in-process queue)")
    redis_prefix: str = Field("snapgen", pattern=r"^[A-Za-z0-9_.-]+$", description="key prefix of everything in Redis")
    api_processes: int = Field(1, ge=1, le=64, description="uvicorn worker processes (Redis mode only)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # -- the model (embedded server and workers) ---------------------------------------------
    model: Path | None = Field(None, description="model directory; unset = the embedded default model")
    model_name: str | None = Field(None, description="name reported by the API; default: the directory's name")
    device: str = "cpu"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    trace_unet: bool | None = Field(
        None, description="TorchScript-trace the U-Net; unset = on unless compile or kernels triton"
    )
    kernels: Literal["torch", "triton"] = Field(
        "torch", description="U-Net and decoder kernels: torch, or triton (fused; CUDA, or CPUs: TRITON_INTERPRET=1)"
    )
    graph: bool = Field(False, description="run each batch's sampler and decoder as one CUDA graph (CUDA devices only)")
    torch_threads: int | None = Field(None, ge=1)
    warmup: bool = True
    backend: Literal["torch", "triton"] = Field("torch", description="torch: in process; triton: a Triton server")
    triton_url: str | None = Field(None, description="grpc://HOST:8001 or http://HOST:8000 (backend triton)")

    # -- API limits and security ---------------------------------------------------------------
    api_keys: CommaList = Field(default_factory=list, description="Bearer keys; empty = no authentication")
    api_keys_file: Path | None = Field(None, description="file with one API key per line (# comments)")
    allow_unauthenticated: bool = Field(False, description="allow binding a non-loopback host without API keys")
    rate_limit_per_minute: int = Field(0, ge=0, description="generate requests per key (or client) per minute; 0 = off")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="request bodies without an input image")
    max_image_bytes: int = Field(
        8 << 20, ge=1024, description="the largest input image (image-to-image); the routes that take one allow it"
    )
    max_prompt_chars: int = Field(2000, ge=1, le=20000)
    max_queue_depth: int = Field(256, ge=1, description="queued (not yet running) jobs before 429")
    sync_timeout_s: float = Field(300.0, gt=0, description="longest a synchronous request waits before answering 202")
    result_ttl_s: int = Field(24 * 3600, ge=10, description="how long jobs, results and images are kept")
    result_max_jobs: int = Field(
        10_000, ge=0, description="finished jobs kept at most; beyond it the oldest are evicted first (0: no cap)"
    )
    result_max_bytes: int = Field(
        1 << 30, ge=0, description="bytes of finished jobs and images kept at most; oldest evicted first (0: no cap)"
    )
    redis_high_water: float = Field(
        0.9, gt=0, le=1, description="new jobs are refused (503) once Redis uses this fraction of its maxmemory"
    )
    cors_origins: CommaList = Field(default_factory=list)
    public_url: str | None = Field(None, description="base URL for result links (default: from the request)")
    mobile_dir: Path | None = Field(None, description="directory of Core ML bundles served by /v1/models/mobile")

    # -- webhooks (server/webhooks/) --------------------------------------------------------------
    webhook_secret: CommaList = Field(
        default_factory=list,
        description="whsec_<base64> secret(s) that sign webhooks (several during a rotation: each request carries one "
        "signature per secret); unset = jobs with a webhook are refused (422). The API and every worker need it",
    )
    webhook_allowed_hosts: CommaList = Field(
        default_factory=lambda: ["public"],
        description="who may receive webhooks: public (globally routable addresses), IP addresses or networks, host "
        "names (*.example.com); empty = none. Link-local and metadata addresses never",
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="one webhook attempt, connect to answer")
    webhook_max_attempts: int = Field(10, ge=1, le=100, description="attempts per webhook delivery before giving up")
    webhook_retry_s: float = Field(1.0, gt=0, description="wait before the first retry; it doubles with each retry")
    webhook_retry_max_s: float = Field(300.0, gt=0, description="longest wait between two attempts")
    webhook_output_interval_s: float = Field(
        0.5, ge=0, description="`output` (progress) webhooks of one job at most this often (first and last step always)"
    )

    # -- workers --------------------------------------------------------------------------------
    worker_name: str | None = None
    max_batch_images: int = Field(8, ge=1, le=256)
    batch_wait_ms: float = Field(0.0, ge=0, description="extra wait for compatible jobs before running a batch")
    heartbeat_s: float = Field(2.0, gt=0)
    claim_idle_s: float = Field(30.0, gt=0, description="a job pending this long on a silent worker is reclaimed")
    max_deliveries: int = Field(3, ge=1, description="deliveries before a job goes to the dead-letter stream")
    drain_timeout_s: float = Field(20.0, ge=0, description="on SIGTERM: finish the batch if done within this time")
    worker_metrics_port: int | None = Field(None, ge=0, le=65535)

    @field_validator("api_keys", "cors_origins", "webhook_secret", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secrets(cls, value: list[str]) -> list[str]:
        from .webhooks import parse_secret

        for secret in value:
            parse_secret(secret)  # ValueError names the rule, never the secret
        return value

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _webhook_hosts(cls, value: list[str]) -> list[str]:
        from .webhooks import WebhookPolicy

        WebhookPolicy(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{value!r} is not a Redis URL; write redis://HOST:PORT/DB")
        return value or None

    @field_validator("triton_url")
    @classmethod
    def _triton_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("grpc://", "http://")):
            raise ValueError(f"{value!r} is not a Triton URL; write grpc://HOST:8001 or http://HOST:8000")
        return value or None

    @model_validator(mode="after")
    def _triton_pair(self) -> Settings:
        if self.backend == "triton" and not self.triton_url:
            raise ValueError("backend triton needs a Triton URL (--triton-url or SNAPGEN_TRITON_URL)")
        if self.triton_url and self.backend != "triton":
            raise ValueError("a Triton URL is given but the backend is torch; add --backend triton")
        if self.backend == "triton" and (self.graph or self.kernels != "torch"):
            raise ValueError("graph and kernels apply to the model in this process (backend torch), not to Triton")
        if self.kernels == "triton" and self.trace_unet:
            raise ValueError("kernels triton and trace_unet exclude each other: a trace cannot record Triton kernels")
        return self

    def all_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            for line in Path(self.api_keys_file).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.append(line)
        return keys

    @property
    def embedded(self) -> bool:
        return self.redis_url is None

    def to_env(self) -> dict[str, str]:
        """The ``SNAPGEN_*`` variables that reproduce these settings (for child processes)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, list):
                text = ",".join(value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[f"SNAPGEN_{name.upper()}"] = text
        return env


def settings_from(overrides: dict[str, Any] | None = None) -> Settings:
    """Settings from the environment with ``overrides`` (unset flags are None and skipped)."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    return Settings(**given)
