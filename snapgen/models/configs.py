"""Named U-Net configs: the paper's model, the embedded default, and the paper's ablation ladder.

``snapgen-379m`` -- the paper's text-to-image U-Net. Stated by the paper: 3 stages, widths
256/512/896, transformer depth 0/2/4 plus cross-attention + FFN blocks in the first stage,
self-attention only at the lowest resolution, expanded separable convolutions (ratio 2), FFN
ratio 3, one key/value head, QK-RMSNorm and 2-D RoPE, 16-channel latents at factor 8 (1024 px
-> 128x128). Our choices where the paper is silent, and why:

* ``layers_per_block=(1, 1, 2)`` (down 1/1/2, up 2/2/3 ResBlocks, each followed by its stage's
  transformer): the paper gives no count. At 1024 px a weight in the first stage (128x128) runs on
  16x as many positions as one in the last (32x32), and every first- and second-stage ResBlock
  brings a CA + FFN transformer at 16384 / 4096 tokens with it; the paper itself moves work away
  from high resolution (self-attention only at the lowest one) and speaks of the first stage's
  residual block in the singular. SDXL's 2/2/2 (the ladder keeps it up to its last step) costs
  1.437 TFLOPs per 1024-px step at 379.5 M parameters, only 4.7x fewer than SDXL's 6.761 T; one
  ResBlock in the two high-resolution stages and the parameters moved to the lowest resolution
  (the mid block, below) cut that by 12 % at the same size.
* ``attention_head_dim=64``: SDXL's and most public reimplementations' head size; it divides all
  three widths (4/8/14 heads). With one key/value head it barely matters for cost: attention
  FLOPs are ``4 * queries * keys * width`` whatever the split.
* ``mid_transformer_depth=5``: the paper gives no mid-block depth; with every other setting fixed,
  the mid block (ResBlock + 5 transformer blocks + ResBlock, at 32x32) is where the remaining
  parameters are cheapest per FLOP, and depth 5 lands the count at 378.0 M (4 gives 367.2 M,
  below 379 M - 3 %; 6 gives 388.9 M and 5.26x).
* ``ffn_activation="geglu"``, inner width 3x: SDXL's FFN with the paper's ratio 4 -> 3. "Expansion
  ratio" is the inner width for a gated FFN too, and the paper's "about -12 % params and FLOPs"
  for that step is what GEGLU x4 -> GEGLU x3 gives on the ladder (-11 % / -11 %); switching to a
  plain GELU in the same step would give -22 %, and GELU on both sides -9 %.
* ``cross_attention_dim=2304``: the merged text embedding's width; each encoder (CLIP-L 768,
  CLIP-G 1280, Gemma-2-2b 2304) is projected to Gemma's width, so Gemma's tokens keep their
  full width (see ``snapgen.text.MergedTextEncoder``).
* ``pooled_projection_dim=2048``: CLIP-L's and CLIP-G's pooled embeddings concatenated
  (768 + 1280), added to the timestep embedding as in SDXL; Gemma has no pooled output.

Resulting size and cost (``snapgen info --config snapgen-379m``; FLOPs from ``FlopCounterMode``
as in ``bench/bench_efficiency.py``, one step at 1024 px with 282 text tokens): 378.0 M
parameters, 1.259 TFLOPs per step, 5.37x fewer than diffusers' SDXL U-Net (6.761 T at 128x128x4).

``snapgen-shapes`` -- the embedded default: the same code path at 16x16x4 latents (128 px) with
the packaged all-MiniLM-L6-v2 text encoder (384-d tokens, 384-d pooled sentence embedding).

The ladder (``LADDER``) rebuilds the paper's Table of design steps, each config one switch
further from SDXL than the previous one, on SDXL's layout of 2 ResBlocks per stage (with a mid
depth of 3, which lands that layout at 379.5 M); its last step is our layout choice above, so the
ladder ends at ``snapgen-379m`` and shows what that choice buys on its own.
"""

from __future__ import annotations

import copy

import torch

