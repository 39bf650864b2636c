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

from .models.unet import SnapGenUNet


class _UNetCall(nn.Module):
    """The U-Net as a function of tensors only (trace inputs cannot be None)."""

    def __init__(self, unet: SnapGenUNet, has_mask: bool, has_pooled: bool):
        super().__init__()
        self.unet, self.has_mask, self.has_pooled = unet, has_mask, has_pooled

    def forward(self, sample, timestep, context, mask, pooled):
        mask = mask if self.has_mask else None
        pooled = pooled if self.has_pooled else None
        return self.unet(sample, timestep, context, mask, pooled, return_dict=False)[0]


class TracedUNet:
    """Call like the U-Net (returns the velocity tensor); traces once per input signature.

    Falls back to eager when gradients are enabled (traces are recorded for inference only).
    Call ``clear()`` after moving or replacing the U-Net's parameters: a trace keeps the tensors
    it was recorded with.
    """

    def __init__(self, unet: SnapGenUNet, max_traces: int = 32):
        self.unet = unet
        self.max_traces = max_traces
        self._traces: OrderedDict[tuple, torch.jit.ScriptModule] = OrderedDict()

    def clear(self) -> None:
        self._traces.clear()

    def __len__(self) -> int:
        return len(self._traces)

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if torch.is_grad_enabled() or self.unet.training:
            return self.unet(sample, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections).sample
        timestep = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).expand(sample.shape[0])
        placeholder = sample.new_empty(0)
        inputs = (
            sample,
            timestep.contiguous(),
            encoder_hidden_states,
            placeholder if encoder_attention_mask is None else encoder_attention_mask,
            placeholder if pooled_projections is None else pooled_projections,
        )
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        trace = self._traces.get(key)
        if trace is None:
            call = _UNetCall(self.unet, encoder_attention_mask is not None, pooled_projections is not None)
            # The tracer warns about every shape it freezes into the graph (group-norm sizes, chunk
            # splits): expected here, since each trace serves one input signature only.
            with torch.jit.optimized_execution(False), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                trace = torch.jit.trace(call, inputs, check_trace=False)
            self._traces[key] = trace
            while len(self._traces) > self.max_traces:
                self._traces.popitem(last=False)
        else:
            self._traces.move_to_end(key)
        with torch.jit.optimized_execution(False):
            return trace(*inputs)
