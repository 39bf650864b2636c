"""Weights in memory of their own, so that a model's output depends on its weights alone.

``from_pretrained`` memory-maps safetensors files, so a weight may start at any byte offset of
its file, and whether it does depends on the file's layout (its header's length, the tensors
before it, their dtype). The CPU's convolution and matrix kernels choose their code path by
the alignment of their operands and sum in a different order on each, so the same weights read
from two files (the fp16 default, or its fp32 copy that ``save_pretrained`` writes) gave
pictures that differed in the last bits. Copied into fresh, aligned allocations, they do not.
"""

from __future__ import annotations

import itertools

import torch


class OwnedWeightsMixin:
    """Put first in a ``ModelMixin``'s bases: ``from_pretrained`` then copies every parameter and buffer."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                tensor.data = tensor.data.clone()
        return model
