"""Model directories: where the default model lives, and how a pipeline is saved and loaded.

Layout (diffusers-style)::

    model_index.json            # pipeline and component classes (diffusers' format), resolutions, latent factor
    unet/                       # SnapGenUNet: config.json + diffusion_pytorch_model.safetensors
    decoder/                    # TinyDecoder | SmallAutoencoder | AutoencoderKL | AutoencoderTiny
    text_encoder/               # config.json (+ merge.safetensors for merged encoders)
    scheduler/                  # scheduler_config.json (steps, guidance, shift, distilled times)
    autoencoder/                # optional: the autoencoder the U-Net's latents come from, when the
                                # decoder cannot encode (a TinyDecoder): fine-tuning needs it

Saving writes into a temporary sibling directory and renames it into place, so a crash never
leaves a half-written model behind.

Importing this module is cheap (no torch, diffusers or transformers): a command reads a directory's
JSON (:func:`read_model_card`) and rejects a bad request before it loads anything. The model code is
imported by the functions that need it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .request import ModelCard

if TYPE_CHECKING:
    import torch

    from .models.unet import SnapGenUNet
    from .pipeline import SnapGenPipeline
    from .sampling import SamplerConfig
    from .text import TextEncoder

MODEL_INDEX = "model_index.json"
# The model index's ``_class_name``: what ``diffusers.DiffusionPipeline.from_pretrained`` resolves, as an
# attribute of the diffusers module, once ``snapgen.diffusers_pipeline`` is imported (see docs/diffusers.md).
DIFFUSERS_PIPELINE_CLASS = "SnapGenDiffusionPipeline"
COMPONENTS = ("unet", "decoder", "text_encoder", "scheduler")
AUTOENCODER = "autoencoder"  # optional component
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "snapgen-shapes"


class ModelDirectoryError(FileNotFoundError):
    pass


def default_model_dir() -> Path:
    """The embedded default model (``SNAPGEN_MODEL`` overrides it)."""
    override = os.environ.get("SNAPGEN_MODEL")
    return Path(override).resolve() if override else DEFAULT_MODEL_DIR


def latent_factor(decoder_model: torch.nn.Module) -> int:
    """Pixels per latent cell along each side, from a decoder or autoencoder's config."""
    cfg = decoder_model.config
    name = type(decoder_model).__name__
    if name == "TinyDecoder":
        return int(cfg.upsample_factor)
    if name == "SmallAutoencoder":
        return int(cfg.downsample_factor)
    if name == "AutoencoderTiny":
        return int(cfg.upsampling_scaling_factor)
    if name == "AutoencoderKL":
        return 2 ** (len(cfg.block_out_channels) - 1)
    raise ValueError(f"cannot tell the latent factor of a {name}")


def check_model_dir(directory: str | Path) -> Path:
    directory = Path(directory)
    if not (directory / MODEL_INDEX).is_file():
        raise ModelDirectoryError(f"{directory} is not a snapgen model directory: {MODEL_INDEX} is missing")
    missing = [c for c in COMPONENTS if not (directory / c).is_dir()]
    if missing:
        raise ModelDirectoryError(
            f"model directory {directory} is missing component(s) {', '.join(missing)}; "
            f"a model directory needs {', '.join(COMPONENTS)}"
        )
    return directory


def read_model_index(directory: str | Path) -> dict:
    return json.loads((check_model_dir(directory) / MODEL_INDEX).read_text())


