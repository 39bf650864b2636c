"""Core ML conversion of the traced graphs, and reading the weights back out of an .mlpackage.

Conversion: ``ct.convert(traced, convert_to="mlprogram")`` with

* ``minimum_deployment_target``: iOS 18 for graphs with attention (the text encoder and the
  U-Net), so that coremltools emits the fused ``scaled_dot_product_attention`` MIL op instead of
  matmul-softmax-matmul; iOS 17 for the decoder (no attention, so nothing to gain). ``min_ios=17``
  forces iOS 17 everywhere (attention then decomposed).
* ``compute_precision``: fp16 or fp32, inputs and outputs kept float32/int32.
* coremltools' default pass pipeline **minus the passes that fold one constant into another**
  (conv/linear weight-bias-scale-batchnorm fusions, :data:`VALUE_FOLDING_PASSES`). None of them
  fires on our graphs today; removing them guarantees that every checkpoint tensor reaches the
  .mlpackage with its exact values (fp32) or its exact fp16 rounding, which is what
  ``snapgen export verify`` checks. Renaming and reshaping passes stay: the mapping back to
  state-dict names (:func:`map_weights`) copes with those.

Reading back: :func:`read_weights` lists every constant of an .mlpackage on Linux
(``MLModel(path, skip_model_load=True)`` + ``get_weights_metadata(weight_threshold=0)``) and
reassembles palettized weights (``constexpr_lut_to_dense``: ``*_palettized_indices_0`` +
``*_palettized_lut_0``) into dense arrays.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .graphs import ComponentGraph, module_at

VALUE_FOLDING_PASSES = (
    "common::fuse_conv_scale",
    "common::fuse_conv_bias",
    "common::fuse_conv_batchnorm",
    "common::fuse_linear_bias",
    "common::fuse_matmul_weight_bias",
    # Drops ``x * w`` when w is all ones and ``x + b`` when b is all zeros: exact, but then the
    # (identity-valued, e.g. freshly initialised norm) weight is not in the package to compare.
    "common::noop_elimination",
)
PALETTIZE_WEIGHT_THRESHOLD = 2048  # tensors with fewer elements stay fp16/fp32 (norms, biases)
PALETTIZED_COMPONENTS = ("text_encoder", "unet")  # the decoder is tiny and drives the pixels directly


class UnconvertibleOpError(RuntimeError):
    """coremltools could not convert an op; names the op and the module it came from."""

    def __init__(self, component: str, op: str, module_path: str, module_class: str, detail: str):
        self.component, self.op, self.module_path, self.module_class = component, op, module_path, module_class
        super().__init__(
            f"coremltools cannot convert op '{op}' in module '{module_path}' ({module_class}) of the "
            f"{component}: {detail}"
        )


class WeightMappingError(RuntimeError):
    pass


def import_coremltools():
    """Import coremltools quietly (it prints several lines about missing native libraries on Linux)."""
    for name in ("coremltools",):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), _quiet_stdio():
        warnings.simplefilter("ignore")
        import coremltools as ct
        import coremltools.optimize.coreml  # noqa: F401
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    return ct


@contextlib.contextmanager
def _quiet_stdio():
    """Silence coremltools' tqdm bars and import chatter (stderr), keeping our own output."""
    devnull = open(os.devnull, "w")  # noqa: SIM115 (restored below)
    old = sys.stderr
    sys.stderr = devnull
    try:
        yield
    finally:
        sys.stderr = old
        devnull.close()


def has_attention(graph: ComponentGraph) -> bool:
    return any(n.kind() == "aten::scaled_dot_product_attention" for n in graph.traced.graph.nodes())


def deployment_target(graph: ComponentGraph, min_ios: int) -> int:
    return 18 if (min_ios >= 18 and has_attention(graph)) else 17


