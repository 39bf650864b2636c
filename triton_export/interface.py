"""The three Triton models of a snapgen model: names, tensors and ``config.pbtxt``, from the model's JSON configs.

Shared by the exporter (which writes the configs) and the worker's Triton backend (which sends the
tensors), so both sides agree by construction. Shapes are per item; Triton adds the batch dimension
(``max_batch_size`` > 0):

=====================  ================================================  =================================
model                  inputs                                            outputs
=====================  ================================================  =================================
snapgen_text_encoder   ``input_ids``, ``attention_mask`` INT64 [L]        ``tokens`` FP32 [L, D],
                       (``_0``, ``_1``, ... per part of a merged encoder)  ``pooled`` FP32 [P] if the U-Net
                                                                          reads one
snapgen_unet           ``sample`` FP32 [C, h, w], ``timestep`` FP32 [1]   ``velocity`` FP32 [C, h, w]
                       (reshaped to a scalar), ``encoder_hidden_states``
                       FP32 [L, D], ``encoder_attention_mask`` BOOL [L],
                       ``pooled_projections`` FP32 [P] (if any)
snapgen_decoder        ``latents`` FP32 [C, h, w] (diffusion latents)     ``image`` FP32 [3, H, W] in [-1, 1]
=====================  ================================================  =================================

``h``/``w`` are -1 (any size) for the python backend; an ONNX graph is traced at the model's one latent
size (its RoPE tables are constants), so there they are fixed. Token lengths are fixed: encoders pad to
``max_length``.

Each config carries two parameters: ``snapgen_component`` (which module the python backend loads) and
``snapgen_fingerprint``, a digest of the configs that fix the interface and the sampling (U-Net,
decoder, text encoder, latent factor, sizes), which the worker compares with its own model directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

COMPONENTS = ("text_encoder", "unet", "decoder")
MODEL_NAMES = {"text_encoder": "snapgen_text_encoder", "unet": "snapgen_unet", "decoder": "snapgen_decoder"}
BACKENDS = ("python", "onnx")
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
MAX_BATCH_SIZE = 1024
NUMPY_DTYPES = {"FP32": "float32", "INT64": "int64", "BOOL": "bool"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton's name without TYPE_: FP32, INT64, BOOL
    dims: tuple[int, ...]  # per item; -1 = any
    scalar: bool = False  # dims [1] reshaped to [] (a per-item scalar, e.g. the flow time)


@dataclass(frozen=True)
class ModelShapes:
    """What the interface depends on, read from a model directory's JSON configs (no weights)."""

    latent_channels: int
    latent_factor: int
    resolutions: tuple[tuple[int, int], ...]
    text_lengths: tuple[int, ...]  # max_length of each text encoder part
    text_width: int  # the U-Net's cross_attention_dim
    pooled_width: int | None  # the U-Net's pooled_projection_dim
    fingerprint: str

    @property
    def latent_sizes(self) -> set[tuple[int, int]]:
        return {(h // self.latent_factor, w // self.latent_factor) for h, w in self.resolutions}


def _config(path: Path) -> dict:
    # Keys starting with "_" record library versions and class names; a re-save must not change the digest.
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def read_shapes(model_dir: str | Path) -> ModelShapes:
    from snapgen.model_dir import read_model_index
    from snapgen.text import token_lengths

    model_dir = Path(model_dir)
    index = read_model_index(model_dir)
    unet = _config(model_dir / "unet" / "config.json")
    factor = int(index["latent_factor"])
    native = int(unet["sample_size"]) * factor
    resolutions = tuple(tuple(int(x) for x in r) for r in (index.get("resolutions") or [[native, native]]))
    digest = {
        "unet": unet,
        "decoder": _config(model_dir / "decoder" / "config.json"),
        "text_encoder": json.loads((model_dir / "text_encoder" / "config.json").read_text()),
        "latent_factor": factor,
        "resolutions": resolutions,
    }
    fingerprint = hashlib.sha256(json.dumps(digest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return ModelShapes(
        latent_channels=int(unet["in_channels"]),
        latent_factor=factor,
        resolutions=resolutions,
        text_lengths=tuple(token_lengths(model_dir / "text_encoder")),
        text_width=int(unet["cross_attention_dim"]),
        pooled_width=int(unet["pooled_projection_dim"]) if unet.get("pooled_projection_dim") else None,
        fingerprint=fingerprint,
    )


def text_input_names(parts: int) -> list[tuple[str, str]]:
    """``(input_ids, attention_mask)`` names of each text encoder part."""
    if parts == 1:
        return [("input_ids", "attention_mask")]
    return [(f"input_ids_{i}", f"attention_mask_{i}") for i in range(parts)]


def tensors(component: str, shapes: ModelShapes, latent_size: tuple[int, int] | None = None):
    """``(inputs, outputs)`` of one model; ``latent_size`` fixes h and w (None: any)."""
    c = shapes.latent_channels
    h, w = latent_size or (-1, -1)
    length = sum(shapes.text_lengths)
    if component == "text_encoder":
        inputs = []
        for (ids, mask), n in zip(text_input_names(len(shapes.text_lengths)), shapes.text_lengths, strict=True):
            inputs += [TensorSpec(ids, "INT64", (n,)), TensorSpec(mask, "INT64", (n,))]
        outputs = [TensorSpec("tokens", "FP32", (length, shapes.text_width))]
        if shapes.pooled_width:
            outputs.append(TensorSpec("pooled", "FP32", (shapes.pooled_width,)))
        return inputs, outputs
    if component == "unet":
        inputs = [
            TensorSpec("sample", "FP32", (c, h, w)),
            TensorSpec("timestep", "FP32", (1,), scalar=True),
            TensorSpec("encoder_hidden_states", "FP32", (length, shapes.text_width)),
            TensorSpec("encoder_attention_mask", "BOOL", (length,)),
        ]
        if shapes.pooled_width:
            inputs.append(TensorSpec("pooled_projections", "FP32", (shapes.pooled_width,)))
        return inputs, [TensorSpec("velocity", "FP32", (c, h, w))]
    if component == "decoder":
        f = shapes.latent_factor
        pixels = (-1, -1) if latent_size is None else (h * f, w * f)
        return [TensorSpec("latents", "FP32", (c, h, w))], [TensorSpec("image", "FP32", (3, *pixels))]
    raise ValueError(f"unknown component {component!r}; choose one of {', '.join(COMPONENTS)}")


def _tensor_block(spec: TensorSpec) -> str:
    lines = [
        "  {",
        f'    name: "{spec.name}"',
        f"    data_type: TYPE_{spec.dtype}",
        f"    dims: [ {', '.join(str(d) for d in spec.dims)} ]",
    ]
    if spec.scalar:
        lines.append("    reshape: { shape: [ ] }")
    lines.append("  }")
    return "\n".join(lines)


def config_pbtxt(
    component: str,
    shapes: ModelShapes,
    backend: str,
    max_batch_size: int,
    instance_kind: str,
    latent_size: tuple[int, int] | None = None,
) -> str:
    """The model configuration (protobuf text format) of one of the three models."""
    inputs, outputs = tensors(component, shapes, latent_size)
    head = [f'name: "{MODEL_NAMES[component]}"']
    if backend == "python":
        head.append('backend: "python"')
    else:
        head += ['backend: "onnxruntime"', 'default_model_filename: "model.onnx"']
    head.append(f"max_batch_size: {max_batch_size}")
    parameters = {"snapgen_component": component, "snapgen_fingerprint": shapes.fingerprint}
    return (
        "\n".join(head)
        + "\ninput [\n" + ",\n".join(_tensor_block(s) for s in inputs) + "\n]"
        + "\noutput [\n" + ",\n".join(_tensor_block(s) for s in outputs) + "\n]"
        + f"\ninstance_group [\n  {{\n    count: 1\n    kind: {INSTANCE_KINDS[instance_kind]}\n  }}\n]"
        + "\ndynamic_batching { }\n"
        + "".join(
            f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in parameters.items()
        )
    )  # fmt: skip
