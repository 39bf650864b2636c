"""Compiles every Triton kernel variant the models launch for an H100 (sm_90), on a machine without a GPU.

The interpreter (tests/kernel_checks.py) checks what the kernels compute, but it runs Python, not Triton's
compiler: a kernel can pass there and still fail to compile for a GPU (a type the compiler rejects, a shape
it cannot lay out). Here the launches of whole models on meta tensors (shapes only, no data, no GPU) are
recorded instead of run, and each distinct (kernel, argument types, constexprs) is compiled to a cubin for
sm_90 with the ptxas that ships in the triton wheel. ``python tests/kernel_compile.py`` prints one JSON list
of ``{"case", "ok", "error"}``; tests/test_kernels.py runs it in a child process without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch
from torch import nn

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def recorded_launches() -> dict:
    """Run snapgen-379m (fp16, 1024 px) and the default model (fp32 and fp16, 128 px, batch 1 and 8) with their
    decoders on meta tensors, recording each kernel launch's signature."""
    import snapgen.models.kernels as kernels
    from snapgen.model_dir import default_model_dir
    from snapgen.models.configs import build_unet
    from snapgen.models.kernels import _runtime
    from snapgen.models.tiny_decoder import TinyDecoder

    launches = {}

    def record(kernel, grid, args, num_warps=4, **constexprs):
        names = [name for name in kernel.arg_names if name not in constexprs]
        signature = {}
        for name, value in zip(names, args, strict=True):
            if isinstance(value, torch.Tensor):
                signature[name] = "*" + DTYPE_NAMES[value.dtype]
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        signature.update(dict.fromkeys(constexprs, "constexpr"))
        key = f"{kernel.fn.__name__} {sorted(signature.items())} {sorted(constexprs.items())} warps={num_warps}"
        launches[key] = (kernel, signature, constexprs, num_warps)

    _runtime.launch = record
    _runtime.check_device = lambda *tensors: None
    kernels.available = lambda: None  # what a GPU machine would answer

    def run(unet, decoder, batch, size, dtype):
        # nn.Module.to: diffusers' own .to warns about casting models it would rather load in a dtype.
        unet, decoder = nn.Module.to(unet, dtype).eval(), nn.Module.to(decoder, dtype).eval()
        kernels.set_kernels(unet, "triton")
        kernels.set_kernels(decoder, "triton")
        c = unet.config
        meta = dict(device="meta", dtype=dtype)
        with torch.no_grad():
            unet(
                torch.empty(batch, c.in_channels, size, size, **meta),
                torch.empty(batch, device="meta"),
                torch.empty(batch, 77, c.cross_attention_dim, **meta),
                torch.ones(batch, 77, device="meta", dtype=torch.bool),
                torch.empty(batch, c.pooled_projection_dim, **meta),
            )
            decoder(torch.empty(batch, c.in_channels, size, size, **meta))

    with torch.device("meta"):
        run(build_unet("snapgen-379m", device="meta"), TinyDecoder(), 1, 128, torch.float16)
        directory = default_model_dir()
        default_unet = build_unet(json.loads((directory / "unet" / "config.json").read_text()), device="meta")
        default_decoder = TinyDecoder.from_config(TinyDecoder.load_config(directory / "decoder"))
        for dtype in (torch.float32, torch.float16):
            for batch in (1, 8):
                run(default_unet, default_decoder, batch, 16, dtype)
    return launches


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET: this compiles the kernels, it does not interpret them", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from snapgen.models.kernels import _runtime

    results = []
    for key, (kernel, signature, constexprs, num_warps) in sorted(recorded_launches().items()):
        try:
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            compiled = triton.compile(
                source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **_runtime.OPTIONS}
            )
            results.append({"case": key, "ok": len(compiled.asm["cubin"]) > 0})
        except Exception:
            results.append({"case": key, "ok": False, "error": traceback.format_exc()})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
