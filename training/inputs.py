"""What a latent flow model eats: normalised latents and text (or class) conditioning.

:class:`FlowInputs` holds the frozen autoencoder encoder and the frozen text encoder, applies
classifier-free-guidance dropout, and caches: when the dataset is small and fixed (map-style,
no random crop/flip, and the latents fit in ``cache_max_gb``) every image is encoded once before
training, and every distinct caption too, so a training step costs the denoiser alone and the
data loader no longer decodes or renders images. The cache is computed in a fixed order and
chunking, so it is bit-identical on every (re)start: resumed runs reproduce uninterrupted ones.
With ``latent_cache_dir`` the latents are also saved (safetensors, written atomically) under a
name hashed from the autoencoder's weights and the data config, so stages reading the same data
(teacher, baseline, KD student) and resumed runs load them instead of encoding again.

Shared by the ``pretrain`` (U-Net) and ``teacher`` (SD3 MMDiT) stages, and usable by any stage
that trains on latents.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from snapgen.model_dir import (
    MODEL_INDEX,
    ModelDirectoryError,
    encoder_dir,
    latent_factor,
    weight_files,
    write_file_atomically,
)
from snapgen.models.autoencoder import load_encoder
from snapgen.text import MiniLMTextEncoder, TextEmbeddings, TextEncoder, load_text_encoder

from .config import ConfigError
from .data import TrainingView, collate

CACHE_CHUNK = 64  # images / captions per encoder call while filling the cache


def build_text_encoder(spec: str) -> TextEncoder:
    """``minilm`` (the packaged all-MiniLM-L6-v2), ``minilm:layers=0,6`` (its tokens from those
    hidden states, concatenated; see ``MiniLMTextEncoder``) or a directory written by
    ``save_text_encoder`` (CLIP-L/CLIP-G/Gemma-2 merged encoders for the real recipe), or
    ``table:FILE``: an encoder's saved embeddings of a fixed set of prompts (``training.text_table``)."""
    if spec.startswith("table:"):
        from .text_table import TableTextEncoder

        try:
            return TableTextEncoder(spec.removeprefix("table:"))
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"text_encoder {spec!r}: {e}") from e
    if spec == "minilm":
        return MiniLMTextEncoder()
    if spec.startswith("minilm:"):
        option, _, value = spec.removeprefix("minilm:").partition("=")
        try:
            layers = [int(i) for i in value.split(",")] if option == "layers" else None
        except ValueError:
            layers = None
        if layers is None:
            raise ConfigError(f"text_encoder {spec!r}: write minilm:layers=I,J,... with hidden-state indices")
        try:
            return MiniLMTextEncoder(layers=layers)
        except ValueError as e:
            raise ConfigError(f"text_encoder {spec!r}: {e}") from e
    if not Path(spec).is_dir():
        raise ConfigError(f"text_encoder {spec!r}: neither 'minilm', 'table:FILE' nor a saved text-encoder directory")
    return load_text_encoder(spec)


def check_model_dir(path: str, what: str) -> Path:
    if not Path(path).is_dir() or not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{what} {path}: not a saved model directory (config.json missing)")
    return Path(path)


def latent_model_dir(path: str, what: str) -> Path:
    """An ``autoencoder``/``decoder`` option: a saved model, or a snapgen model directory (its
    encoder or its decoder), so a run can continue from a shipped model with nothing else."""
    if (Path(path) / MODEL_INDEX).is_file():
        try:
            return encoder_dir(path) if what == "autoencoder" else check_model_dir(str(Path(path) / "decoder"), what)
        except ModelDirectoryError as e:
            raise ConfigError(f"{what}: {e}") from None
    return check_model_dir(path, what)


