"""TorchScript traces of the U-Net for inference: the same kernels without the Python in between.

At 16x16 latents the default model's U-Net does ~0.56 GFLOP a step in ~700 small ops, and eager
PyTorch spends about a quarter of each step in the interpreter (module calls, reshapes, argument
checks) rather than in kernels. A trace replays the recorded aten ops directly: on the 2-core CI
machine a step went from 43 to 32 ms, with outputs bit-identical to eager (``tests/test_tracing.py``
checks it), so a traced server and an eager ``snapgen generate`` still make the same PNG bytes.

A trace fixes the input shapes and which optional inputs are given, so one is kept per input
signature, least recently used dropped (a server meets a few batch sizes per resolution).
Tracing costs about a second, which is why long-lived processes (the server's workers,
benchmarks) use it and a one-image ``snapgen generate`` does not.
The profiling executor stays off: it re-optimises a trace during its first calls (hundreds of ms
each) and may fuse ops, which would break bit-equality with eager.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import nn

from .models.kernels import active as kernels_active
from .models.unet import SnapGenUNet


class ShapeTraces:
    """Call ``module`` (whose inputs are all tensors) through one trace per input signature.

    The signature is each input's shape, dtype and device; at most ``max_traces`` are kept, least
    recently used dropped. Eager when gradients are on or any submodule is training (the traces
    are recorded for inference), and when the module runs Triton kernels (``snapgen.models.kernels``:
    a trace cannot record their launches). Call ``clear()`` after moving or replacing the module's parameters: a
    trace keeps the tensors it was recorded with.
    """

    def __init__(self, module: nn.Module, max_traces: int = 32):
        self.module = module
        self.max_traces = max_traces
        self._traces: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()

    def clear(self) -> None:
        self._traces.clear()

    def __len__(self) -> int:
        return len(self._traces)

    def signatures(self) -> list[tuple]:
        """Keys of the kept traces, least recently used first: ``((shape, dtype, device), ...)``."""
        return list(self._traces)

    def __call__(self, *inputs: torch.Tensor):
        if torch.is_grad_enabled() or any(m.training for m in self.module.modules()) or kernels_active(self.module):
            return self.module(*inputs)
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        trace = self._traces.get(key)
        if trace is None:
            # The tracer warns about every shape it freezes into the graph (group-norm sizes, chunk
            # splits): expected here, since each trace serves one input signature only.
            with torch.jit.optimized_execution(False), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                trace = torch.jit.trace(self.module, inputs, check_trace=False)
            self._traces[key] = trace
            while len(self._traces) > self.max_traces:
                self._traces.popitem(last=False)
        else:
            self._traces.move_to_end(key)
        with torch.jit.optimized_execution(False):
            return trace(*inputs)


class _UNetCall(nn.Module):
    """The U-Net as a function of tensors only: an empty mask or pooled tensor stands for None
    (trace inputs cannot be None; emptiness is a shape, so each signature's trace is right)."""

    def __init__(self, unet: SnapGenUNet):
        super().__init__()
        self.unet = unet
        self.training = False  # the wrapper's own flag only: whether to trace follows the U-Net's

    def forward(self, sample, timestep, context, mask, pooled):
        mask = mask if mask.numel() else None
        pooled = pooled if pooled.numel() else None
        return self.unet(sample, timestep, context, mask, pooled, return_dict=False)[0]


class TracedUNet(ShapeTraces):
    """Call like the U-Net (returns the velocity tensor); traces once per input signature."""

    def __init__(self, unet: SnapGenUNet, max_traces: int = 32):
        super().__init__(_UNetCall(unet), max_traces)

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).expand(sample.shape[0])
        empty = sample.new_empty(0)
        return super().__call__(
            sample,
            timestep.contiguous(),
            encoder_hidden_states,
            empty if encoder_attention_mask is None else encoder_attention_mask,
            empty if pooled_projections is None else pooled_projections,
        )
