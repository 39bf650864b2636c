"""Named U-Net configs: the paper's model, the embedded default, and the paper's ablation ladder.

``snapgen-379m`` -- the paper's text-to-image U-Net. Stated by the paper: 3 stages, widths
256/512/896, transformer depth 0/2/4 plus cross-attention + FFN blocks in the first stage,
self-attention only at the lowest resolution, expanded separable convolutions (ratio 2), FFN
ratio 3, one key/value head, QK-RMSNorm and 2-D RoPE, 16-channel latents at factor 8 (1024 px
-> 128x128). Our choices where the paper is silent, and why:

* ``layers_per_block=2`` (3 ResBlocks per decoder stage): SDXL's layout, which the paper starts
  from and never says it changed.
* ``attention_head_dim=64``: SDXL's and most public reimplementations' head size; it divides all
  three widths (4/8/14 heads).
* ``mid_transformer_depth=3``: the paper gives no mid-block depth. With every stated setting
  fixed, a mid block of ResBlock + 3 transformer blocks + ResBlock is what lands the count at
  379.5 M (depth 4 gives 390 M, 2 gives 369 M).
* ``ffn_activation="geglu"``: SDXL's FFN, so the ladder's "ratio 4 -> 3" step changes one number.
* ``cross_attention_dim=2304``: the merged text embedding's width; each encoder (CLIP-L 768,
  CLIP-G 1280, Gemma-2-2b 2304) is projected to Gemma's width, so Gemma's tokens keep their
  full width (see ``snapgen.text.MergedTextEncoder``).
* ``pooled_projection_dim=2048``: CLIP-L's and CLIP-G's pooled embeddings concatenated
  (768 + 1280), added to the timestep embedding as in SDXL; Gemma has no pooled output.

``snapgen-shapes`` -- the embedded default: the same code path at 16x16x4 latents (128 px) with
the packaged all-MiniLM-L6-v2 text encoder (384-d tokens, 384-d pooled sentence embedding).

The ladder (``LADDER``) rebuilds the paper's Table of design steps, each config one switch
further from SDXL than the previous one.
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
    layers_per_block=2,
    transformer_depth=(1, 2, 4),
    self_attention=(False, False, True),
    mid_transformer_depth=3,
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

# SDXL's U-Net (2.57 B): widths 320/640/1280, depth 0/2/10, mid depth 10, full convs, GEGLU x4,
# multi-head self-attention wherever there is a transformer. Latent/text sizes match SnapGen's
# so that every ladder step changes the U-Net alone.
SDXL_LIKE = dict(
    SNAPGEN_379M,
    block_out_channels=(320, 640, 1280),
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
