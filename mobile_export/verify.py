"""``snapgen export verify BUNDLE --model DIR``: is this bundle the server's model?

Always (Linux and macOS):

1. **Files**: every file in the zip is listed in ``manifest.json`` with its sha256 and size, and
   every listed file is there with that hash (a corrupted download or an edited file fails,
   naming the file).
2. **Source**: the sha256 of the model directory's safetensors (and of MiniLM's) equal the
   ones the bundle was exported from.
3. **Weights**: every constant that stands for a checkpoint tensor is read back out of each
   .mlpackage (``MLModel(skip_model_load=True)`` + ``get_weights_metadata``, no Core ML runtime)
   and compared with the server checkpoint: bit-identical to the float32 tensor for fp32 bundles,
   to the fp16 tensor that the server's fp16 mode loads (``load_pipeline(dtype=float16)``,
   i.e. ``tensor.half()``) for fp16 bundles; palettized tensors must reproduce the fp16 tensor
   to within the SNR their bit width allows (:data:`PALETTE_MIN_SNR_DB`). Every tensor of the
   checkpoint must be accounted for (stored, or listed as never read by the graph). A mismatch
   names the tensor, the Core ML constant and the file.
4. **Interface and specs**: the model descriptions' inputs/outputs equal the manifest's; the
   manifest's timesteps and noise golden vectors equal what ``snapgen.sampling`` and
   ``snapgen.noise`` compute now.

``--numerics`` (Linux): onnxruntime vs PyTorch per component and end to end, PSNR >= 35 dB
(``mobile_export.parity``), and the golden outputs recomputed with the server pipeline.
``--on-device`` (macOS only): Core ML's ``predict`` runs the bundle against its golden outputs.
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .bundle import (
    FORMAT,
    MANIFEST,
    PSNR_THRESHOLD_DB,
    ExportError,
    model_identity,
    read_manifest,
    safe_extract,
    sha256_bytes,
    text_encoder_source,
)
from .graphs import COMPONENTS

# Minimum per-tensor SNR (dB) of a palettized weight against its fp16 value. k-means on n bits
# gives roughly 6 dB per bit on Gaussian-like weights; these floors leave ~5 dB of margin and
# still catch a tensor palettized from other weights (SNR near 0 dB).
PALETTE_MIN_SNR_DB = {4: 12.0, 6: 22.0, 8: 32.0}


@dataclass
class Report:
    bundle: Path
    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def good(self, message: str) -> None:
        self.passed.append(message)


def verify_bundle(
    bundle: str | Path,
    model_dir: str | Path,
    numerics: bool = False,
    on_device: bool = False,
    log=print,
) -> Report:
    bundle = Path(bundle)
    model_dir = Path(model_dir)
    if on_device and sys.platform != "darwin":
        raise ExportError(
            "--on-device runs Core ML's predict, which exists only on macOS (coremltools on Linux "
            "can convert and read models but not run them); on Linux use --numerics, which checks "
            "the same traced graphs with onnxruntime"
        )
    if not bundle.is_file():
        raise ExportError(f"{bundle}: no such bundle")
    try:
        zf = zipfile.ZipFile(bundle)
    except zipfile.BadZipFile as e:
        raise ExportError(f"{bundle}: not a zip file ({e})") from None
    report = Report(bundle)
    with zf, tempfile.TemporaryDirectory(prefix="snapgen-verify-") as tmp:
        manifest = read_manifest(zf)
        if manifest.get("format") != FORMAT:
            raise ExportError(f"{bundle}: not a snapgen Core ML bundle (format {manifest.get('format')!r})")
        check_files(zf, manifest, report)
        root = Path(tmp)
        safe_extract(zf, root)
        from snapgen.model_dir import load_pipeline

        pipeline = load_pipeline(model_dir)
        check_source(model_dir, pipeline, manifest, report)
        stored = check_weights(root, manifest, model_dir, pipeline, report)
        check_interfaces(root, manifest, report)
        check_specs(pipeline, manifest, report)
        if numerics:
            check_numerics(pipeline, manifest, root, stored, report, log)
        if on_device:
            from .device import check_on_device

            check_on_device(root, manifest, report, log)
    return report


# ------------------------------------------------------------------------------------------


def check_files(zf: zipfile.ZipFile, manifest: dict, report: Report) -> None:
    listed = manifest.get("files", {})
    present = {i.filename for i in zf.infolist() if not i.is_dir()} - {MANIFEST}
    for name in sorted(set(listed) - present):
        report.fail(f"file {name}: listed in the manifest but missing from the bundle")
    for name in sorted(present - set(listed)):
        report.fail(f"file {name}: in the bundle but not listed in the manifest")
    bad = 0
    for name in sorted(present & set(listed)):
        data = zf.read(name)
        digest = sha256_bytes(data)
        if digest != listed[name]["sha256"] or len(data) != listed[name]["size"]:
            bad += 1
            report.fail(
                f"file {name}: sha256 {digest[:16]}... ({len(data)} bytes) differs from the manifest's "
                f"{listed[name]['sha256'][:16]}... ({listed[name]['size']} bytes)"
            )
    if not bad and present == set(listed):
        report.good(f"files: {len(listed)} files match their sha256 in the manifest")


def check_source(model_dir: Path, pipeline, manifest: dict, report: Report) -> None:
    _, _, digests = model_identity(model_dir)
    _, text_digests = text_encoder_source(pipeline.text_encoder)
    now = {**digests, **text_digests}
    then = manifest["model"]["source_safetensors_sha256"]
    differ = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
    for key in differ:
        report.fail(
            f"source {key}: sha256 in the bundle {str(then.get(key))[:16]}... but the model directory has "
            f"{str(now.get(key))[:16]}... (exported from another checkpoint?)"
        )
    if not differ:
        report.good(f"source: the {len(then)} safetensors files the bundle came from are the model directory's")


def expected_state(pipeline, fp16_pipeline, component: str, precision: str) -> dict[str, np.ndarray]:
    """The tensors the server runs with in ``precision`` (fp16: what load_pipeline(dtype=fp16) loads)."""
    from .coreml import expected_array

    if component == "text_encoder":
        # The server keeps its text encoder in float32 even in fp16 mode; the phone's fp16 copy
        # is that float32 checkpoint rounded the way ``tensor.half()`` rounds.
        state = pipeline.text_encoder.model.state_dict()
        return {k: expected_array(v, precision) for k, v in state.items()}
    source = fp16_pipeline if precision == "fp16" else pipeline
    module = source.unet if component == "unet" else source.decoder.model
    return {k: expected_array(v, precision) for k, v in module.state_dict().items()}


def _snr(reference: np.ndarray, test: np.ndarray) -> float:
    ref = reference.astype(np.float64).reshape(-1)
    err = np.sum((ref - test.astype(np.float64).reshape(-1)) ** 2)
    power = np.sum(ref**2)
    if err == 0:
        return float("inf")
    return float(10 * np.log10(power / err)) if power > 0 else float("-inf")


def check_weights(root: Path, manifest: dict, model_dir: Path, pipeline, report: Report) -> dict:
    from snapgen.model_dir import load_pipeline

    from .coreml import read_weights

    precision = manifest["precision"]
    fp16_pipeline = load_pipeline(model_dir, dtype=torch.float16) if precision == "fp16" else None
    stored_all = {}
    for component in COMPONENTS:
        entry = manifest["components"][component]
        package = entry["file"]
        try:
            stored = read_weights(root / package)
        except Exception as e:  # a damaged package: protobuf or blob errors of any kind
            report.fail(f"file {package}: cannot read its weights ({type(e).__name__}: {e})")
            continue
        stored_all[component] = stored
        expected = expected_state(pipeline, fp16_pipeline, component, precision)
        mapping = entry["weights"]
        unused = set(entry.get("unused_weights", []))
        bad = 0
        for key in sorted(set(expected) - set(mapping) - unused):
            bad += 1
            report.fail(f"{component} tensor {key}: in the server checkpoint but not in {package}")
        for key in sorted(set(mapping) - set(expected)):
            bad += 1
            report.fail(f"{component} tensor {key}: in {package} but not in the server checkpoint")
        worst_snr = float("inf")
        exact = 0
        for key in sorted(set(mapping) & set(expected)):
            where = mapping[key]
            const = where["const"]
            if const not in stored:
                bad += 1
                report.fail(f"{component} tensor {key}: its Core ML const {const!r} is missing from {package}")
                continue
            got = np.asarray(stored[const].value)
            want = expected[key]
            if "rows" in where:
                want = want[np.asarray(where["rows"], dtype=np.int64)]
            label = f"{component} tensor {key} (Core ML const {const!r} in {package})"
            if got.size != want.size:
                bad += 1
                report.fail(f"{label}: {got.size} values stored, the checkpoint has {want.size}")
                continue
            if stored[const].palettized:
                bits = stored[const].nbits
                snr = _snr(want.astype(np.float32), got.astype(np.float32))
                worst_snr = min(worst_snr, snr)
                floor = PALETTE_MIN_SNR_DB.get(bits, 0.0)
                if not snr >= floor:
                    bad += 1
                    report.fail(
                        f"{label}: {bits}-bit palette reproduces the checkpoint at {snr:.1f} dB SNR, "
                        f"below the {floor:.0f} dB floor"
                    )
                continue
            if got.dtype != want.dtype:
                bad += 1
                report.fail(f"{label}: stored as {got.dtype}, the {precision} checkpoint is {want.dtype}")
                continue
            a, b = got.reshape(-1), want.reshape(-1)
            same = a.view(np.uint8).reshape(a.size, -1) == b.view(np.uint8).reshape(b.size, -1)
            differing = int(np.count_nonzero(~same.all(axis=1)))
            if differing:
                bad += 1
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
                report.fail(
                    f"{label}: {differing} of {a.size} values differ from the server checkpoint "
                    f"(max |diff| {np.nanmax(diff):.3g})"
                )
            else:
                exact += 1
        if not bad:
            extra = f"; palettized ones >= {worst_snr:.1f} dB SNR" if worst_snr < float("inf") else ""
            report.good(
                f"weights: {component}: {len(mapping)} tensors read back from {package}, {exact} bit-identical "
                f"to the server's {precision} checkpoint{extra}"
                + (f" ({len(unused)} never read by the graph: {', '.join(sorted(unused))})" if unused else "")
            )
            if worst_snr < float("inf"):
                report.numbers[f"weights.{component}.min_palette_snr_db"] = worst_snr
    return stored_all


def _spec_io(package: Path) -> tuple[list[dict], list[dict]]:
    from .coreml import _quiet_stdio, import_coremltools

    ct = import_coremltools()
    with _quiet_stdio():
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    data_types = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType

    def describe(features):
        return [
            {
                "name": f.name,
                "shape": [int(d) for d in f.type.multiArrayType.shape],
                "dtype": data_types.Name(f.type.multiArrayType.dataType).lower(),
            }
            for f in features
        ]

    return describe(spec.description.input), describe(spec.description.output)


def check_interfaces(root: Path, manifest: dict, report: Report) -> None:
    bad = 0
    for component in COMPONENTS:
        entry = manifest["components"][component]
        try:
            inputs, outputs = _spec_io(root / entry["file"])
        except Exception as e:
            bad += 1
            report.fail(f"file {entry['file']}: cannot read its model description ({type(e).__name__}: {e})")
            continue
        for kind, have, want in (("inputs", inputs, entry["inputs"]), ("outputs", outputs, entry["outputs"])):
            if have != want:
                bad += 1
                report.fail(f"{component} {kind}: the model declares {have}, the manifest says {want}")
    if not bad:
        report.good("interfaces: input/output names, shapes and dtypes of every model match the manifest")


def check_specs(pipeline, manifest: dict, report: Report) -> None:
    from .bundle import noise_section, sampler_section

    resolution = manifest["resolution"][0]
    bad = 0
    sampler = sampler_section(pipeline, resolution)
    if sampler["timesteps"] != manifest["sampler"]["timesteps"]:
        differ = [k for k in sampler["timesteps"] if sampler["timesteps"][k] != manifest["sampler"]["timesteps"].get(k)]
        bad += 1
        report.fail(f"sampler: the manifest's timesteps differ from the model's for step counts {differ[:8]}")
    for key in ("guidance_scale", "shift", "default_steps"):
        if sampler[key] != manifest["sampler"][key]:
            bad += 1
            report.fail(f"sampler: manifest {key}={manifest['sampler'][key]!r}, model has {sampler[key]!r}")
    noise = noise_section(tuple(manifest["latent_shape"]), manifest["golden"])
    if noise["golden_vectors"] != manifest["noise"]["golden_vectors"]:
        bad += 1
        report.fail("noise: the manifest's golden vectors differ from what snapgen.noise computes")
    from snapgen.noise import noise_checksum, randn

    for i, case in enumerate(manifest["golden"]):
        got = noise_checksum(randn(case["seed"], tuple(manifest["latent_shape"]))[None])
        if got != case["initial_noise_sha256"]:
            bad += 1
            report.fail(f"golden case {i}: initial noise checksum {got[:16]}... differs from the manifest")
    if not bad:
        report.good("specs: timesteps for 1..max_steps, guidance, shift and the noise golden vectors match the library")


def check_numerics(pipeline, manifest: dict, root: Path, stored: dict, report: Report, log) -> None:
    from .bundle import golden_reference
    from .parity import OnnxPredictor, component_parity, end_to_end, load_bundle_weights

    resolution = manifest["resolution"][0]
    golden_files = {}
    for i, case in enumerate(manifest["golden"]):
        golden_files[i] = {k: (root / v).read_bytes() for k, v in case["files"].items()}
    # 1. The golden outputs are what the server produces now.
    from snapgen.noise import noise_checksum

    bad = 0
    for i, case in enumerate(manifest["golden"]):
        ref = golden_reference(pipeline, case["prompt"], case["seed"], case["steps"], resolution)
        if noise_checksum(ref["latents"]) != case["final_latent_sha256"]:
            bad += 1
            report.fail(f"golden case {i}: the server's final latent now differs from the bundle's")
        if sha256_bytes(ref["png"]) != case["image_sha256"] or ref["png"] != golden_files[i]["image"]:
            bad += 1
            report.fail(f"golden case {i}: the server's PNG now differs from golden/{i}/image.png")
    if not bad:
        report.good(f"golden: the {len(manifest['golden'])} golden cases equal what the server pipeline produces")
    # 2. onnxruntime vs PyTorch on the same traced graphs.
    predictor = OnnxPredictor(pipeline, resolution)
    numbers = {}
    for i, case in enumerate(manifest["golden"]):
        numbers.update(
            {
                f"case{i}.onnx.{k}": v
                for k, v in component_parity(pipeline, predictor, manifest, case, golden_files[i]).items()
            }
        )
        numbers.update({f"case{i}.onnx.{k}": v for k, v in end_to_end(pipeline, predictor, manifest, case).items()})
    # 3. PyTorch with the bundle's own weights (fp16 rounding / palettes) vs the float32 server.
    if manifest["precision"] != "fp32" or manifest.get("palettize_bits"):
        from snapgen.model_dir import load_pipeline

        from .parity import TorchPredictor

        bundle_weights = load_pipeline(pipeline.model_dir)
        load_bundle_weights(bundle_weights, manifest, stored)
        weights_predictor = TorchPredictor(bundle_weights, resolution)
        for i, case in enumerate(manifest["golden"]):
            e2e = end_to_end(pipeline, weights_predictor, manifest, case)
            numbers.update({f"case{i}.bundle_weights.{k}": v for k, v in e2e.items()})
    report.numbers.update(numbers)
    low = {k: v for k, v in numbers.items() if ".onnx." in k and not v >= PSNR_THRESHOLD_DB}
    for key, value in sorted(low.items()):
        report.fail(f"numerics {key}: PSNR {value:.1f} dB < {PSNR_THRESHOLD_DB:.0f} dB")
    if not low:
        worst = min(v for k, v in numbers.items() if ".onnx." in k)
        report.good(
            f"numerics: onnxruntime vs PyTorch, per component and end to end, >= {worst:.1f} dB PSNR "
            f"(threshold {PSNR_THRESHOLD_DB:.0f} dB)"
        )
