"""The Triton kernels against the PyTorch code they replace, run by tests/test_kernels.py in a child process.

``python tests/kernel_checks.py [CHECK ...]`` needs TRITON_INTERPRET=1 in its environment (Triton's CPU
interpreter: the variable is read when a kernel is decorated, so it must be set before anything imports
triton, which a pytest process that ran other tests cannot promise). On a GPU machine,
``python tests/kernel_checks.py --device cuda`` runs the same checks with the compiled kernels. It prints one
JSON object, check name -> list of cases ``{"case", "err", "bound", "ok"}`` (or ``{"error": traceback}``).

Tolerances, per dtype and why:
* fp32: the kernels reorder sums (GroupNorm statistics, depthwise taps, RMS) against PyTorch's, nothing
  else; elementwise results agree to a few ulp: ``|a - b| <= 2e-5 + 2e-5 |b|``.
* fp16: PyTorch rounds every intermediate to fp16 (normalised value, SiLU, the product), the kernels keep
  fp32 in registers and round once at the store, so they differ by a few fp16 ulps (2**-11 relative) of the
  intermediates; a 3x3 tap sum adds nine such errors: ``|a - b| <= 1e-2 + 1e-2 |b|`` (measured: <= 4e-3).
* swapped blocks: a ResBlock chains two norm + depthwise + pointwise passes, so 3x the absolute term.
* whole models: the errors above pass through every layer; bounds are relative to the output's largest value
  (fp32 1e-4, fp16 3e-2; measured 1e-6 and 2e-3), images within one grey level (measured: 0).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
from torch import nn

# The CPU through the interpreter; ``--device cuda`` runs the same checks compiled, on a GPU.
DEVICE = torch.device("cpu")
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-2, 1e-2)}
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def compare(case: str, got: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> dict:
    assert got.shape == ref.shape and got.dtype == ref.dtype, (case, got.shape, ref.shape, got.dtype, ref.dtype)
    got, ref = got.double(), ref.double()
    err = (got - ref).abs()
    excess = (err - (atol + rtol * ref.abs())).max().item()
    return {"case": case, "err": err.max().item(), "bound": f"{atol:g} + {rtol:g}|ref|", "ok": excess <= 0}


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter (norm weights included, which start at 1 and 0) drawn at random, so no path is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim == 1 else 1.0 / max(1, p[0].numel()) ** 0.5))
    return module


@torch.no_grad()  # with autograd on, the swapped methods run the PyTorch path
def on_off(module: nn.Module, *inputs, method: str = "forward"):
    from snapgen.models.kernels import set_kernels

    set_kernels(module, "torch")
    ref = getattr(module, method)(*inputs)
    set_kernels(module, "triton")
    got = getattr(module, method)(*inputs)
    set_kernels(module, "torch")
    return got, ref


def dtypes():
    return [(dtype, "fp32" if dtype == torch.float32 else "fp16", *TOLERANCE[dtype]) for dtype in TOLERANCE]


@check
def group_norm_act():
    from snapgen.models.kernels.norm_act import group_norm_act

    g = torch.Generator().manual_seed(0)
    cases = []
    # (shape, groups, act, with add, channels_last in, offset): odd sizes, H=1, a group split over programs
    # (4 * 96 * 97 elements > one program's share) with a mean far from 0, a channels-last input.
    layouts = [
        ((2, 48, 7, 5), 16, "silu", True, False, 0.0),
        ((1, 96, 12, 12), 32, None, False, True, 0.0),
        ((3, 6, 1, 9), 3, "silu", True, False, 0.0),
        ((1, 4, 96, 97), 1, "silu", False, False, 50.0),
    ]
    for dtype, name, atol, rtol in dtypes():
        for shape, groups, act, with_add, channels_last, offset in layouts:
            norm = randomized(nn.GroupNorm(groups, shape[1]), 1).to(DEVICE, dtype)
            x = (torch.randn(shape, generator=g) + offset).to(DEVICE, dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            add = torch.randn(shape[:2], generator=g).to(DEVICE, dtype) if with_add else None
            ref = norm(x + add[:, :, None, None] if with_add else x)
            ref = F.silu(ref) if act else ref
            for out_channels_last in (False, True):
                got = group_norm_act(x, norm, act, add, channels_last=out_channels_last)
                cases.append(compare(f"{name} {shape} g{groups} {act} cl={out_channels_last}", got, ref, atol, rtol))
            # What channels-last output is for: the transformer's token view of it needs no copy.
            cases.append({"case": "token view contiguous", "ok": got.flatten(2).transpose(1, 2).is_contiguous()})
    return cases


@check
def depthwise():
    from snapgen.models.kernels.depthwise import depthwise3x3
    from snapgen.models.kernels.norm_act import group_norm_scale_shift

    g = torch.Generator().manual_seed(2)
    cases = []
    for dtype, name, atol, rtol in dtypes():
        for shape, groups, bias, channels_last in [((2, 40, 9, 11), 8, True, False), ((1, 24, 5, 3), 4, False, True)]:
            conv = randomized(nn.Conv2d(shape[1], shape[1], 3, padding=1, groups=shape[1], bias=bias), 3).to(
                DEVICE, dtype
            )
            norm = randomized(nn.GroupNorm(groups, shape[1]), 4).to(DEVICE, dtype)
            x = torch.randn(shape, generator=g).to(DEVICE, dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            add = torch.randn(shape[:2], generator=g).to(DEVICE, dtype)
            # The U-Net's ResBlock: GroupNorm(h + t) -> SiLU -> depthwise; the decoder's block: SiLU -> depthwise.
            scale, shift = group_norm_scale_shift(x, norm, add)
            ref = conv(F.silu(norm(x + add[:, :, None, None])))
            got = depthwise3x3(x, conv, scale, shift, "silu")
            cases.append(compare(f"{name} norm+silu {shape} bias={bias}", got, ref, atol, rtol))
            got = depthwise3x3(x, conv, act="silu")
            cases.append(compare(f"{name} silu {shape}", got, conv(F.silu(x)), atol, rtol))
            got = depthwise3x3(x, conv)
            cases.append({"case": f"layout kept cl={channels_last}", "ok": got.stride() == x.stride()})
    return cases


@check
def geglu():
    from snapgen.models.kernels.geglu import geglu

    g = torch.Generator().manual_seed(5)
    cases = []
    for dtype, name, atol, rtol in dtypes():
        for shape in [(2, 37, 2 * 72), (1, 5, 2 * 200), (3, 2 * 9)]:
            h = (torch.randn(shape, generator=g) * 2).to(DEVICE, dtype)
            x, gate = h.chunk(2, dim=-1)
            cases.append(compare(f"{name} {shape}", geglu(h), x * F.gelu(gate), atol, rtol))
    return cases


@check
def qk_norm_rope():
    from snapgen.models.attention import Attention, rotary_tables_2d

    g = torch.Generator().manual_seed(6)
    cases = []
    # (rows, cols, heads, head dim, qk_norm, rope): odd token grids, non-power-of-2 head dims, norm or rope alone.
    for dtype, name, atol, rtol in dtypes():
        for rows, cols, heads, head_dim, qk_norm, rope in [
            (5, 7, 3, 24, True, True),
            (3, 3, 2, 18, True, False),
            (4, 6, 2, 16, False, True),
        ]:
            attn = randomized(Attention(heads * head_dim, heads, head_dim, 1, qk_norm=qk_norm), 7).to(DEVICE, dtype)
            q = torch.randn(2, rows * cols, heads * head_dim, generator=g).to(DEVICE, dtype)
            k = torch.randn(2, rows * cols, head_dim, generator=g).to(DEVICE, dtype)
            rotary = rotary_tables_2d(rows, cols, head_dim, device=DEVICE) if rope else None
            (gq, gk), (rq, rk) = on_off(attn, q, k, rotary, method="query_key_heads")
            cases.append(compare(f"{name} q {rows}x{cols} h{heads} d{head_dim} norm={qk_norm}", gq, rq, atol, rtol))
            cases.append(compare(f"{name} k {rows}x{cols} d{head_dim} rope={rope}", gk, rk, atol, rtol))
    return cases


@check
def blocks():
    """Each module the switch swaps, whole, kernels on against off."""
    from snapgen.models.blocks import FeedForward, ResBlock
    from snapgen.models.tiny_decoder import SeparableResBlock

    g = torch.Generator().manual_seed(8)
    cases = []
    for dtype, name, atol, rtol in dtypes():
        x = torch.randn(2, 40, 9, 7, generator=g).to(DEVICE, dtype)
        temb = torch.randn(2, 16, generator=g).to(DEVICE, dtype)
        for separable in (True, False):
            block = randomized(ResBlock(40, 24, 16, separable=separable, groups=8), 9).to(DEVICE, dtype)
            cases.append(compare(f"{name} ResBlock separable={separable}", *on_off(block, x, temb), 3 * atol, rtol))
        block = randomized(SeparableResBlock(20), 10).to(DEVICE, dtype)
        x = torch.randn(1, 20, 11, 6, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
        cases.append(compare(f"{name} SeparableResBlock", *on_off(block, x), 3 * atol, rtol))
        ff = randomized(FeedForward(40, 3.0, "geglu"), 11).to(DEVICE, dtype)
        tokens = torch.randn(2, 7, 40, generator=g).to(DEVICE, dtype)
        cases.append(compare(f"{name} FeedForward geglu", *on_off(ff, tokens), atol, rtol))
    return cases


def unet_inputs(unet, batch: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    mask = torch.ones(batch, 9, dtype=torch.bool, device=DEVICE)
    mask[:, 6:] = False
    return (
        torch.randn(batch, c.in_channels, 16, 16, generator=g).to(DEVICE, dtype),
        torch.full((batch,), 0.7, device=DEVICE),
        torch.randn(batch, 9, c.cross_attention_dim, generator=g).to(DEVICE, dtype),
        mask,
        torch.randn(batch, c.pooled_projection_dim, generator=g).to(DEVICE, dtype),
    )


def small_379m_shaped(seed: int):
    """snapgen-379m's block structure (stages, ResBlocks, depths, SA placement, GEGLU, MQA, QK-norm, RoPE)
    at small, partly non-power-of-2 widths."""
    from snapgen.models.configs import build_unet, unet_config

    config = unet_config("snapgen-379m")
    config.update(block_out_channels=(32, 64, 96), attention_head_dim=16, cross_attention_dim=40,
                  pooled_projection_dim=24, in_channels=4, out_channels=4)  # fmt: skip
    torch.manual_seed(seed)
    return randomized(build_unet(config).eval(), seed).to(DEVICE)


def relative(case: str, got: torch.Tensor, ref: torch.Tensor, bound: float) -> dict:
    err = (got.double() - ref.double()).abs().max().item() / ref.double().abs().max().item()
    return {"case": case, "err": err, "bound": f"{bound:g} max|ref|", "ok": err <= bound}


@check
def whole_models():
    from snapgen.model_dir import load_pipeline

    cases = []
    pipe = load_pipeline(device=DEVICE)
    x = unet_inputs(pipe.unet, 1, torch.float32, 1)
    cases.append(relative("default U-Net fp32", *(o.sample for o in on_off(pipe.unet, *x)), 1e-4))
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got, ref = on_off(pipe.decoder, z, method="decode")
    cases.append({"case": "default decoder fp32, grey levels", "err": (got - ref).abs().max().item() * 127.5,
                  "bound": "1", "ok": (got - ref).abs().max().item() * 127.5 <= 1})  # fmt: skip
    images = {}
    for kind in ("torch", "triton"):
        from snapgen.models.kernels import set_kernels

        set_kernels(pipe.unet, kind)
        set_kernels(pipe.decoder, kind)
        images[kind] = pipe("a red circle", seeds=3, steps=1, output_type="np").images[0].astype(int)
    grey = abs(images["triton"] - images["torch"]).max()
    cases.append(
        {"case": "default model, 1-step image, grey levels", "err": float(grey), "bound": "1", "ok": grey <= 1}
    )
    unet = small_379m_shaped(3)
    for dtype, name, bound in [(torch.float32, "fp32", 1e-4), (torch.float16, "fp16", 3e-2)]:
        nn.Module.to(unet, dtype)  # not diffusers' .to, which warns about casting a model after loading
        x = unet_inputs(unet, 2, dtype, 4)
        cases.append(relative(f"379m-shaped U-Net {name}", *(o.sample for o in on_off(unet, *x)), bound))
    return cases


@check
def switch():
    """Weights untouched, the PyTorch path back exactly, autograd on the PyTorch path, no silent traces."""
    from snapgen.models.configs import build_unet
    from snapgen.models.kernels import active, set_kernels
    from snapgen.tracing import TracedUNet

    torch.manual_seed(5)
    unet = randomized(build_unet("snapgen-tiny").eval(), 5).to(DEVICE)
    x = unet_inputs(unet, 1, torch.float32, 6)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    ref = unet(*x).sample.detach()
    set_kernels(unet, "triton")
    after = unet.state_dict()
    same = list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    cases = [
        {"case": "active", "ok": active(unet)},
        {"case": "state_dict unchanged", "ok": same},
        {"case": "grad on: PyTorch path, bit for bit", "ok": torch.equal(unet(*x).sample, ref)},
    ]
    unet(*x).sample.square().mean().backward()
    cases.append({"case": "grad on: backward works", "ok": unet.conv_in.weight.grad is not None})
    with torch.no_grad():
        traced = TracedUNet(unet)
        out = traced(*x)
        cases.append({"case": "TracedUNet runs eagerly", "ok": len(traced) == 0 and torch.equal(out, unet(*x).sample)})
        try:
            torch.jit.trace(unet, x, strict=False)
            cases.append({"case": "torch.jit.trace refuses", "ok": False})
        except RuntimeError as e:
            cases.append({"case": "torch.jit.trace refuses", "ok": "set_kernels" in str(e)})
        set_kernels(unet, "torch")
        cases.append({"case": "torch: nothing swapped", "ok": not active(unet)})
        cases.append({"case": "torch: bit for bit", "ok": torch.equal(unet(*x).sample, ref)})
        cases.append({"case": "torch: traced == eager", "ok": torch.equal(traced(*x), ref) and len(traced) == 1})
    return cases


def main() -> int:
    global DEVICE
    args = sys.argv[1:]
    if args[:1] == ["--device"]:
        DEVICE, args = torch.device(args[1]), args[2:]
        # True fp32 on the reference side too: TF32 convolutions would differ from it by ~1e-3.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if DEVICE.type == "cpu" and (os.environ.get("TRITON_INTERPRET") != "1" or "triton" in sys.modules):
        print("on the CPU, run with TRITON_INTERPRET=1 in the environment, in a fresh process", file=sys.stderr)
        return 2
    names = args or list(CHECKS)
    results = {}
    for name in names:
        try:
            results[name] = [{**case, "ok": bool(case["ok"])} for case in CHECKS[name]()]
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
