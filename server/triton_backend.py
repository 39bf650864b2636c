"""The worker's Triton backend: the sampler loop here, the three models on an NVIDIA Triton Inference Server.

``snapgen worker --backend triton --triton-url grpc://HOST:8001`` (or ``http://HOST:8000``) runs
:class:`TritonBackend`, a :class:`StagedBackend` whose ``encode_text``, ``unet`` and ``decode`` are
tritonclient calls to the models of ``snapgen export triton`` (``triton_export.interface``). Noise,
timesteps, guidance and the Euler steps are the in-process ones, so the images equal
:class:`TorchBackend`'s (bit for bit with the python backend on the CPU).

From ``--model`` the worker reads only JSON configs and tokenizers (it tokenizes and validates prompts
itself and sends ids), never weights; the repository's ``snapgen_fingerprint`` must match that
directory's, or the worker refuses to start (it would sample with another model's sizes or sampler).

Triton unreachable or a model not ready: a call raises :class:`BackendUnavailable` with the reason
("triton at grpc://...: model snapgen_unet not ready"); the worker hands the batch back to the queue,
reports the reason in its heartbeat (``/readyz``) and takes no jobs until :meth:`health` is clear again.
"""

from __future__ import annotations

import contextlib
import threading
from functools import partial
from pathlib import Path
from typing import Any

from .backends import BackendUnavailable, StagedBackend, named

SCHEMES = ("grpc", "http")
MODELS = ("text_encoder", "unet", "decoder")


class TritonRepositoryMismatch(RuntimeError):
    """The served repository was exported from another model (or is not a snapgen repository)."""


def parse_url(url: str) -> tuple[str, str]:
    """``grpc://HOST:PORT`` or ``http://HOST:PORT`` -> (protocol, "HOST:PORT")."""
    scheme, sep, address = url.partition("://")
    if not sep or scheme not in SCHEMES or not address or "/" in address.rstrip("/"):
        raise ValueError(f"{url!r} is not a Triton URL; write grpc://HOST:8001 or http://HOST:8000")
    return scheme, address.rstrip("/")


