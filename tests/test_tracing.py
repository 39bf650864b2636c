"""TorchScript traces of the U-Net (snapgen.tracing) must give the eager U-Net's numbers exactly:
the server traces on CPU while `snapgen generate` does not, and both must write the same PNG."""

import numpy as np
import pytest
import torch

from snapgen.model_dir import load_pipeline
from snapgen.models.configs import build_unet
from snapgen.tracing import TracedUNet


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_unet("snapgen-tiny").eval()


def inputs(unet, batch, size=16, seed=1, with_mask=True):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    sample = torch.randn(batch, c.in_channels, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    tokens = torch.randn(batch, 7, c.cross_attention_dim, generator=g)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[:, 5:] = False
    pooled = torch.randn(batch, c.pooled_projection_dim, generator=g)
    return sample, t, tokens, mask if with_mask else None, pooled


@torch.no_grad()
def test_trace_equals_eager_bit_for_bit_and_is_reused_across_timesteps(unet):
    traced = TracedUNet(unet)
    for seed in (1, 2, 3):  # new noise and timesteps, same signature
        x = inputs(unet, batch=2, seed=seed)
        assert torch.equal(traced(*x), unet(*x).sample)
    assert len(traced) == 1
    x = inputs(unet, batch=3, size=8, with_mask=False)
    assert torch.equal(traced(*x), unet(*x).sample)
    assert len(traced) == 2


@torch.no_grad()
def test_scalar_timestep_is_expanded_like_the_eager_unet(unet):
    sample, _, tokens, mask, pooled = inputs(unet, batch=2)
    traced = TracedUNet(unet)(sample, 0.25, tokens, mask, pooled)
    assert torch.equal(traced, unet(sample, 0.25, tokens, mask, pooled).sample)


@torch.no_grad()
def test_least_recently_used_trace_is_dropped(unet):
    traced = TracedUNet(unet, max_traces=2)
    for batch in (1, 2, 1, 3):
        traced(*inputs(unet, batch))
    assert len(traced) == 2
    assert [key[0][0][0] for key in traced.signatures()] == [1, 3]  # sample's batch size, LRU first


def test_with_gradients_the_eager_unet_runs(unet):
    traced = TracedUNet(unet)
    x = inputs(unet, batch=1)
    sample = x[0].clone().requires_grad_(True)
    out = traced(sample, *x[1:])
    out.sum().backward()
    assert sample.grad is not None and len(traced) == 0


def test_traced_pipeline_makes_the_same_images_as_eager():
    pipe = load_pipeline()
    prompts = ["a red circle to the left of a blue square", "two green triangles"]
    eager = pipe(prompts, seeds=3, output_type="np")
    pipe.enable_unet_tracing()
    traced = pipe(prompts, seeds=3, output_type="np")
    guided = pipe(prompts, seeds=3, guidance_scale=2.0, output_type="np")
    assert len(pipe._traced_unet) == 2  # batch 2, and batch 4 for the guided pass
    pipe.disable_unet_tracing()
    guided_eager = pipe(prompts, seeds=3, guidance_scale=2.0, output_type="np")
    assert torch.equal(traced.latents, eager.latents)
    assert all(np.array_equal(a, b) for a, b in zip(traced.images, eager.images, strict=True))
    assert torch.equal(guided.latents, guided_eager.latents)
