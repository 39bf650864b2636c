"""``snapgen export triton``: a Triton model repository for the text encoder, the U-Net and the decoder.

Layout (``triton_export.interface`` has the tensors)::

    REPO/snapgen_triton.json                  what was exported from where (Triton ignores plain files here)
    REPO/snapgen_text_encoder/config.pbtxt
    REPO/snapgen_text_encoder/1/model.py      python backend: triton_export/python_model.py ...
    REPO/snapgen_text_encoder/1/text_encoder/ ... and a copy of the component's directory (the repository is
                                              self-contained: it can be copied to the Triton machine alone)
    REPO/snapgen_unet/1/model.onnx            onnx backend: torch.onnx.export, checked against PyTorch
    ...

The sampler loop is not exported: it stays in the worker (``server.triton_backend``), which runs each
Euler step's U-Net call on Triton. The repository is written into a temporary sibling directory and
renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import datetime
import io
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from .interface import BACKENDS, COMPONENTS, INSTANCE_KINDS, MAX_BATCH_SIZE, MODEL_NAMES, config_pbtxt, read_shapes

MANIFEST = "snapgen_triton.json"
MIN_ONNX_PSNR_DB = 35.0


class TritonExportError(ValueError):
    """Bad input or a failed check; the message says what to do."""


def check_arguments(model_dir: Path, out: Path, backend: str, max_batch_size: int, instance_kind: str,
                    force: bool) -> None:  # fmt: skip
    if backend not in BACKENDS:
        raise TritonExportError(f"--backend {backend!r}: unknown; choose one of {', '.join(BACKENDS)}")
    if instance_kind not in INSTANCE_KINDS:
        kinds = ", ".join(INSTANCE_KINDS)
        raise TritonExportError(f"--instance-kind {instance_kind!r}: unknown; choose one of {kinds}")
    if not isinstance(max_batch_size, int) or not 1 <= max_batch_size <= MAX_BATCH_SIZE:
        raise TritonExportError(
            f"--max-batch-size {max_batch_size!r}: must be an integer from 1 to {MAX_BATCH_SIZE} (images per model "
            "call; the worker splits larger batches)"
        )
    if not model_dir.is_dir():
        raise TritonExportError(f"--model {model_dir}: no such directory")
    if not (model_dir / "model_index.json").is_file():
        raise TritonExportError(f"--model {model_dir}: not a snapgen model directory (no model_index.json)")
    if out.exists() and not out.is_dir():
        raise TritonExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise TritonExportError(f"--out {out}: exists and is not empty; choose a new directory or pass --force to "
                                "replace it")  # fmt: skip
    if out.resolve() == model_dir.resolve() or model_dir.resolve().is_relative_to(out.resolve()):
        raise TritonExportError(f"--out {out}: would replace the model directory {model_dir} itself")


def export_triton(
    model_dir: str | Path,
    out: str | Path,
    backend: str = "python",
    max_batch_size: int = 16,
    instance_kind: str = "cpu",
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the repository; returns its path. Raises :class:`TritonExportError` for bad input."""
    from snapgen import __version__
    from snapgen.model_dir import ModelDirectoryError, check_model_dir, weight_files, write_atomically

    model_dir, out = Path(model_dir), Path(out)
    check_arguments(model_dir, out, backend, max_batch_size, instance_kind, force)
    try:
        check_model_dir(model_dir)
        shapes = read_shapes(model_dir)
    except (ModelDirectoryError, FileNotFoundError, ValueError, KeyError) as e:
        raise TritonExportError(f"--model {model_dir}: {e}") from None
    latent_size = None
    if backend == "onnx":
        sizes = sorted(shapes.latent_sizes)
        if len(sizes) != 1:
            raise TritonExportError(
                f"--backend onnx: the ONNX graphs are traced at one latent size, and this model has {len(sizes)} "
                f"sizes ({', '.join(f'{h}x{w}' for h, w in shapes.resolutions)}); use --backend python"
            )
        latent_size = sizes[0]
    external = _external_text_weights(model_dir) if backend == "python" else []
    manifest = {
        "format": "snapgen-triton-repository",
        "format_version": 1,
        "snapgen_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_model": str(model_dir.resolve()),
        "model_name": model_dir.resolve().name,
        "backend": backend,
        "max_batch_size": max_batch_size,
        "instance_kind": instance_kind,
        "fingerprint": shapes.fingerprint,
        "models": {c: MODEL_NAMES[c] for c in COMPONENTS},
        "latent_size": list(latent_size) if latent_size else None,
        "weights_sha256": weight_files(model_dir),
        "external_text_encoder_paths": external,
    }

    def fill(tmp: Path) -> None:
        onnx = _export_onnx(model_dir, shapes, latent_size, log) if backend == "onnx" else {}
        for component in COMPONENTS:
            directory = tmp / MODEL_NAMES[component]
            (directory / "1").mkdir(parents=True)
            text = config_pbtxt(component, shapes, backend, max_batch_size, instance_kind, latent_size)
            (directory / "config.pbtxt").write_text(text)
            if backend == "python":
                shutil.copy(Path(__file__).with_name("python_model.py"), directory / "1" / "model.py")
                shutil.copytree(model_dir / component, directory / "1" / component)
                _check_loads(component, directory / "1" / component, bool(shapes.pooled_width))
            else:
                (directory / "1" / "model.onnx").write_bytes(onnx[component]["bytes"])
        if onnx:
            manifest["onnx_check"] = {c: {k: v for k, v in r.items() if k != "bytes"} for c, r in onnx.items()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    write_atomically(out, fill)
    for path in external:
        log(f"note: the text encoder reads {path}, outside the model directory; it is not copied into the "
            "repository, so it must exist at that path where Triton runs")  # fmt: skip
    log(f"wrote a Triton repository ({backend} backend, max_batch_size {max_batch_size}, {instance_kind}) to {out}")
    return out


def _check_loads(component: str, directory: Path, with_pooled: bool) -> None:
    """Load the copied component as the python backend will, so a broken model fails now, not at Triton's start."""
    from .graphs import load_component

    try:
        load_component(component, directory, "cpu", with_pooled)
    except Exception as e:
        raise TritonExportError(f"the model's {component} does not load: {type(e).__name__}: {e}") from None


def _external_text_weights(model_dir: Path) -> list[str]:
    """Absolute ``path`` entries of the text encoder config (pretrained encoders kept outside the model dir)."""
    config = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    parts = config.get("kwargs", {}).get("encoders", []) if config.get("type") == "merged" else [config]
    return [p["kwargs"]["path"] for p in parts if Path(str(p.get("kwargs", {}).get("path", "."))).is_absolute()]


def _examples(pipeline, shapes, latent_size, batch: int, seed: int) -> dict[str, tuple]:
    """Inputs of the three graphs for ``batch`` items: real prompts, portable noise, flow times."""
    import torch

    from snapgen.noise import randn_tensor
    from snapgen.text import load_tokenizers, tokenize_padded

    prompts = ["a red circle to the left of a blue square", "two green triangles", "", "a yellow star"][:batch]
    prompts += ["a purple square"] * (batch - len(prompts))
    text_inputs = []
    for tokenizer, max_length in load_tokenizers(pipeline.model_dir / "text_encoder"):
        tokens = tokenize_padded(tokenizer, prompts, max_length)
        text_inputs += [tokens["input_ids"], tokens["attention_mask"]]
    text = pipeline.text_encoder.encode(prompts)
    seeds = list(range(seed, seed + batch))
    latents = randn_tensor(seeds, (shapes.latent_channels, *latent_size))
    unet = [latents, torch.linspace(0.9, 0.3, batch), text.tokens.float(), text.mask]
    if shapes.pooled_width:
        unet.append(text.pooled.float())
    return {"text_encoder": tuple(text_inputs), "unet": tuple(unet), "decoder": (latents,)}


def _export_onnx(model_dir: Path, shapes, latent_size, log) -> dict[str, dict]:
    """``torch.onnx.export`` each graph (batch dynamic), then check it with onnxruntime on another batch size."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from mobile_export.runner import psnr
    from snapgen.model_dir import load_pipeline

    from .graphs import build
    from .interface import tensors

    try:
        pipeline = load_pipeline(model_dir)
    except Exception as e:
        raise TritonExportError(f"--model {model_dir} does not load: {type(e).__name__}: {e}") from None
    modules = {"text_encoder": pipeline.text_encoder, "unet": pipeline.unet, "decoder": pipeline.decoder}
    # Traced on batch 2, checked on batch 3: a batch size baked into the graph fails the check.
    traced_on = _examples(pipeline, shapes, latent_size, 2, 0)
    checked_on = _examples(pipeline, shapes, latent_size, 3, 7)
    results = {}
    for component in COMPONENTS:
        graph = build(component, modules[component], bool(shapes.pooled_width))
        inputs, outputs = tensors(component, shapes, latent_size)
        names = [s.name for s in inputs] + [s.name for s in outputs]
        buffer = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python-level shape logic
            torch.onnx.export(
                graph,
                traced_on[component],
                buffer,
                input_names=[s.name for s in inputs],
                output_names=[s.name for s in outputs],
                dynamic_axes={name: {0: "batch"} for name in names},
                opset_version=17,
                dynamo=False,
            )
        data = buffer.getvalue()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        feeds = {s.name: t.numpy() for s, t in zip(inputs, checked_on[component], strict=True)}
        try:
            got = session.run(None, feeds)
        except Exception as e:
            raise TritonExportError(f"the ONNX graph of the {component} does not run on another batch size: {e}") from e
        with torch.no_grad():
            want = graph(*checked_on[component])
        want = want if isinstance(want, tuple) else (want,)
        worst = min(psnr(w.numpy(), g) for w, g in zip(want, got, strict=True))
        err = max(float(np.max(np.abs(w.numpy() - g))) for w, g in zip(want, got, strict=True))
        if worst < MIN_ONNX_PSNR_DB:
            raise TritonExportError(
                f"the ONNX graph of the {component} differs from PyTorch: PSNR {worst:.1f} dB < {MIN_ONNX_PSNR_DB} dB"
            )
        log(f"{MODEL_NAMES[component]}: model.onnx {len(data) / 1e6:.1f} MB, onnxruntime vs PyTorch (batch 3): "
            f"PSNR {worst:.1f} dB, max |error| {err:.2e}")  # fmt: skip
        # JSON has no infinity: identical outputs are recorded as null.
        results[component] = {"bytes": data, "psnr_db": worst if np.isfinite(worst) else None,
                              "max_abs_error": err, "opset": 17}  # fmt: skip
    return results