def _short(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


class TritonBackend(StagedBackend):
    def __init__(self, model_dir: str | Path, url: str, name: str | None = None, timeout_s: float = 300.0):
        import torch

        from snapgen.model_dir import provenance
        from snapgen.request import ModelCard
        from snapgen.sampling import SamplerConfig
        from snapgen.text import load_tokenizers
        from triton_export.interface import MODEL_NAMES, read_shapes, tensors

        self.protocol, self.address = parse_url(url)
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        model_dir = Path(model_dir)
        self.shapes = read_shapes(model_dir)
        self.sampler = SamplerConfig.load(model_dir / "scheduler")
        self.tokenizers = load_tokenizers(model_dir / "text_encoder")
        self.card = named(ModelCard.from_model_dir(model_dir), name)
        self.provenance = provenance(model_dir)
        self.latent_channels = self.shapes.latent_channels
        self.latent_factor = self.shapes.latent_factor
        self.model_names = {c: MODEL_NAMES[c] for c in MODELS}
        self.specs = {c: tensors(c, self.shapes) for c in MODELS}
        self._device, self._dtype = torch.device("cpu"), torch.float32
        self._local = threading.local()  # one client per thread: the HTTP client is not thread-safe
        self._max_batch: dict[str, int] | None = None

    # -- StagedBackend ---------------------------------------------------------------------------
    @property
    def device(self):
        return self._device  # noise, sampler and guidance run here; the models on Triton

    @property
    def dtype(self):
        return self._dtype

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": f"triton {self.url}", "triton_url": self.url}

    def count_tokens(self, prompts):
        from snapgen.text import count_tokens

        per_part = [count_tokens(tokenizer, list(prompts)) for tokenizer, _ in self.tokenizers]
        return [sum(counts) for counts in zip(*per_part)]

    def encode_text(self, prompts):
        import torch

        from snapgen.text import PromptTooLongError, TextEmbeddings, count_tokens, tokenize_padded

        prompts = list(prompts)
        feeds, masks = {}, []
        for (ids_name, mask_name), (tokenizer, max_length) in zip(self._text_names(), self.tokenizers, strict=True):
            for i, count in enumerate(count_tokens(tokenizer, prompts)):  # as encode() checks, per part
                if count > max_length:
                    raise PromptTooLongError(i, count, max_length)
            batch = tokenize_padded(tokenizer, prompts, max_length)
            feeds[ids_name] = batch["input_ids"].numpy()
            feeds[mask_name] = batch["attention_mask"].numpy()
            masks.append(batch["attention_mask"].bool())
        out = self._infer("text_encoder", feeds)
        pooled = torch.from_numpy(out["pooled"]) if "pooled" in out else None
        return TextEmbeddings(tokens=torch.from_numpy(out["tokens"]), mask=torch.cat(masks, dim=1), pooled=pooled)

    def unet_velocity(self, latents, t, text):
        import torch

        feeds = {
            "sample": latents.float().numpy(),
            "timestep": t.float().reshape(-1, 1).numpy(),
            "encoder_hidden_states": text.tokens.float().numpy(),
            "encoder_attention_mask": text.mask.numpy(),
        }
        if self.shapes.pooled_width:
            feeds["pooled_projections"] = text.pooled.float().numpy()
        return torch.from_numpy(self._infer("unet", feeds)["velocity"])

    def decode(self, latents):
        import torch

        return torch.from_numpy(self._infer("decoder", {"latents": latents.float().numpy()})["image"])

    # -- Triton ------------------------------------------------------------------------------------
    def _text_names(self) -> list[tuple[str, str]]:
        from triton_export.interface import text_input_names

        return text_input_names(len(self.tokenizers))

    def _module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            module = self._module()
            if self.protocol == "grpc":
                client = module.InferenceServerClient(self.address)
            else:
                client = module.InferenceServerClient(self.address, connection_timeout=10.0,
                                                      network_timeout=self.timeout_s)  # fmt: skip
            self._local.client = client
        return client

    def _drop_client(self) -> None:
        # A fresh channel after a failure: gRPC's reconnect backoff would otherwise delay noticing a restarted server.
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def health(self) -> str | None:
        """None when Triton is live and the three models are ready; else why not."""
        try:
            client = self._client()
            kwargs = {"client_timeout": 5.0} if self.protocol == "grpc" else {}
            if not client.is_server_live(**kwargs):
                return f"triton at {self.url}: server not live"
            for name in self.model_names.values():
                if not client.is_model_ready(name, **kwargs):
                    return f"triton at {self.url}: model {name} not ready"
        except Exception as e:
            self._drop_client()
            return f"triton at {self.url}: unreachable ({_short(e)})"
        return None

    def _check_repository(self) -> dict[str, int]:
        """Once: the served models come from this model directory; their max_batch_size."""
        sizes = {}
        json_kwargs = {"as_json": True} if self.protocol == "grpc" else {}  # http answers JSON anyway
        for component, name in self.model_names.items():
            config = self._call(lambda client, name=name: client.get_model_config(name, **json_kwargs))
            config = config.get("config", config)  # grpc wraps it, http does not
            parameters = {k: v.get("string_value") for k, v in (config.get("parameters") or {}).items()}
            served = parameters.get("snapgen_fingerprint")
            if served != self.shapes.fingerprint:
                raise TritonRepositoryMismatch(
                    f"triton at {self.url}: model {name} was not exported from this model directory (fingerprint "
                    f"{served or 'missing'}, expected {self.shapes.fingerprint}); export it with `snapgen export "
                    "triton --model DIR` from the directory given to the worker"
                )
            sizes[component] = int(config.get("max_batch_size") or 0)
            if sizes[component] < 1:
                raise TritonRepositoryMismatch(f"triton at {self.url}: model {name} does not batch (max_batch_size 0)")
        return sizes

    def _call(self, fn):
        """One client call; when it fails and Triton cannot serve, :class:`BackendUnavailable` says why."""
        try:
            return fn(self._client())
        except Exception as e:
            self._drop_client()
            reason = self.health()
            if reason is not None:
                raise BackendUnavailable(reason) from e
            raise

    def _infer(self, component: str, feeds: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from triton_export.interface import NUMPY_DTYPES

        if self._max_batch is None:
            self._max_batch = self._check_repository()
        module = self._module()
        inputs, outputs = self.specs[component]
        name, step = self.model_names[component], self._max_batch[component]
        total = len(next(iter(feeds.values())))
        results: dict[str, list] = {spec.name: [] for spec in outputs}
        for start in range(0, total, step):  # Triton refuses batches over max_batch_size
            request = []
            for spec in inputs:
                array = np.ascontiguousarray(feeds[spec.name][start : start + step], dtype=NUMPY_DTYPES[spec.dtype])
                item = module.InferInput(spec.name, list(array.shape), spec.dtype)
                item.set_data_from_numpy(array)
                request.append(item)
            wanted = [module.InferRequestedOutput(spec.name) for spec in outputs]
            response = self._call(partial(self._send, name, request, wanted))
            for spec in outputs:
                results[spec.name].append(response.as_numpy(spec.name))
        # concatenate copies: tritonclient's arrays are read-only views of the response buffer
        return {k: np.concatenate(v) for k, v in results.items()}

    def _send(self, name, request, wanted, client):
        if self.protocol == "grpc":
            return client.infer(name, request, outputs=wanted, client_timeout=self.timeout_s)
        return client.infer(name, request, outputs=wanted)  # the HTTP client's network_timeout applies