class ClassEmbedding(nn.Module):
    """Class-conditional training (the paper's ImageNet stage) through the text interface.

    Each class (plus one learned "no class" entry for classifier-free guidance, index
    ``num_classes``) owns ``num_tokens`` learned tokens for the cross-attention and a pooled
    vector, so the U-Net is conditioned exactly as with text and its weights carry over to the
    text-conditional fine-tuning.
    """

    def __init__(self, num_classes: int, token_dim: int, pooled_dim: int | None, num_tokens: int = 1):
        super().__init__()
        self.num_classes = num_classes
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, num_tokens, token_dim) * 0.02)
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, pooled_dim) * 0.02) if pooled_dim else None

    def forward(self, labels: torch.Tensor) -> TextEmbeddings:
        tokens = self.tokens[labels]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TextEmbeddings(tokens=tokens, mask=mask, pooled=None if self.pooled is None else self.pooled[labels])


class CachedLatents(Dataset):
    """Precomputed latents (+ caption ids into the text table); items like a ``TrainingView``'s."""

    def __init__(
        self, latents: torch.Tensor, captions: list[str], labels: list[int] | None, text_ids: list[int] | None
    ):
        self.latents, self.captions, self.labels, self.text_ids = latents, captions, labels, text_ids

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index = key[0] if isinstance(key, tuple) else key
        item = {"latents": self.latents[index], "caption": self.captions[index], "index": index}
        if self.labels is not None:
            item["label"] = self.labels[index]
        if self.text_ids is not None:
            item["text_id"] = self.text_ids[index]
        return item


def _save_latent_cache(path: Path, latents: torch.Tensor, captions: list[str], labels: list[int] | None) -> None:
    metadata = {"captions": json.dumps(captions), "labels": json.dumps(labels)}
    data = save({"latents": latents.contiguous()}, metadata=metadata)
    # Another stage reading the same data may be writing it too: the last one wins, whole.
    write_file_atomically(path, lambda f: f.write(data))


def _load_latent_cache(path: Path) -> tuple[torch.Tensor, list[str], list[int] | None]:
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    return load_file(path)["latents"], json.loads(metadata["captions"]), json.loads(metadata["labels"])


