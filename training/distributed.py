"""Data parallelism: one process per device, started by ``torchrun`` or ``accelerate launch``.

Both launchers export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; without them the run is a single process. The backend is NCCL on GPUs and
gloo on CPUs.

Gradients are averaged explicitly after each backward (:func:`average_gradients`: the
gradients flattened into ~25 MB buckets, one all-reduce per bucket) instead of wrapping models
in ``DistributedDataParallel``. The result is DDP's (identical replicas, gradients of the
global batch); what it buys is that stages call their own modules directly and a GAN stage can
run generator and discriminator through each other in any order, which DDP's wrapper (one
forward per backward, every parameter used) makes fragile. What it costs is DDP's overlap of
communication with the backward pass, small next to a U-Net step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 1024 * 1024


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(device: str = "auto") -> DistInfo:
    """Join the process group the launcher set up (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=chosen)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _buckets(tensors: list[torch.Tensor]):
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > BUCKET_BYTES or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Replace every gradient by its mean over the processes."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    # Every rank runs the same code, so the same parameters have gradients; check it anyway,
    # because a mismatch would otherwise pair up the wrong buckets silently (or hang).
    count = torch.tensor([len(grads)], device=info.device)
    counts = [torch.zeros_like(count) for _ in range(info.world)]
    dist.all_gather(counts, count)
    if len({int(c) for c in counts}) != 1:
        raise RuntimeError(f"processes disagree on how many parameters have gradients: {[int(c) for c in counts]}")
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat /= info.world
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Make every replica start from rank 0's weights (what DDP's constructor does)."""
    if not info.enabled:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def check_replicas(modules: dict[str, torch.nn.Module], info: DistInfo) -> None:
    """Raise if the processes' weights have drifted apart (they must stay identical)."""
    if not info.enabled:
        return
    sums = []
    for module in modules.values():
        params = [p.detach().double() for p in module.parameters()]
        sums += [float(sum(p.sum() for p in params)), float(sum(p.square().sum() for p in params))]
    mine = torch.tensor(sums, dtype=torch.float64, device=info.device)
    every = [torch.zeros_like(mine) for _ in range(info.world)]
    dist.all_gather(every, mine)
    for rank, other in enumerate(every):
        if not torch.allclose(other, mine, rtol=1e-9, atol=0.0):
            raise RuntimeError(f"process {rank}'s weights differ from process {info.rank}'s: replicas diverged")


def mean_over_processes(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: float(v) / info.world for k, v in zip(keys, t.tolist())}


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def is_main() -> bool:
    """Whether this process is rank 0 (for code that has no DistInfo at hand, e.g. progress bars)."""
    return not dist.is_initialized() or dist.get_rank() == 0
