"""Portable initial noise: the same latents from (seed, shape) on every platform.

torch's RNG differs between CPU, CUDA and versions, and a phone has no torch at
all, so the sampler's starting noise comes from this small, fully specified
generator instead. It can be reimplemented in a few dozen lines of Swift; the
full spec (with test vectors) is in docs/noise-spec.md.

The math, once:

* Bits: Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as
  1, 2, 3", SC'11), a counter-based generator: out = philox(counter, key).
  A round maps (c0, c1, c2, c3) with key (k0, k1) to
  (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0)),
  with M0 = 0xD2511F53, M1 = 0xCD9E8D57 and 32x32->64-bit products; between
  rounds the key is bumped by (0x9E3779B9, 0xBB67AE85) mod 2**32.
* Mapping: the 64-bit seed is the key, k0 = seed & 0xffffffff, k1 = seed >> 32.
  Value n of the C-order flattened tensor is lane n % 4 of block b = n // 4,
  whose counter is (b & 0xffffffff, b >> 32, 0, 0). Values therefore do not
  depend on the shape, only on the flat index: a smaller draw is a prefix of
  a larger one.
* Uniforms: u = (x + 0.5) * 2**-32 in float64, so 0 < u < 1 strictly.
* Normals: Box-Muller within each block, lanes (0, 1) from (u0, u1) and lanes
  (2, 3) from (u2, u3): r = sqrt(-2 ln u0), t = 2pi * u1,
  z0 = r cos t, z1 = r sin t. Computed in float64, rounded once to float32.

Caveat: sqrt, products and the float32 rounding are exact IEEE operations, but
log/cos/sin come from the platform's libm, which may differ by an ulp in
float64. That flips the float32 result only when the float64 value lies within
an ulp of a float32 rounding boundary (about 2**-29 per value), so compare
implementations with the golden vectors and `noise_checksum`, and expect a rare
1-ulp float32 difference on exotic libms rather than a different image. The
reference is what correctly rounded log/cos/sin give; the tests check this
module against that with mpmath.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "NOISE_SPEC",
    "noise_checksum",
    "philox4x32",
    "randn",
    "randn_tensor",
    "uniform",
]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
PHILOX_ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_U32_LIMIT = 1 << 32
_U64_LIMIT = 1 << 64

_TWO_POW_MINUS_32 = 2.0**-32
# Spelled out so ports copy the exact float64 (== 2.0 * math.pi, the double nearest 2pi).
_TWO_PI = 6.283185307179586

NOISE_SPEC: dict = {
    "algorithm": "philox4x32-10/box-muller",
    "version": 1,
    "philox": {
        "rounds": PHILOX_ROUNDS,
        "multipliers": [PHILOX_M0, PHILOX_M1],
        "key_increments": [PHILOX_W0, PHILOX_W1],
    },
    "key": "k0 = seed & 0xffffffff, k1 = seed >> 32 (seed: unsigned 64-bit)",
    "counter": "value n of the C-order flattened tensor: block b = n // 4, "
    "counter (b & 0xffffffff, b >> 32, 0, 0), lane n % 4",
    "uniform": "u = (x + 0.5) * 2**-32 in float64",
    "normal": "Box-Muller per block, lanes (0,1) from (u0,u1) and (2,3) from (u2,u3): "
    "r = sqrt(-2 * log(u_even)), t = 6.283185307179586 * u_odd, "
    "z_even = r * cos(t), z_odd = r * sin(t); float64, rounded once to float32",
    "batch": "image i of a batch started at seed S uses seed S + i",
    "checksum": "sha256 hex of the little-endian float32 bytes in C order",
    "dtype": "float32",
}


def _as_u32_lanes(values, name: str, lanes: int) -> np.ndarray:
    """Validate an integer array whose last axis has `lanes` 32-bit words; return it as uint64."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "ui":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim == 0 or arr.shape[-1] != lanes:
        raise ValueError(f"{name} must have a last axis of length {lanes}, got shape {arr.shape}")
    # uint64 leaves room for the 32x32-bit products without any overflow games.
    if arr.size and (arr.min() < 0 or arr.max() >= _U32_LIMIT):
        raise ValueError(f"{name} words must lie in [0, 2**32)")
    return arr.astype(np.uint64)