from .unet import SnapGenUNet

SNAPGEN_379M = dict(
    sample_size=128,
    in_channels=16,
    out_channels=16,
    block_out_channels=(256, 512, 896),
    layers_per_block=(1, 1, 2),
    transformer_depth=(1, 2, 4),
    self_attention=(False, False, True),
    mid_transformer_depth=5,
    attention_head_dim=64,
    num_kv_heads=1,
    cross_attention_dim=2304,
    pooled_projection_dim=2048,
    separable_conv=True,
    conv_expansion=2,
    ffn_mult=3.0,
    ffn_activation="geglu",
    qk_norm=True,
    rope=True,
)

SNAPGEN_SHAPES = dict(
    SNAPGEN_379M,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 192),
    layers_per_block=1,
    transformer_depth=(1, 1, 2),
    mid_transformer_depth=1,
    attention_head_dim=32,
    cross_attention_dim=384,
    pooled_projection_dim=384,
)

# Only for tests and the CLI's random-model helper: the smallest model that still has every block.
SNAPGEN_TINY = dict(
    SNAPGEN_SHAPES,
    block_out_channels=(32, 64),
    transformer_depth=(1, 1),
    self_attention=(False, True),
    attention_head_dim=16,
)

# SDXL's U-Net (2.57 B): widths 320/640/1280, 2 ResBlocks per stage, depth 0/2/10, mid depth 10,
# full convs, GEGLU x4, multi-head self-attention wherever there is a transformer. Latent/text
# sizes match SnapGen's so that every ladder step changes the U-Net alone.
SDXL_LIKE = dict(
    SNAPGEN_379M,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_depth=(0, 2, 10),
    self_attention=(True, True, True),
    mid_transformer_depth=10,
    num_kv_heads=None,
    separable_conv=False,
    conv_expansion=1,
    ffn_mult=4.0,
    qk_norm=False,
    rope=False,
)


def _ladder() -> list[tuple[str, dict]]:
    steps = [("sdxl-like", SDXL_LIKE)]

    def step(name: str, **changes):
        steps.append((name, dict(steps[-1][1], **changes)))

    step("snapgen widths 256/512/896, depth 0/2/4",
         block_out_channels=(256, 512, 896), transformer_depth=(0, 2, 4), mid_transformer_depth=3)
    step("self-attention only at lowest res", self_attention=(False, False, True))
    step("separable convs", separable_conv=True, conv_expansion=1)
    step("expanded separable convs (x2)", conv_expansion=2)
    step("FFN ratio 4 -> 3", ffn_mult=3.0)
    step("multi-query attention", num_kv_heads=1)
    step("first-stage CA + FFN", transformer_depth=(1, 2, 4))
    step("QK-RMSNorm + 2-D RoPE", qk_norm=True, rope=True)
    step("ResBlocks 2/2/2 -> 1/1/2, mid depth 3 -> 5", layers_per_block=(1, 1, 2), mid_transformer_depth=5)
    assert steps[-1][1] == SNAPGEN_379M, "the ladder must end at snapgen-379m"
    return steps


UNET_CONFIGS: dict[str, dict] = {
    "snapgen-379m": SNAPGEN_379M,
    "snapgen-shapes": SNAPGEN_SHAPES,
    "snapgen-tiny": SNAPGEN_TINY,
    "sdxl-like": SDXL_LIKE,
}
LADDER: list[tuple[str, dict]] = _ladder()


def unet_config(name: str) -> dict:
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown U-Net config {name!r}; choose one of {sorted(UNET_CONFIGS)}")
    return copy.deepcopy(UNET_CONFIGS[name])


def build_unet(name_or_config: str | dict, device: str | torch.device | None = None) -> SnapGenUNet:
    """Instantiate a U-Net; ``device="meta"`` allocates no weights (for counting and FLOPs)."""
    config = unet_config(name_or_config) if isinstance(name_or_config, str) else dict(name_or_config)
    with torch.device(device or "cpu"):
        return SnapGenUNet(**config)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