class _ErrorCapture(logging.Handler):
    """Catch coremltools' "ERROR - converting 'op' op (located at: 'scope')" log record."""

    PATTERN = re.compile(r"converting '([^']+)' op \(located at: '([^']*)'\)")

    def __init__(self):
        super().__init__(logging.ERROR)
        self.op: str | None = None
        self.location: str | None = None

    def emit(self, record):
        match = self.PATTERN.search(record.getMessage())
        if match:
            self.op, self.location = match.group(1), match.group(2)


def _name_values(graph: torch._C.Graph) -> None:
    """Give every anonymous value a textual name: coremltools renumbers purely numeric names
    (``_jit_pass_canonicalize``), which would make its error location unmatchable."""
    torch._C._jit_pass_inline(graph)
    for node in graph.nodes():
        for out in node.outputs():
            if out.debugName().isdigit():
                out.setDebugName(f"v{out.debugName()}")


def _locate(graph: torch._C.Graph, root: torch.nn.Module, location: str | None) -> tuple[str, str]:
    """The torch module (path, class) whose node produced ``location`` ('scope/.../value')."""
    if not location:
        return "<unknown>", "?"
    parts = location.split("/")
    for node in graph.nodes():
        if any(out.debugName() == parts[-1] for out in node.outputs()):
            return module_at(root, node.scopeName())
    path = ".".join(parts[:-1])  # coremltools' own scope names, when they are module paths
    modules = dict(root.named_modules())
    return (path, type(modules[path]).__name__) if path in modules else ("<unknown>", "?")


def convert_traced(
    traced: torch.jit.ScriptModule,
    root: torch.nn.Module,
    inputs: list,
    output_names: list[str],
    component: str,
    precision: str = "fp16",
    ios: int = 18,
):
    """``ct.convert`` with our pipeline; a failing op becomes :class:`UnconvertibleOpError`."""
    ct = import_coremltools()
    ct_inputs = [
        ct.TensorType(name=spec.name, shape=spec.shape, dtype=np.int32 if spec.dtype == "int32" else np.float32)
        for spec in inputs
    ]
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.remove_passes(list(VALUE_FOLDING_PASSES))
    _name_values(traced.graph)
    capture = _ErrorCapture()
    logger = logging.getLogger("coremltools")
    logger.addHandler(capture)
    try:
        with warnings.catch_warnings(), _quiet_stdio(), _plain_fp16_rounding(root):
            warnings.simplefilter("ignore")
            model = ct.convert(
                traced,
                inputs=ct_inputs,
                # float32 outputs even for fp16 models: the app accumulates the Euler update in float32,
                # as the server does.
                outputs=[ct.TensorType(name=n, dtype=np.float32) for n in output_names],
                convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, f"iOS{ios}"),
                compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                pass_pipeline=pipeline,
                skip_model_load=True,
            )
    except Exception as e:  # coremltools raises NotImplementedError, ValueError, TypeError, ...
        if capture.op is None:
            raise
        path, cls = _locate(traced.graph, root, capture.location)
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UnconvertibleOpError(component, capture.op, path, cls, detail) from e
    finally:
        logger.removeHandler(capture)
    return model


@contextlib.contextmanager
def _plain_fp16_rounding(root: torch.nn.Module):
    """Give checkpoint tensors plain IEEE fp16 rounding (= torch's ``tensor.half()``).

    coremltools' fp16 pass bumps values of small constants (< 400 elements) that round to zero
    up to the smallest fp16 subnormal (+-2**-24), to keep epsilons non-zero. For weights that
    makes the bundle differ from what the server's fp16 mode loads (a LayerNorm weight of 1e-33
    becomes 6e-8 instead of 0), so for constants whose float32 bytes are exactly a parameter or
    buffer of ``root`` the adjustment is skipped; every other constant keeps it.
    """
    from coremltools.converters.mil.mil.passes.defs import quantization

    cls = quantization.FP16ComputePrecision
    original = getattr(cls, "_check_underflow_to_zero", None)
    if original is None:  # a coremltools without the adjustment: nothing to undo
        yield
        return
    weights = {
        np.ascontiguousarray(t.detach().float().cpu().numpy()).tobytes()
        for t in list(root.parameters()) + list(root.buffers())
        if t.is_floating_point() and t.numel() < 400
    }

    def check(self, new_var, var):
        val = getattr(var, "val", None)
        if val is not None and np.ascontiguousarray(np.asarray(val, dtype=np.float32)).tobytes() in weights:
            return
        original(self, new_var, var)

    cls._check_underflow_to_zero = check
    try:
        yield
    finally:
        cls._check_underflow_to_zero = original