def philox4x32(counter, key, rounds: int = PHILOX_ROUNDS) -> np.ndarray:
    """Philox-4x32 block function, vectorised over leading axes.

    counter: integer array [..., 4]; key: integer array [2] or [..., 2] (broadcast
    against counter's leading axes). Returns uint32 [..., 4].
    """
    rounds = operator.index(rounds)
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    ctr = _as_u32_lanes(counter, "counter", 4)
    k = _as_u32_lanes(key, "key", 2)
    c0, c1, c2, c3 = ctr[..., 0], ctr[..., 1], ctr[..., 2], ctr[..., 3]
    k0, k1 = k[..., 0], k[..., 1]
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    w0, w1 = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
    for r in range(rounds):
        if r:
            k0 = (k0 + w0) & _MASK32
            k1 = (k1 + w1) & _MASK32
        p0 = c0 * m0
        p1 = c2 * m1
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT32) ^ c1 ^ k0,
            p1 & _MASK32,
            (p0 >> _SHIFT32) ^ c3 ^ k1,
            p0 & _MASK32,
        )
    out = np.stack(np.broadcast_arrays(c0, c1, c2, c3), axis=-1)
    return out.astype(np.uint32)


def _check_seed(seed) -> int:
    if isinstance(seed, bool):
        raise TypeError("seed must be an integer, not bool")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}") from None
    if not 0 <= seed < _U64_LIMIT:
        raise ValueError(f"seed must be an unsigned 64-bit integer in [0, 2**64), got {seed}")
    return seed


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        shape = (shape,)
    dims = tuple(operator.index(d) for d in shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative dimensions, got {dims}")
    return dims


def _blocks(seed: int, count: int) -> np.ndarray:
    """Philox output for the first `count` values of `seed`, as uint32 [ceil(count / 4), 4]."""
    n_blocks = -(-count // 4)
    b = np.arange(n_blocks, dtype=np.uint64)
    counter = np.zeros((n_blocks, 4), dtype=np.uint64)
    counter[:, 0] = b & _MASK32
    counter[:, 1] = b >> _SHIFT32
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    return philox4x32(counter, key)


def _to_unit(bits: np.ndarray) -> np.ndarray:
    # x + 0.5 needs 33 significant bits, so the float64 result is exact.
    return (bits.astype(np.float64) + 0.5) * _TWO_POW_MINUS_32


def _libm(fn, x: np.ndarray) -> np.ndarray:
    """Apply a scalar libm function elementwise.

    np.log/np.cos/np.sin dispatch on CPU features: on AVX-512 machines NumPy uses
    SVML kernels with up to 4 ulp error, so the same server code would give
    different bits on different hosts. The C libm behind `math` (glibc, Apple's
    libm) is accurate to < 1 ulp everywhere, which is also what Swift calls. It
    costs ~0.1 us per value, fine for latents of a few hundred thousand values.
    """
    return np.fromiter(map(fn, x.tolist()), dtype=np.float64, count=x.size)


def uniform(seed: int, shape) -> np.ndarray:
    """Float64 uniforms in the open interval (0, 1)."""
    seed = _check_seed(seed)
    shape = _check_shape(shape)
    count = math.prod(shape)
    u = _to_unit(_blocks(seed, count)).reshape(-1)[:count]
    return u.reshape(shape)


def randn(seed: int, shape) -> np.ndarray:
    """Float32 standard normals, bit-reproducible from (seed, shape) per docs/noise-spec.md."""
    seed = _check_seed(seed)
    shape = _check_shape(shape)
    count = math.prod(shape)
    u = _to_unit(_blocks(seed, count))
    z = np.empty_like(u)
    for even, odd in ((0, 1), (2, 3)):
        r = np.sqrt(-2.0 * _libm(math.log, u[:, even]))
        t = _TWO_PI * u[:, odd]
        z[:, even] = r * _libm(math.cos, t)
        z[:, odd] = r * _libm(math.sin, t)
    return z.reshape(-1)[:count].astype(np.float32).reshape(shape)


def randn_tensor(
    seeds: int | Sequence[int],
    shape_per_item,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stack one independent `randn(seed, shape_per_item)` per seed along a new dim 0.

    A single int gives a batch of one. Pipelines seed image i of a batch with S + i,
    so `randn_tensor([S + i for i in range(n)], ...)` reproduces any single image
    of the batch from its own seed. Values are drawn in float32 and then cast.
    """
    seed_list = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
    checked = [_check_seed(s) for s in seed_list]
    shape = _check_shape(shape_per_item)
    batch = np.stack([randn(s, shape) for s in checked]) if checked else np.empty((0, *shape), dtype=np.float32)
    return torch.from_numpy(batch).to(device=device, dtype=dtype)


def noise_checksum(array) -> str:
    """sha256 hex of the C-order little-endian float32 bytes (numpy array or torch tensor)."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float32).numpy()
    data = np.ascontiguousarray(np.asarray(array), dtype="<f4")
    return hashlib.sha256(data.tobytes()).hexdigest()