class FlowInputs:
    def __init__(
        self,
        autoencoder: str,
        text_encoder: str | None,
        device: torch.device,
        cache: str = "auto",
        cache_max_gb: float = 2.0,
    ):
        self.device = device
        self.autoencoder_dir = latent_model_dir(autoencoder, "autoencoder")
        self.encoder = load_encoder(self.autoencoder_dir).to(device)
        self.latent_channels = int(self.encoder.model.config.latent_channels)
        self.factor = latent_factor(self.encoder.model)
        self.text_encoder = build_text_encoder(text_encoder).to(device) if text_encoder else None
        self.cache, self.cache_max_bytes = cache, int(cache_max_gb * 2**30)
        self.text_table: TextEmbeddings | None = None
        self.empty_text_id: int | None = None

    # -- caching ------------------------------------------------------------------------------
    def cache_path(self, folder: Path, data_identity: dict[str, Any]) -> Path:
        """Where the latents of the data ``data_identity`` describes, encoded by this autoencoder, are saved."""
        key = {"autoencoder": weight_files(self.autoencoder_dir), "data": data_identity}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return folder / f"latents-{digest}.safetensors"

    def prepare(
        self,
        dataset: Dataset,
        resolution: int,
        num_workers: int = 0,
        progress: bool = True,
        cache_file: Path | None = None,
    ) -> Dataset:
        """Return ``dataset``, or its precomputed latents when caching applies (see module doc);
        ``cache_file`` (see :meth:`cache_path`) is read if it exists and written otherwise."""
        if self.cache == "off":
            return dataset
        cacheable = isinstance(dataset, TrainingView) and dataset.deterministic
        if not cacheable:
            if self.cache == "on":
                raise ConfigError("cache: on needs a folder or shapes dataset without random_crop/random_flip")
            return dataset
        side = resolution // self.factor
        nbytes = len(dataset) * self.latent_channels * side * side * 4
        if self.cache == "auto" and nbytes > self.cache_max_bytes:
            return dataset
        if cache_file is not None and cache_file.is_file():
            latents, captions, labels = _load_latent_cache(cache_file)
            if len(captions) == len(dataset):
                text_ids = self._cache_text(captions) if self.text_encoder is not None else None
                return CachedLatents(latents, captions, labels, text_ids)
        latents, captions, labels = [], [], []
        # Its own generator: a loader otherwise draws its base seed from torch's global RNG, and a
        # cache built after a resume would then shift every later random draw.
        loader = DataLoader(dataset, batch_size=CACHE_CHUNK, num_workers=num_workers, collate_fn=collate,
                            generator=torch.Generator())
        with torch.no_grad():
            for batch in tqdm(loader, desc=f"caching latents at {resolution}px", disable=not progress, leave=False):
                # On the CPU: the training loader's worker processes index this cache and cannot touch CUDA.
                latents.append(self.encode_pixels(batch["pixels"]).cpu())
                captions += batch["captions"]
                if "labels" in batch:
                    labels += batch["labels"].tolist()
        latents = torch.cat(latents)
        if cache_file is not None:
            _save_latent_cache(cache_file, latents, captions, labels or None)
        text_ids = self._cache_text(captions) if self.text_encoder is not None else None
        return CachedLatents(latents, captions, labels or None, text_ids)

    def _cache_text(self, captions: list[str]) -> list[int] | None:
        """Encode each distinct caption (and "" for dropout) once; None if they don't fit."""
        unique = sorted(set(captions) | {""})
        enc = self.text_encoder
        per_caption = 4 * (enc.max_length * enc.token_dim + (enc.pooled_dim or 0))
        if self.cache == "auto" and len(unique) * per_caption > self.cache_max_bytes:
            self.text_table = None
            return None
        with torch.no_grad():
            chunks = [enc.encode(unique[i : i + CACHE_CHUNK]) for i in range(0, len(unique), CACHE_CHUNK)]
        self.text_table = TextEmbeddings(
            tokens=torch.cat([c.tokens for c in chunks]).to(self.device),
            mask=torch.cat([c.mask for c in chunks]).to(self.device),
            pooled=None if chunks[0].pooled is None else torch.cat([c.pooled for c in chunks]).to(self.device),
        )
        row = {caption: i for i, caption in enumerate(unique)}
        self.empty_text_id = row[""]
        return [row[c] for c in captions]

    # -- per batch ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> normalised diffusion latents (float32)."""
        z = self.encoder.encode(pixels.to(self.device, self.encoder.dtype))
        return self.encoder.to_diffusion(z).float()

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.device, non_blocking=True).float()
        return self.encode_pixels(batch["pixels"])

    def _dropped(self, n: int, p: float) -> torch.Tensor:
        # Always draw, even at p = 0, so every configuration consumes the RNG alike.
        return torch.rand(n) < p

    def text(self, batch: dict[str, Any], drop_prob: float = 0.0) -> TextEmbeddings:
        """The batch's caption embeddings, each replaced by the empty prompt with ``drop_prob``."""
        dropped = self._dropped(len(batch["captions"]), drop_prob)
        if self.text_table is not None and "text_ids" in batch:
            ids = batch["text_ids"].to(self.device).clone()
            ids[dropped.to(self.device)] = self.empty_text_id
            return self.text_table.select(ids)
        captions = ["" if d else c for c, d in zip(batch["captions"], dropped.tolist())]
        return self.encode_prompts(captions)

    def labels(self, batch: dict[str, Any], null_label: int, drop_prob: float = 0.0) -> torch.Tensor:
        """The batch's class labels, each replaced by ``null_label`` with ``drop_prob``."""
        labels = batch["labels"].to(self.device).clone()
        labels[self._dropped(len(labels), drop_prob).to(self.device)] = null_label
        return labels

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> TextEmbeddings:
        return self.text_encoder.encode(prompts).to(device=self.device)