@dataclass
class Converted:
    component: str
    path: Path
    ios: int
    precision: str
    palettize: int | None
    seconds: float
    mapping: dict[str, dict]  # state-dict key -> const (see map_weights)


def convert_component(
    graph: ComponentGraph,
    out_path: Path,
    precision: str,
    min_ios: int = 18,
    palettize: int | None = None,
) -> Converted:
    """Convert one traced component, map its weights, palettize if asked, save ``out_path``.

    The mapping to state-dict names is made on the converted model *before* palettization, where
    every weight is still bit-identical to the checkpoint; palettization then only renames a
    weight ``W`` to ``W_palettized`` (indices + lookup table).
    """
    start = time.perf_counter()
    ios = deployment_target(graph, min_ios)
    model = convert_traced(
        graph.traced,
        graph.module,
        graph.inputs,
        [o.name for o in graph.outputs],
        graph.name,
        precision,
        ios,
    )
    mapping = map_weights(graph, read_weights(model), precision)
    bits = palettize if graph.name in PALETTIZED_COMPONENTS else None
    if bits:
        model = palettize_model(model, bits)
        stored = read_weights(model)
        for entry in mapping.values():
            if entry["const"] not in stored and entry["const"] + "_palettized" in stored:
                entry["const"] += "_palettized"
                entry["palettized_bits"] = bits
    model.short_description = f"snapgen {graph.name}"
    with warnings.catch_warnings(), _quiet_stdio():
        warnings.simplefilter("ignore")
        model.save(str(out_path))
    return Converted(graph.name, out_path, ios, precision, bits, time.perf_counter() - start, mapping)


def palettize_model(model, bits: int):
    """k-means palettize every weight with >= 2048 elements to ``bits`` bits (one table per tensor).

    What ``ct.optimize.coreml.palettize_weights`` does, except for the clean-up afterwards: the
    public function re-runs coremltools' whole default pass pipeline on the compressed program,
    including the passes this exporter removes (a no-op elimination that drops identity-valued
    weights, the weight-folding fusions). Here the clean-up is coremltools' ``CLEANUP`` pipeline
    minus those passes, so the weights left uncompressed stay bit-identical.
    """
    ct = import_coremltools()
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    cto = ct.optimize.coreml
    config = cto.OptimizationConfig(
        global_config=cto.OpPalettizerConfig(nbits=bits, mode="kmeans", weight_threshold=PALETTIZE_WEIGHT_THRESHOLD)
    )
    palettizer = PASS_REGISTRY["compression::palettize_weights"]
    palettizer.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    cleanup = ct.PassPipeline.CLEANUP
    cleanup.remove_passes([p for p in VALUE_FOLDING_PASSES if p in cleanup.passes])
    spec = model.get_spec()
    with warnings.catch_warnings(), _quiet_stdio():
        warnings.simplefilter("ignore")
        prog = _apply_graph_pass(model, palettizer, return_pymil_prog=True)
        return mil_convert(
            prog,
            convert_to="mlprogram",
            convert_from="milinternal",
            specification_version=spec.specificationVersion,
            compute_units=model.compute_unit,
            model_description=spec.description,
            skip_model_load=True,
            pass_pipeline=cleanup,
        )


# ------------------------------------------------------------------------------------------
# Reading weights back
# ------------------------------------------------------------------------------------------

_INDICES, _LUT, _SHAPE = "_indices_0", "_lut_0", "_shape_0"


