"""What the kernel wrappers share: where a Triton kernel can run, tile sizes, and the one launch call.

Importing this module imports triton; ``snapgen.models.kernels`` only does so once kernels are asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


# Triton reads TRITON_INTERPRET when a kernel is decorated, not when it runs, so the decorated probe tells
# how every kernel in this package was built (they are decorated right after this module is imported).
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"

# Elements per program. On a GPU a few thousand per program keeps enough programs in flight at 128x128; the
# interpreter runs programs one after another in Python, so there fewer, larger tiles are much faster.
TILE = 1 << 16 if INTERPRETED else 2048

ACT_SILU: tl.constexpr = tl.constexpr(1)
ACTIVATIONS = {None: 0, "none": 0, "silu": 1}

NOT_RUNNABLE = (
    "Triton kernels run on CUDA tensors, or on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1 set "
    "before triton is imported: slow, for checking); got a tensor on {device}. "
    "snapgen.models.kernels.set_kernels(model, 'torch') selects the PyTorch path"
)


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error, rather than let Triton fail on a pointer, for tensors no kernel can read here."""
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRETED:
            raise RuntimeError(NOT_RUNNABLE.format(device=t.device))


# Fused multiply-adds where the compiler finds them: fewer roundings, never less accurate here. Said explicitly
# because triton 3.9 warns that its default will change.
OPTIONS = {"enable_fp_fusion": True}


def launch(kernel, grid: tuple[int, ...], args: tuple, num_warps: int = 4, **constexprs) -> None:
    """Every kernel in this package starts here (tests record these calls to compile them for a GPU)."""
    kernel[grid](*args, num_warps=num_warps, **OPTIONS, **constexprs)


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_2d(rows: int, cols: int, max_cols: int = 64) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS), powers of 2, about ``TILE`` elements, columns covering ``cols`` up to ``max_cols``."""
    block_cols = min(pow2(cols), max_cols if not INTERPRETED else pow2(cols))
    block_rows = max(1, min(pow2(rows), TILE // block_cols))
    return block_rows, block_cols


def channels_inner(x: torch.Tensor) -> bool:
    """Whether channels are x's innermost axis in memory (channels-last), for a (B, C, H, W) tensor."""
    return x.stride(1) < x.stride(3) or (x.shape[3] == 1 and x.stride(1) < x.stride(2))


def pixel_channel_tile(x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) for a (pixels x channels) tile of x: wide along whichever axis is contiguous, so
    that a warp's loads cover whole cache lines."""
    height, width = x.shape[2:]
    return tile_2d(height * width, x.shape[1], max_cols=64 if channels_inner(x) else 4)


def activation(act: str | None) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(k for k in ACTIVATIONS if k)}, got {act!r}")
    return ACTIVATIONS[act]
