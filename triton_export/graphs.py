"""The three Triton models as ``nn.Module``\\ s over plain tensors, batch-first: what the python backend runs and
what ``torch.onnx.export`` traces.

Each wraps the very modules and methods the in-process pipeline runs, so the numbers are the server's:

* text encoder: :meth:`TextEncoder.encode` after tokenizing, i.e. each part's ``_forward(ids, mask)`` and,
  for a merged encoder, its projections and concatenations (the worker tokenizes and builds the mask);
* U-Net and decoder: ``mobile_export.graphs.UNetGraph`` / ``DecoderGraph`` (one U-Net call; diffusion
  latents -> image in [-1, 1]).

Inputs are positional in the order of ``triton_export.interface.tensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mobile_export.graphs import DecoderGraph, UNetGraph


class TextEncoderGraph(nn.Module):
    """``(input_ids, attention_mask) per part -> tokens (B, L, D)[, pooled (B, P)]``, as ``encode`` computes them."""

    def __init__(self, encoder, with_pooled: bool):
        from snapgen.text import MergedTextEncoder

        super().__init__()
        merged = isinstance(encoder, MergedTextEncoder)
        self.parts = nn.ModuleList(list(encoder.encoders) if merged else [encoder])
        self.projections = encoder.projections if merged else None
        self.with_pooled = with_pooled

    def forward(self, *ids_and_masks: torch.Tensor):
        tokens, pooled = [], []
        for i, part in enumerate(self.parts):
            ids, mask = ids_and_masks[2 * i].long(), ids_and_masks[2 * i + 1].long()
            t, p = part._forward(ids, mask)
            if self.projections is not None:  # MergedTextEncoder.encode, step by step
                weight = self.projections[i].weight
                t = self.projections[i](t.to(device=weight.device, dtype=weight.dtype))
                if p is not None:
                    p = p.to(device=weight.device, dtype=weight.dtype)
            tokens.append(t)
            if p is not None:
                pooled.append(p)
        merged = self.projections is not None
        out_tokens = torch.cat(tokens, dim=1) if merged else tokens[0]
        if not self.with_pooled:
            return (out_tokens,)
        if not pooled:
            raise ValueError("the U-Net reads a pooled text embedding, but this text encoder has none")
        return out_tokens, torch.cat(pooled, dim=-1) if merged else pooled[0]


def build(component: str, pipeline_or_parts, with_pooled: bool) -> nn.Module:
    """The graph of ``component`` around an already loaded module (``unet``, ``decoder`` or ``text_encoder``)."""
    if component == "text_encoder":
        return TextEncoderGraph(pipeline_or_parts, with_pooled).eval()
    if component == "unet":
        return UNetGraph(pipeline_or_parts, with_pooled).eval()
    if component == "decoder":
        return DecoderGraph(pipeline_or_parts).eval()
    raise ValueError(f"unknown component {component!r}")


def load_component(component: str, directory: str | Path, device: str | torch.device, with_pooled: bool) -> nn.Module:
    """Load one component directory (as a model directory holds it) and wrap it: the python backend's model."""
    directory = Path(directory)
    if component == "unet":
        from snapgen.models import SnapGenUNet

        module = SnapGenUNet.from_pretrained(directory, use_safetensors=True)
    elif component == "decoder":
        from snapgen.models.autoencoder import load_decoder

        module = load_decoder(directory)
    elif component == "text_encoder":
        from snapgen.text import load_text_encoder

        module = load_text_encoder(directory)
    else:
        raise ValueError(f"unknown component {component!r}")
    return build(component, module, with_pooled).to(device)
