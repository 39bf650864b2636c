"""Fused Triton kernels for the U-Net and the tiny decoder, switched per model instance.

``set_kernels(model, "triton")`` makes the model's GroupNorm + SiLU + depthwise convs, GEGLU gates and
QK-RMSNorm + RoPE run as the fused kernels of this package; ``set_kernels(model, "torch")`` (the default state
of every model) restores the PyTorch code. Only methods of module instances are swapped: classes, parameters,
buffers and ``state_dict`` keys stay as they are, so checkpoints load and save either way. See docs/kernels.md.

Importing this package does not import triton; ``set_kernels(..., "triton")`` and ``available()`` do.
"""

from __future__ import annotations

import types

from torch import nn

KINDS = ("torch", "triton")

# Names of the methods a module had swapped, kept on the instance so "torch" can take exactly those away.
_SWAPPED = "_snapgen_kernels"


def available() -> str | None:
    """None if the Triton kernels can run in this process, else why not."""
    try:
        from . import _runtime
    except Exception as exc:  # a broken install fails in many ways; each means the same here
        return f"triton cannot be imported ({exc}); install it with pip install 'snapgen[kernels]'"
    import torch

    if _runtime.INTERPRETED or torch.cuda.is_available():
        return None
    return (
        "there is no CUDA GPU, and triton was imported without TRITON_INTERPRET=1 (its CPU interpreter: "
        "set it in the environment before anything imports triton; slow, for checking)"
    )


def set_kernels(module: nn.Module, kind: str) -> None:
    """Run ``module``'s fusable layers through the Triton kernels (``"triton"``) or PyTorch (``"torch"``).

    Applies to every submodule, so a U-Net, a decoder or any module holding them can be given. Raises
    RuntimeError for ``"triton"`` where ``available()`` says the kernels cannot run, leaving ``module`` as it was.
    """
    if kind not in KINDS:
        raise ValueError(f"kernels must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "triton":
        reason = available()
        if reason is not None:
            raise RuntimeError(f"kernels='triton' cannot run here: {reason}")
        from .fused import patches

        targets = [target for m in module.modules() for target in patches(m)]
    for m in module.modules():
        for name in m.__dict__.pop(_SWAPPED, ()):
            m.__dict__.pop(name, None)
    if kind == "triton":
        for instance, name, function in targets:
            instance.__dict__[name] = types.MethodType(function, instance)
            instance.__dict__[_SWAPPED] = (*instance.__dict__.get(_SWAPPED, ()), name)


def active(module: nn.Module) -> bool:
    """Whether any part of ``module`` runs a Triton kernel: then TorchScript tracing cannot apply to it."""
    return any(_SWAPPED in m.__dict__ for m in module.modules())


__all__ = ["KINDS", "active", "available", "set_kernels"]