@dataclass
class StoredWeight:
    name: str
    value: np.ndarray  # dense (palettized weights reassembled)
    palettized: bool = False
    nbits: int | None = None


def read_weights(mlpackage) -> dict[str, StoredWeight]:
    """Every constant of an .mlpackage path or in-memory MLModel (on Linux; nothing is run).

    A palettized weight is stored as ``W_palettized_indices_0`` + ``W_palettized_lut_0`` (+
    ``W_palettized_shape_0`` in the iOS 16/17 format) feeding ``constexpr_lut_to_dense`` named
    ``W_palettized``; it is returned densely under that name.
    """
    ct = import_coremltools()
    with warnings.catch_warnings(), _quiet_stdio():
        warnings.simplefilter("ignore")
        if isinstance(mlpackage, (str, Path)):
            model = ct.models.MLModel(str(mlpackage), skip_model_load=True)
        else:
            model = mlpackage
        metadata = ct.optimize.coreml.get_weights_metadata(model, weight_threshold=0)
    raw = {name: np.asarray(meta.val) for name, meta in metadata.items()}
    out: dict[str, StoredWeight] = {}
    for name, value in raw.items():
        palette_part = "_palettized_" in name and name.endswith((_INDICES, _LUT, _SHAPE))
        if not palette_part:
            out[name] = StoredWeight(name, value)
            continue
        if not name.endswith(_INDICES):
            continue
        op = name[: -len(_INDICES)]
        lut = raw.get(op + _LUT)
        if lut is None:
            raise WeightMappingError(f"palettized weight {op} has indices but no lookup table")
        if lut.ndim == 1:  # iOS 16/17: flat table, bit-packed indices, explicit shape
            shape = raw.get(op + _SHAPE)
            if shape is None:
                raise WeightMappingError(f"palettized weight {op} has no shape")
            dense = unpack_lut(value, lut, tuple(int(d) for d in shape))
            nbits = int(np.log2(lut.size))
        else:  # iOS 18: tables per block, one index per element
            dense = dequantize_lut(value, lut)
            nbits = int(np.log2(lut.shape[-2]))
        out[op] = StoredWeight(op, dense, palettized=True, nbits=nbits)
    return out


def unpack_lut(packed: np.ndarray, lut: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """iOS 16 ``constexpr_lut_to_dense``: n-bit indices packed LSB first into bytes."""
    nbits = int(np.log2(lut.size))
    count = int(np.prod(shape))
    bits = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: count * nbits].reshape(count, nbits)
    indices = (bits.astype(np.int64) << np.arange(nbits)).sum(axis=1)
    return lut[indices].reshape(shape)


