"""The phone's generation loop, written once against the bundle manifest, for any predictor.

This is the reference for the Swift side: everything it needs comes from ``manifest.json``
(input names, the timesteps for the step count, guidance, the noise spec). The loop is the
server's (``snapgen.sampling.sample_euler`` + ``guided``) in float32 numpy, in the same order of
operations, so with a predictor that reproduces PyTorch exactly it reproduces the server's
latents bit for bit:

    x = noise(seed, latent_shape)                              # snapgen.noise / docs/noise-spec.md
    for i in 0 ..< steps:
        t, t_next = T[i], T[i + 1]                             # manifest.sampler.timesteps[steps]
        v = U(x, t)                                            # g == 1: one call
        v = v_u + g * (v_c - v_u)                              # g != 1: conditional and "" prompt
        x = x + float32(t_next - t) * v                        # float32; the difference in float64
    image = D(x)                                               # decoder takes diffusion latents

A predictor is ``predict(component, {input name: array}) -> {output name: array}``:
Core ML's ``MLModel.predict`` on macOS, onnxruntime sessions on Linux (``mobile_export.parity``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Predict = Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class RunResult:
    input_ids: np.ndarray
    attention_mask: np.ndarray
    tokens: np.ndarray
    pooled: np.ndarray | None
    noise: np.ndarray
    velocity0: np.ndarray  # the (guided) velocity of the first step
    latents: np.ndarray  # final diffusion latents (1, C, h, w)
    image: np.ndarray  # decoder output (1, 3, H, W) in [-1, 1]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8, exactly as ``snapgen.pipeline.to_uint8``."""
    import torch

    from snapgen.pipeline import to_uint8 as server_to_uint8

    return server_to_uint8(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)))[0]


def encode_text(manifest: dict, predict: Predict, input_ids: np.ndarray, attention_mask: np.ndarray):
    out = predict("text_encoder", {"input_ids": input_ids, "attention_mask": attention_mask})
    tokens = np.asarray(out["tokens"], dtype=np.float32)
    pooled = np.asarray(out["pooled"], dtype=np.float32) if "pooled" in out else None
    return tokens, pooled


def run(
    manifest: dict,
    predict: Predict,
    tokenize: Callable[[str], tuple[np.ndarray, np.ndarray]],
    prompt: str,
    seed: int,
    steps: int,
    guidance_scale: float | None = None,
    negative_prompt: str = "",
) -> RunResult:
    """Generate one image the way the phone does, from the manifest alone."""
    from snapgen.noise import randn

    sampler = manifest["sampler"]
    guidance = float(sampler["guidance_scale"] if guidance_scale is None else guidance_scale)
    times = sampler["timesteps"].get(str(steps))
    if times is None:
        raise ValueError(f"the bundle has no timesteps for {steps} steps (1..{sampler['max_steps']})")
    unet_inputs = {spec["name"] for spec in manifest["components"]["unet"]["inputs"]}

    ids, mask = tokenize(prompt)
    tokens, pooled = encode_text(manifest, predict, ids, mask)
    if guidance != 1.0:
        n_ids, n_mask = tokenize(negative_prompt)
        n_tokens, n_pooled = encode_text(manifest, predict, n_ids, n_mask)

    def unet(x, t, tok, m, pool):
        feed = {
            "sample": x,
            "timestep": np.full((1,), t, dtype=np.float32),
            "encoder_hidden_states": tok,
            "encoder_attention_mask": m.astype(np.float32),
        }
        if "pooled_projections" in unet_inputs:
            feed["pooled_projections"] = pool
        return np.asarray(predict("unet", feed)["velocity"], dtype=np.float32)

    shape = tuple(manifest["latent_shape"])
    noise = randn(seed, shape)[None]
    x = noise
    velocity0 = None
    for i in range(steps):
        t, t_next = float(times[i]), float(times[i + 1])
        v = unet(x, t, tokens, mask, pooled)
        if guidance != 1.0:
            v_u = unet(x, t, n_tokens, n_mask, n_pooled)
            v = v_u + np.float32(guidance) * (v - v_u)
        if velocity0 is None:
            velocity0 = v
        x = (x + np.float32(t_next - t) * v).astype(np.float32)
    image = np.asarray(predict("decoder", {"latents": x})["image"], dtype=np.float32)
    return RunResult(ids, mask, tokens, pooled, noise, velocity0, x, image)


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Apple's parity metric: 20 log10(max|ref| / RMSE) in dB (inf when identical)."""
    ref = np.asarray(reference, dtype=np.float64)
    err = np.sqrt(np.mean((ref - np.asarray(test, dtype=np.float64)) ** 2))
    if err == 0:
        return float("inf")
    peak = np.max(np.abs(ref))
    return float(20 * np.log10(peak / err)) if peak > 0 else float("-inf")
