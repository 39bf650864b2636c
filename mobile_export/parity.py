"""Numerical parity on Linux, where Core ML cannot run: the traced graphs through onnxruntime.

Core ML's ``predict`` exists only on macOS. On Linux the same static traced graphs that go to
coremltools (``mobile_export.graphs.trace_component``) are exported to ONNX
(``torch.onnx.export`` of the ScriptModule, opset 17) and run with onnxruntime, then compared
with eager PyTorch:

* per component on the golden inputs (text encoder on the golden prompt's ids, U-Net at the
  golden noise and t_0, decoder on the golden final latent);
* end to end: the manifest-driven phone loop (``mobile_export.runner.run``) with onnxruntime as
  the predictor against the server pipeline, same prompt, seed, steps and portable noise.

This checks the traced graphs (tracing, the static-shape surgery, the phone loop, the manifest's
timesteps and noise); it does not check coremltools' own lowering, which only
``verify --on-device`` on a Mac does. ``weights_from_bundle`` additionally runs PyTorch with the
weights read back out of the .mlpackages (fp16-rounded or palettized), which shows what the
bundle's weight precision alone costs.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch

from .graphs import COMPONENTS, OUTPUT_NAMES, trace_component
from .runner import psnr


def onnx_bytes(graph) -> bytes:
    """The traced graph of a ComponentGraph as an ONNX model (legacy TorchScript exporter)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph.traced,
            graph.example,
            buffer,
            input_names=[s.name for s in graph.inputs],
            output_names=[s.name for s in graph.outputs],
            opset_version=17,
            dynamo=False,
        )
    return buffer.getvalue()


class OnnxPredictor:
    """``predict(component, feeds)`` over onnxruntime sessions of the traced components."""

    def __init__(self, pipeline, resolution: int, components=COMPONENTS):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, min(4, torch.get_num_threads()))
        options.log_severity_level = 3
        self.graphs = {}
        self.sessions = {}
        for component in components:
            graph = trace_component(pipeline, component, resolution)
            self.graphs[component] = graph
            self.sessions[component] = ort.InferenceSession(
                onnx_bytes(graph), options, providers=["CPUExecutionProvider"]
            )

    def __call__(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.sessions[component]
        wanted = {i.name for i in session.get_inputs()}
        outputs = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
        return dict(zip(OUTPUT_NAMES[component], outputs, strict=True))


class TorchPredictor:
    """The same interface over the eager wrappers (optionally with other weights loaded)."""

    def __init__(self, pipeline, resolution: int):
        from .graphs import wrap

        self.modules = {c: wrap(pipeline, c)[0] for c in COMPONENTS}

    def __call__(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        module = self.modules[component]
        names = {
            "text_encoder": ["input_ids", "attention_mask"],
            "unet": ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections"],
            "decoder": ["latents"],
        }[component]
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names if n in feeds]
        with torch.no_grad():
            out = module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {n: t.numpy() for n, t in zip(OUTPUT_NAMES[component], out, strict=True)}


def component_parity(pipeline, predictor, manifest: dict, golden: dict, files: dict) -> dict[str, float]:
    """PSNR of each component's outputs, predictor vs eager PyTorch, on one golden case's inputs."""
    from snapgen.noise import randn

    ids = np.array([golden["input_ids"]], dtype=np.int32)
    mask = np.array([golden["attention_mask"]], dtype=np.int32)
    reference = TorchPredictor(pipeline, manifest["resolution"][0])
    results = {}
    feeds = {"input_ids": ids, "attention_mask": mask}
    ref = reference("text_encoder", feeds)
    got = predictor("text_encoder", feeds)
    for name in ref:
        results[f"text_encoder.{name}"] = psnr(ref[name], got[name])
    times = manifest["sampler"]["timesteps"][str(golden["steps"])]
    feeds = {
        "sample": randn(golden["seed"], tuple(manifest["latent_shape"]))[None],
        "timestep": np.full((1,), times[0], dtype=np.float32),
        "encoder_hidden_states": ref["tokens"],
        "encoder_attention_mask": mask.astype(np.float32),
    }
    if "pooled" in ref:
        feeds["pooled_projections"] = ref["pooled"]
    results["unet.velocity"] = psnr(reference("unet", feeds)["velocity"], predictor("unet", feeds)["velocity"])
    latent = np.frombuffer(files["final_latent"], dtype="<f4").reshape(1, *manifest["latent_shape"])
    feeds = {"latents": latent.astype(np.float32)}
    results["decoder.image"] = psnr(reference("decoder", feeds)["image"], predictor("decoder", feeds)["image"])
    return results


def end_to_end(pipeline, predictor, manifest: dict, golden: dict) -> dict[str, float]:
    """The phone loop with ``predictor`` vs the server pipeline: PSNR of final latents and image."""
    from .graphs import tokenize
    from .runner import run, to_uint8

    resolution = manifest["resolution"][0]
    server = pipeline(
        golden["prompt"],
        seeds=golden["seed"],
        steps=golden["steps"],
        height=resolution,
        width=resolution,
        output_type="np",
    )

    def tok(prompt):
        ids, mask = tokenize(pipeline.text_encoder, prompt)
        return ids.numpy(), mask.numpy()

    phone = run(manifest, predictor, tok, golden["prompt"], golden["seed"], golden["steps"])
    return {
        "end_to_end.latent": psnr(server.latents.numpy(), phone.latents),
        "end_to_end.image": psnr(server.images[0].astype(np.float32), to_uint8(phone.image).astype(np.float32)),
    }


def load_bundle_weights(pipeline, manifest: dict, stored: dict[str, dict]) -> None:
    """Overwrite ``pipeline``'s weights with the ones read from the bundle (in float32)."""
    owners = {
        "text_encoder": pipeline.text_encoder.model,
        "unet": pipeline.unet,
        "decoder": pipeline.decoder.model,
    }
    for component, module in owners.items():
        state = module.state_dict()
        weights = stored[component]
        for key, entry in manifest["components"][component]["weights"].items():
            value = torch.from_numpy(np.asarray(weights[entry["const"]].value, dtype=np.float32).copy())
            if "rows" in entry:
                rows = torch.tensor(entry["rows"])
                state[key][rows] = value.reshape(len(entry["rows"]), -1).to(state[key].dtype)
            else:
                state[key] = value.reshape(state[key].shape).to(state[key].dtype)
        module.load_state_dict(state)
