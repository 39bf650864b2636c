"""``verify --on-device``: run the bundle with Core ML's ``predict`` against its golden outputs.

macOS only: ``MLModel.predict`` (and compiling an .mlpackage) needs the Core ML framework, which
coremltools can only call on macOS. The loop is ``mobile_export.runner.run``, the same code the
Linux parity check drives with onnxruntime, so the Swift app has one reference to follow.

Checks per golden case: the bundled tokenizer gives the manifest's ``input_ids``; the portable
noise has the manifest's checksum; text tokens, the first velocity, the final latent and the image
reach PSNR >= 35 dB against the golden files (fp16 on the Neural Engine is not bit-exact, so
exact checksums are only required of the noise and of the tokenizer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import PSNR_THRESHOLD_DB
from .graphs import COMPONENTS


def check_on_device(root: Path, manifest: dict, report, log=print) -> None:  # pragma: no cover (macOS)
    import io

    from PIL import Image
    from transformers import AutoTokenizer

    from snapgen.noise import noise_checksum

    from .coreml import import_coremltools
    from .runner import psnr, run, to_uint8

    ct = import_coremltools()
    models = {
        c: ct.models.MLModel(str(root / manifest["components"][c]["file"]), compute_units=ct.ComputeUnit.ALL)
        for c in COMPONENTS
    }

    def predict(component, feeds):
        return models[component].predict(feeds)

    tokenizer = AutoTokenizer.from_pretrained(str(root / manifest["tokenizer"]["directory"]), local_files_only=True)
    max_length = manifest["tokenizer"]["max_length"]

    def tokenize(prompt):
        batch = tokenizer([prompt], padding="max_length", max_length=max_length, truncation=False, return_tensors="np")
        return batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)

    bad = 0
    for i, case in enumerate(manifest["golden"]):
        files = {k: (root / v).read_bytes() for k, v in case["files"].items()}
        result = run(manifest, predict, tokenize, case["prompt"], case["seed"], case["steps"], case["guidance_scale"])
        if result.input_ids[0].tolist() != case["input_ids"]:
            bad += 1
            report.fail(f"on-device case {i}: the bundled tokenizer gives other ids than the manifest")
        if noise_checksum(result.noise) != case["initial_noise_sha256"]:
            bad += 1
            report.fail(f"on-device case {i}: initial noise checksum differs from the manifest")
        golden_image = np.asarray(Image.open(io.BytesIO(files["image"])).convert("RGB"), dtype=np.float32)
        values = {
            "tokens": psnr(np.frombuffer(files["tokens"], "<f4"), result.tokens.reshape(-1)),
            "velocity0": psnr(np.frombuffer(files["velocity0"], "<f4"), result.velocity0.reshape(-1)),
            "final_latent": psnr(np.frombuffer(files["final_latent"], "<f4"), result.latents.reshape(-1)),
            "image": psnr(golden_image, to_uint8(result.image).astype(np.float32)),
        }
        for key, value in values.items():
            report.numbers[f"case{i}.coreml.{key}"] = value
            if not value >= PSNR_THRESHOLD_DB:
                bad += 1
                report.fail(f"on-device case {i} {key}: PSNR {value:.1f} dB < {PSNR_THRESHOLD_DB:.0f} dB")
    if not bad:
        report.good("on-device: Core ML predict reproduces every golden case (PSNR >= 35 dB, exact noise and ids)")
