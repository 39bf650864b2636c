import json
import math

import pytest
import torch

from snapgen.models.attention import Attention, RMSNorm, apply_rotary, rotary_tables_2d
from snapgen.models.blocks import FeedForward, ResBlock, SpatialTransformer, TransformerBlock
from snapgen.models.configs import LADDER, SNAPGEN_TINY, UNET_CONFIGS, build_unet, count_parameters
from snapgen.models.unet import SnapGenUNet


def _reference_attention(q_proj, k_proj, v_proj, out_proj, x, context, heads, kv_heads, head_dim, bias=None):
    """Per-head loop over the textbook formula softmax(q k^T / sqrt(d) + bias) v."""
    q = q_proj(x)
    k = k_proj(context)
    v = v_proj(context)
    outputs = []
    group = heads // kv_heads
    for h in range(heads):
        kv = h // group
        qh = q[..., h * head_dim : (h + 1) * head_dim]
        kh = k[..., kv * head_dim : (kv + 1) * head_dim]
        vh = v[..., kv * head_dim : (kv + 1) * head_dim]
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(head_dim)
        if bias is not None:
            scores = scores + bias
        outputs.append(scores.softmax(-1) @ vh)
    return out_proj(torch.cat(outputs, dim=-1))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_attention_matches_reference_formula(kv_heads):
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=4, head_dim=8, num_kv_heads=kv_heads, context_dim=24)
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 7, 24)
    bias = torch.zeros(2, 1, 1, 7)
    bias[1, ..., 5:] = -10000.0
    got = attn(x, ctx, attention_bias=bias)
    want = _reference_attention(
        attn.to_q, attn.to_k, attn.to_v, attn.to_out, x, ctx, 4, kv_heads, 8, bias[:, 0]
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_multi_query_attention_has_one_kv_head():
    mqa = Attention(dim=64, num_heads=8, head_dim=8, num_kv_heads=1)
    mha = Attention(dim=64, num_heads=8, head_dim=8)
    assert mqa.to_k.out_features == 8 and mha.to_k.out_features == 64
    assert count_parameters(mqa) < count_parameters(mha)
    with pytest.raises(ValueError, match="multiple"):
        Attention(dim=64, num_heads=8, head_dim=8, num_kv_heads=3)


def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    norm.weight.data = torch.rand(16)
    x = torch.randn(3, 5, 16) * 7
    want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), want)