def dequantize_lut(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """iOS 18 ``constexpr_lut_to_dense``: lut shape = (blocks per axis ..., 2**nbits, vector=1)."""
    if lut.ndim != indices.ndim + 2 or lut.shape[-1] != 1:
        raise WeightMappingError(f"unsupported lookup table shape {lut.shape} for indices {indices.shape}")
    block = [d // b for d, b in zip(indices.shape, lut.shape[:-2], strict=True)]
    grids = np.meshgrid(*[np.arange(d) // b for d, b in zip(indices.shape, block, strict=True)], indexing="ij")
    return lut[(*grids, indices.astype(np.int64), 0)]


def expected_array(tensor: torch.Tensor, precision: str) -> np.ndarray:
    """The values a bundle must hold for a checkpoint tensor (fp16: torch's ``tensor.half()``)."""
    t = tensor.detach().cpu()
    if t.is_floating_point():
        return (t.half() if precision == "fp16" else t.float()).numpy()
    return t.to(torch.int32).numpy()


def core_ml_name(prefix: str, key: str) -> str:
    """The const name coremltools gives a parameter it keeps as is: the module path with ``_``."""
    return (prefix + "." + key).replace(".", "_")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.size != b.size:
        return False
    return np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def map_weights(graph: ComponentGraph, stored: dict[str, StoredWeight], precision: str) -> dict[str, dict]:
    """state-dict key -> where its values live in the .mlpackage.

    The rule (documented in docs/mobile.md): a parameter that coremltools keeps as is becomes the
    const ``<module path with '.' -> '_'>`` (+ ``_to_fp16`` when converted to fp16, +
    ``_palettized`` when palettized). Passes that rewrite the op around a weight rename it
    (GroupNorm's affine becomes ``add_N_gamma_0``/``add_N_beta_0`` of a batch_norm, a reshaped
    RMSNorm weight becomes ``const_N``) and ``const_deduplication`` merges equal tensors into one
    const; for those the exporter finds the const holding exactly the expected values (among
    equal candidates one whose name fits the tensor's role, e.g. ``gamma`` for a norm weight, not
    yet taken, first in program order; equal values make any choice correct). Call it before
    palettizing.
    """
    suffixes = ["", "_to_fp16"]
    by_bytes: dict[tuple, list[str]] = {}
    for name, weight in stored.items():
        if weight.palettized:
            continue
        v = np.ascontiguousarray(weight.value)
        by_bytes.setdefault((v.dtype.str, v.size, v.tobytes()), []).append(name)
    mapping: dict[str, dict] = {}
    missing: list[str] = []
    assigned: set[str] = set()
    for key, tensor in graph.state_dict.items():
        if key in graph.unused:
            continue
        expected = np.ascontiguousarray(expected_array(tensor, precision))
        base = core_ml_name(graph.prefix, key)
        found = next((base + s for s in suffixes if base + s in stored), None)
        if found is not None and _same(np.ascontiguousarray(stored[found].value), expected):
            mapping[key] = _entry(found, expected, stored[found])
            continue
        candidates = by_bytes.get((expected.dtype.str, expected.size, expected.tobytes()), [])
        if candidates:
            const = min(candidates, key=lambda name: _preference(key, name, assigned, candidates))
            mapping[key] = _entry(const, expected, stored[const])
            assigned.add(const)
            continue
        gathered = _find_gathered_rows(key, expected, stored)
        if gathered is not None:
            const, rows = gathered
            mapping[key] = {**_entry(const, expected, stored[const]), "rows": rows}
            continue
        missing.append(key)
    if missing:
        shown = ", ".join(missing[:6]) + (", ..." if len(missing) > 6 else "")
        raise WeightMappingError(
            f"{len(missing)} {graph.name} tensor(s) are not stored unchanged in the Core ML model "
            f"(a conversion pass altered them): {shown}"
        )
    return mapping


def _preference(key: str, name: str, assigned: set[str], candidates: list[str]) -> tuple:
    leaf = key.rsplit(".", 1)[-1]
    roles = {"weight": ("gamma", "weight"), "bias": ("beta", "bias")}.get(leaf, (leaf,))
    return (not any(r in name for r in roles), name in assigned, candidates.index(name))


def _find_gathered_rows(key: str, expected: np.ndarray, stored: dict[str, StoredWeight]):
    """A lookup table the graph indexes with constant ids (BERT's position and token-type
    embeddings: positions 0..L-1, token type 0) is folded by coremltools into the gathered rows
    only. Find the const whose rows are all rows of ``expected``; return (const, row indices)."""
    if expected.ndim != 2:
        return None
    owner = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else key
    index = {row.tobytes(): i for i, row in reversed(list(enumerate(expected)))}
    for name, weight in stored.items():
        value = weight.value
        if weight.palettized or owner not in name or value.dtype != expected.dtype:
            continue
        if value.ndim < 2 or value.shape[-1] != expected.shape[1]:
            continue
        rows = [index.get(r.tobytes()) for r in np.ascontiguousarray(value).reshape(-1, expected.shape[1])]
        if rows and all(r is not None for r in rows):
            return name, rows
    return None


def _entry(const: str, expected: np.ndarray, stored: StoredWeight) -> dict:
    return {"const": const, "shape": list(expected.shape)}