# What a light reader fills in where a JSON file leaves a key out: SamplerConfig's defaults and each
# text encoder's default max_length (tests keep them equal to the classes').
SAMPLER_DEFAULTS = {"default_steps": 28, "max_steps": 50, "guidance_scale": 1.0}
TOKEN_LENGTH_DEFAULTS = {"minilm": 32, "clip": 77, "gemma2": 128}


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelDirectoryError(f"{what} is missing: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _token_lengths(config, where: Path) -> list[int]:
    leaves = config.get("kwargs", {}).get("encoders", []) if config.get("type") == "merged" else [config]
    lengths = []
    for i, leaf in enumerate(leaves):
        kind = leaf.get("type") if isinstance(leaf, dict) else None
        if kind not in TOKEN_LENGTH_DEFAULTS:
            allowed = ", ".join(sorted(TOKEN_LENGTH_DEFAULTS))
            raise ValueError(f"{where}: encoder {i} has unknown type {kind!r}; allowed: {allowed}")
        lengths.append(int(leaf.get("kwargs", {}).get("max_length", TOKEN_LENGTH_DEFAULTS[kind])))
    return lengths


def read_model_card(directory: str | Path, id: str | None = None) -> ModelCard:
    """The directory's :class:`~snapgen.request.ModelCard` (what ``ModelCard.from_model_dir`` gives) from its
    JSON files alone: no torch, no model code, so a request can be checked in milliseconds before a load."""
    directory = Path(directory)
    index = read_model_index(directory)
    scheduler = _read_json(directory / "scheduler" / "scheduler_config.json", "the scheduler config")
    sampler = {**SAMPLER_DEFAULTS, **{k: v for k, v in scheduler.items() if k in SAMPLER_DEFAULTS}}
    text_file = directory / "text_encoder" / "config.json"
    factor = int(index["latent_factor"])
    sizes = index.get("resolutions")
    if not sizes:
        side = _read_json(directory / "unet" / "config.json", "the U-Net config")["sample_size"] * factor
        sizes = [(side, side)]
    return ModelCard(
        id=id or directory.resolve().name,
        sizes=tuple(tuple(s) for s in sizes),
        default_steps=int(sampler["default_steps"]),
        max_steps=int(sampler["max_steps"]),
        guidance_scale=float(sampler["guidance_scale"]),
        distilled_steps=tuple(int(s) for s in scheduler.get("distilled_timesteps") or {}),
        max_prompt_tokens=sum(_token_lengths(_read_json(text_file, "the text-encoder config"), text_file)),
        latent_factor=factor,
    )


def encoder_dir(directory: str | Path) -> Path:
    """The folder holding the encoder of a model directory's latent space: its ``autoencoder/``,
    or its decoder when that is a whole autoencoder. What training reads to continue from a model."""
    from .models.autoencoder import ENCODER_CLASSES, latent_class_name

    directory = check_model_dir(directory)
    for folder in (directory / AUTOENCODER, directory / "decoder"):
        if (folder / "config.json").is_file() and latent_class_name(folder) in ENCODER_CLASSES:
            return folder
    raise ModelDirectoryError(
        f"model directory {directory} has no encoder: its decoder cannot encode and it has no "
        f"{AUTOENCODER}/ folder; give the autoencoder it was trained with"
    )


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file_atomically(path: Path, write) -> Path:
    """``write(binary_file)`` into a temporary sibling of ``path``, then rename it into place, so
    readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_atomically(path: Path, fill) -> Path:
    """Build a directory with ``fill(tmp)`` in a temporary sibling, then rename it into place
    (replacing an old one), so a crash never leaves a half-written directory behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes a 0700 directory
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_component(model, path: Path) -> None:
    """``save_pretrained`` (safetensors) without ``_name_or_path``: diffusers records where
    ``from_pretrained`` read the model, a local path that means nothing in a shipped directory.

    Weights that fp16 holds exactly (the default's, which ships in fp16) are written in fp16: half
    the bytes and the same values. It also keeps a saved copy's pictures bit for bit its source's:
    ``from_pretrained`` memory-maps an fp32 file but copies an fp16 one into fresh memory, and the
    CPU kernels round differently on weights at different byte alignments."""
    model.save_pretrained(path, safe_serialization=True)
    if _exact_in_fp16(model):
        _rewrite_in_fp16(Path(path) / "diffusion_pytorch_model.safetensors")
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _exact_in_fp16(model) -> bool:
    """Whether every float32 weight is on the fp16 grid (decided in memory; stops at the first that is not)."""
    import torch

    floats = [t for t in model.state_dict().values() if t.dtype == torch.float32]
    return bool(floats) and all(torch.equal(t.half().float(), t) for t in floats)


def _rewrite_in_fp16(weights: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(weights, "pt") as f:
        metadata, names = f.metadata(), f.keys()
        tensors = {k: f.get_tensor(k) for k in names}
    half = {k: t.half() if t.dtype == torch.float32 else t for k, t in tensors.items()}
    tmp = weights.with_name(weights.name + ".tmp")
    save_file(half, tmp, metadata=metadata)
    tmp.replace(weights)


def component_entry(component) -> list[str]:
    """``[library, class]`` naming a component in ``model_index.json``, as diffusers' own ``save_pretrained``
    records it: ``diffusers``/``transformers`` for their classes, else the module that defines the class.
    diffusers' loader looks the class up in that module (imported by the caller, never by diffusers) and
    checks it against the base classes found beside it."""
    module = type(component).__module__
    library = module.split(".")[0]
    return [library if library in ("diffusers", "transformers") else module, type(component).__name__]


def save_model(
    directory: str | Path,
    unet: SnapGenUNet,
    decoder_model: torch.nn.Module,
    text_encoder: TextEncoder,
    sampler: SamplerConfig,
    resolutions: list[tuple[int, int]] | None = None,
    overwrite: bool = False,
    autoencoder: torch.nn.Module | None = None,
) -> Path:
    """Write a complete model directory atomically. ``decoder_model`` is the raw ModelMixin;
    ``autoencoder`` (optional) the one the latents came from, kept so the model can be fine-tuned."""
    from .text import save_text_encoder

    directory = Path(directory).resolve()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True (CLI: --force) to replace it")

    def fill(tmp: Path) -> None:
        save_component(unet, tmp / "unet")
        save_component(decoder_model, tmp / "decoder")
        if autoencoder is not None:
            save_component(autoencoder, tmp / AUTOENCODER)
        save_text_encoder(text_encoder, tmp / "text_encoder")
        sampler.save(tmp / "scheduler")
        factor = latent_factor(decoder_model)
        native = unet.config.sample_size * factor
        index = {
            "_class_name": DIFFUSERS_PIPELINE_CLASS,
            "_diffusers_version": importlib.metadata.version("diffusers"),
            "_snapgen_version": __version__,
            "unet": component_entry(unet),
            "decoder": component_entry(decoder_model),
            "text_encoder": component_entry(text_encoder),
            "scheduler": component_entry(sampler),
            **({AUTOENCODER: component_entry(autoencoder)} if autoencoder is not None else {}),
            "latent_factor": factor,
            "resolutions": [list(r) for r in (resolutions or [(native, native)])],
        }
        (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    return write_atomically(directory, fill)


@contextlib.contextmanager
def _no_weight_loading_bars():
    """transformers draws a "Loading weights" bar per checkpoint; a pipeline load is one step to its
    caller, whose own progress (a sampling bar) is the one to show."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def load_pipeline(
    directory: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> SnapGenPipeline:
    """Load a model directory (the embedded default when ``directory`` is None); ``dtype``: float32 if None.

    Imports only the classes the directory names (diffusers' autoencoders only for such a decoder)."""
    import torch

    from .models.autoencoder import load_decoder
    from .models.unet import SnapGenUNet
    from .pipeline import SnapGenPipeline
    from .sampling import SamplerConfig
    from .text import load_text_encoder

    dtype = torch.float32 if dtype is None else dtype
    directory = Path(directory) if directory is not None else default_model_dir()
    index = read_model_index(directory)
    # Loaded in their final dtype: casting afterwards with .to(dtype) is what diffusers warns about.
    unet = SnapGenUNet.from_pretrained(directory / "unet", use_safetensors=True, torch_dtype=dtype)
    decoder = load_decoder(directory / "decoder", torch_dtype=dtype)
    with _no_weight_loading_bars():
        text_encoder = load_text_encoder(directory / "text_encoder")
    sampler = SamplerConfig.load(directory / "scheduler")
    pipeline = SnapGenPipeline(
        unet,
        decoder,
        text_encoder,
        sampler,
        latent_factor=int(index["latent_factor"]),
        resolutions=[tuple(r) for r in index.get("resolutions", [])] or None,
    )
    pipeline.model_dir = directory.resolve()
    return pipeline.to(device=device)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weight_files(directory: str | Path) -> dict[str, str]:
    """sha256 of every weight file in the model directory, keyed by relative path."""
    directory = Path(directory)
    return {str(path.relative_to(directory)): file_sha256(path) for path in sorted(directory.rglob("*.safetensors"))}


def provenance(directory: str | Path) -> tuple[str, str | None]:
    """What saved images name their model by: the directory's name and the sha256 of its U-Net weights.

    The hash is read once per weights file (while its size and modification time stay the same): a
    command that checks an image's model and then saves images with it pays for one pass over the file.
    """
    directory = Path(directory).resolve()
    weights = sorted((directory / "unet").glob("*.safetensors"))
    if len(weights) != 1:
        return directory.name, None
    stat = weights[0].stat()
    return directory.name, _cached_sha256(str(weights[0]), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def describe_model(directory: str | Path) -> dict:
    """What ``snapgen info --model`` prints: path, params per component, configs, weight hashes."""
    from .sampling import SAMPLER_CONFIG_NAME

    directory = check_model_dir(directory).resolve()
    pipeline = load_pipeline(directory)
    params = {
        "unet": sum(p.numel() for p in pipeline.unet.parameters()),
        "decoder": sum(p.numel() for p in pipeline.decoder.parameters()),
        "text_encoder": sum(p.numel() for p in pipeline.text_encoder.parameters()),
    }
    return {
        "model_dir": str(directory),
        "unet_params": params["unet"],
        "decoder_params": params["decoder"],
        "params": params,
        "model_index": read_model_index(directory),
        "config": {
            "unet": dict(pipeline.unet.config),
            "decoder": dict(pipeline.decoder.model.config) if hasattr(pipeline.decoder.model, "config") else {},
            "text_encoder": json.loads((directory / "text_encoder" / "config.json").read_text()),
            "scheduler": json.loads((directory / "scheduler" / SAMPLER_CONFIG_NAME).read_text()),
        },
        "sha256": weight_files(directory),
    }