def test_rope_matches_explicit_pairwise_rotation():
    height, width, d, theta = 3, 5, 16, 10000.0
    cos, sin = rotary_tables_2d(height, width, d, theta)
    x = torch.randn(height * width, d)
    got = apply_rotary(x, cos, sin)
    half, quarter = d // 2, d // 4
    want = torch.empty_like(x)
    for n in range(height * width):
        positions = (n // width, n % width)  # (row, column) in row-major token order
        for axis, pos in enumerate(positions):
            base = axis * half
            for i in range(quarter):
                angle = pos * theta ** (-2 * i / half)
                a, b = x[n, base + i], x[n, base + i + quarter]
                want[n, base + i] = a * math.cos(angle) - b * math.sin(angle)
                want[n, base + i + quarter] = b * math.cos(angle) + a * math.sin(angle)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    """The point of RoPE: <R(p) q, R(p') k> is a function of p - p' alone."""
    torch.manual_seed(0)
    cos, sin = rotary_tables_2d(6, 6, 8)
    q, k = torch.randn(8), torch.randn(8)
    rq = apply_rotary(q.expand(36, 8), cos, sin).view(6, 6, 8)
    rk = apply_rotary(k.expand(36, 8), cos, sin).view(6, 6, 8)
    score = lambda a, b: float(rq[a] @ rk[b])  # noqa: E731
    assert score((1, 2), (0, 0)) == pytest.approx(score((4, 5), (3, 3)), abs=1e-4)
    assert score((0, 3), (2, 1)) == pytest.approx(score((3, 5), (5, 3)), abs=1e-4)
    assert score((1, 2), (0, 0)) != pytest.approx(score((2, 1), (0, 0)), abs=1e-3)


@pytest.mark.parametrize("separable,expansion", [(False, 1), (True, 1), (True, 2)])
def test_resblock_shapes_and_separable_params(separable, expansion):
    block = ResBlock(32, 48, temb_dim=64, separable=separable, expansion=expansion, groups=8)
    out = block(torch.randn(2, 32, 8, 8), torch.randn(2, 64))
    assert out.shape == (2, 48, 8, 8)
    depthwise = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert bool(depthwise) == separable


def test_separable_resblock_is_smaller_than_full():
    full = ResBlock(256, 256, 1024, separable=False)
    expanded = ResBlock(256, 256, 1024, separable=True, expansion=2)
    assert count_parameters(expanded) < 0.6 * count_parameters(full)


@pytest.mark.parametrize("activation", ["gelu", "geglu"])
def test_feedforward_ratio(activation):
    ff = FeedForward(32, 3.0, activation)
    assert ff.proj_out.in_features == 96
    assert ff(torch.randn(2, 5, 32)).shape == (2, 5, 32)


def test_transformer_block_without_self_attention_is_ca_ffn():
    block = TransformerBlock(32, 8, 1, 16, self_attention=False, qk_norm=True, ffn_mult=3, ffn_activation="gelu")
    assert not hasattr(block, "attn1")
    assert block(torch.randn(2, 9, 32), torch.randn(2, 4, 16)).shape == (2, 9, 32)


def test_spatial_transformer_masked_tokens_have_no_effect():
    torch.manual_seed(0)
    st = SpatialTransformer(32, 2, 8, 1, 16, True, True, True, 10000.0, 3.0, "geglu", groups=8).eval()
    x = torch.randn(1, 32, 4, 6)
    ctx = torch.randn(1, 5, 16)
    bias = torch.zeros(1, 1, 1, 5)
    bias[..., 3:] = -10000.0
    changed = ctx.clone()
    changed[:, 3:] = torch.randn(1, 2, 16) * 10
    torch.testing.assert_close(st(x, ctx, bias), st(x, changed, bias))
    assert not torch.allclose(st(x, ctx, None), st(x, changed, None))


def _tiny_inputs(config, batch=2, tokens=7):
    size = 16
    x = torch.randn(batch, config["in_channels"], size, size)
    ctx = torch.randn(batch, tokens, config["cross_attention_dim"])
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[-1, 4:] = False
    pooled = torch.randn(batch, config["pooled_projection_dim"]) if config["pooled_projection_dim"] else None
    return x, torch.rand(batch), ctx, mask, pooled


def _shrink(config: dict) -> dict:
    """A ladder config at toy width: same switches, a few thousand times fewer parameters."""
    stages = len(config["block_out_channels"])
    return dict(
        config,
        block_out_channels=tuple(16 * (i + 1) for i in range(stages)),
        transformer_depth=tuple(min(d, 1) for d in config["transformer_depth"]),
        mid_transformer_depth=1,
        attention_head_dim=8,
        norm_num_groups=8,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=24,
        pooled_projection_dim=12,
        layers_per_block=1,
    )


@pytest.mark.parametrize("name,config", LADDER, ids=[n for n, _ in LADDER])
def test_every_ladder_step_runs(name, config):
    torch.manual_seed(0)
    small = _shrink(config)
    unet = SnapGenUNet(**small).eval()
    x, t, ctx, mask, pooled = _tiny_inputs(small)
    out = unet(x, t, ctx, mask, pooled)
    assert out.sample.shape == x.shape
    assert torch.isfinite(out.sample).all()


def test_layers_per_block_per_stage():
    """A tuple gives each stage its own ResBlock count: down ``n``, up ``n + 1``, skips matched."""
    torch.manual_seed(0)
    config = dict(_shrink(SNAPGEN_TINY), layers_per_block=(1, 3))
    unet = SnapGenUNet(**config).eval()
    assert [len(s.resnets) for s in unet.down_stages] == [1, 3]
    assert [len(s.transformers) for s in unet.down_stages] == [1, 3]
    assert [len(s.resnets) for s in unet.up_stages] == [4, 2]  # lowest resolution first
    assert [len(s.transformers) for s in unet.up_stages] == [4, 2]
    uniform = SnapGenUNet(**dict(config, layers_per_block=1))
    assert count_parameters(unet) > count_parameters(uniform)
    x, t, ctx, mask, pooled = _tiny_inputs(config)
    out = unet(x, t, ctx, mask, pooled)
    assert out.sample.shape == x.shape and torch.isfinite(out.sample).all()
    with pytest.raises(ValueError, match="layers_per_block"):
        SnapGenUNet(**dict(config, layers_per_block=(1, 2, 3)))


def test_unet_shapes_features_and_timestep_forms():
    torch.manual_seed(0)
    unet = build_unet("snapgen-tiny").eval()
    x, t, ctx, mask, pooled = _tiny_inputs(SNAPGEN_TINY)
    out = unet(x, t, ctx, mask, pooled, return_features=True)
    assert out.sample.shape == x.shape
    assert out.features.shape == (2, SNAPGEN_TINY["block_out_channels"][0], 16, 16)
    scalar = unet(x, 0.5, ctx, mask, pooled).sample
    vector = unet(x, torch.full((2,), 0.5), ctx, mask, pooled).sample
    torch.testing.assert_close(scalar, vector)
    assert not torch.allclose(unet(x, 0.1, ctx, mask, pooled).sample, scalar)
    with pytest.raises(ValueError, match="pooled"):
        unet(x, t, ctx, mask, None)


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    unet = build_unet("snapgen-tiny")
    x, t, ctx, mask, pooled = _tiny_inputs(SNAPGEN_TINY, batch=1)
    x = x[..., :8, :8]
    unet(x, t, ctx, mask, pooled).sample.square().mean().backward()
    plain = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    unet.enable_gradient_checkpointing()
    unet(x, t, ctx, mask, pooled).sample.square().mean().backward()
    for a, p in zip(plain, unet.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_snapgen_379m_parameter_count_on_meta_device():
    unet = build_unet("snapgen-379m", device="meta")
    assert all(p.device.type == "meta" for p in unet.parameters())
    n = count_parameters(unet)
    assert abs(n - 379e6) / 379e6 < 0.03, n


def test_snapgen_379m_flops_at_1024px_are_a_fifth_of_sdxl():
    """One 1024-px step (128x128x16 latent, 282 text tokens) counted on the meta device.

    diffusers' SDXL UNet2DConditionModel costs 6.761 TFLOPs per step at 128x128x4 with 77 tokens
    (bench/bench_efficiency.py, same counter); the issue asks for >= 5x, the config keeps a margin.
    """
    from torch.utils.flop_counter import FlopCounterMode

    config = UNET_CONFIGS["snapgen-379m"]
    unet = build_unet("snapgen-379m", device="meta")
    tokens = 77 + 77 + 128
    with torch.device("meta"):
        args = (
            torch.randn(1, 16, 128, 128),
            torch.full((1,), 0.5),
            torch.randn(1, tokens, config["cross_attention_dim"]),
            torch.ones(1, tokens, dtype=torch.bool),
            torch.randn(1, config["pooled_projection_dim"]),
        )
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(*args)
    assert 6.761e12 / counter.get_total_flops() >= 5.3, counter.get_total_flops()


def test_ladder_moves_from_sdxl_size_to_snapgen():
    counts = [count_parameters(build_unet(c, device="meta")) for _, c in LADDER]
    assert counts[0] == pytest.approx(2.57e9, rel=0.03)  # diffusers' SDXL UNet: 2.567 B
    assert counts[-1] == count_parameters(build_unet("snapgen-379m", device="meta"))
    names = [n for n, _ in LADDER]
    assert counts[names.index("multi-query attention")] < counts[names.index("FFN ratio 4 -> 3")]


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    unet = build_unet("snapgen-tiny").eval()
    unet.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = SnapGenUNet.from_pretrained(tmp_path, use_safetensors=True).eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert json.loads(json.dumps(public(loaded.config))) == json.loads(json.dumps(public(unet.config)))
    x, t, ctx, mask, pooled = _tiny_inputs(SNAPGEN_TINY)
    torch.testing.assert_close(loaded(x, t, ctx, mask, pooled).sample, unet(x, t, ctx, mask, pooled).sample)


def test_unknown_config_name():
    with pytest.raises(ValueError, match="snapgen-379m"):
        build_unet("snapgen-9000m")
    assert "snapgen-shapes" in UNET_CONFIGS
