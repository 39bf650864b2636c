"""The GEGLU feed-forward's gate: ``x * gelu(gate)`` on the two halves of the first projection, in one pass.

PyTorch runs ``x, gate = proj.chunk(2); x * gelu(gate)`` as two kernels: GELU reads the gate half and writes a
temporary of the same size, the product reads both and writes the output. Fused, each input element is read
once and only the output is written: 3 tensor-sized transfers instead of 5. GELU is the exact (erf) form that
``F.gelu`` uses by default, computed in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt


@triton.jit
def _geglu_kernel(h_ptr, y_ptr, M, inner, shm, shi, sym, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (r < M)[:, None] & (i < inner)[None, :]
    row = h_ptr + r[:, None] * shm
    x = tl.load(row + i[None, :] * shi, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(row + (i[None, :] + inner) * shi, mask=mask, other=0.0).to(tl.float32)
    y = x * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))
    tl.store(y_ptr + r[:, None] * sym + i[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """``x * gelu(gate)`` with ``x, gate = h.chunk(2, dim=-1)``; h: (..., 2 * inner) -> (..., inner)."""
    rt.check_device(h)
    if h.shape[-1] % 2:
        raise ValueError(f"GEGLU needs an even last dimension, got {h.shape[-1]}")
    inner = h.shape[-1] // 2
    rows = h.reshape(-1, h.shape[-1])  # a view for the Linear's contiguous output
    y = torch.empty(rows.shape[0], inner, device=h.device, dtype=h.dtype)
    block_m, block_i = rt.tile_2d(rows.shape[0], inner, max_cols=128)
    grid = (rt.cdiv(rows.shape[0], block_m), rt.cdiv(inner, block_i))
    rt.launch(
        _geglu_kernel,
        grid,
        (rows, y, rows.shape[0], inner, rows.stride(0), rows.stride(1), y.stride(0)),
        BLOCK_M=block_m,
        BLOCK_I=block_i,
    )
    return y.view(*h.shape[:-1], inner)
