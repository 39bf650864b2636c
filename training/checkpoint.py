"""Checkpoints: safetensors weights + a JSON sidecar, written atomically.

Layout::

    OUT_DIR/checkpoints/step_00001000/weights.safetensors   model.<name>.*   every trainable and state module
                                                           optim.<name>.<param>.<key>   optimizer tensors
    OUT_DIR/checkpoints/step_00001000/state.json            step, config + its hash, RNG states of every
                                                           process (as lists), optimizer hyper-parameters,
                                                           grad-scaler state

A checkpoint is written into a hidden temporary directory, flushed to disk, and renamed into
place; a rename is atomic, so every ``step_*`` directory is complete, and a run killed at any
moment (Ctrl-C, SIGKILL, power) leaves the previous checkpoints readable. The newest
``step_*`` directory is the one ``--resume`` continues from. No pickles anywhere: optimizer
states are flattened into named tensors plus JSON.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINTS = "checkpoints"
WEIGHTS = "weights.safetensors"
STATE = "state.json"
FORMAT = 1
_STEP_PREFIX = "step_"


def step_dir(out_dir: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` of the run in ``out_dir`` lives (zero-padded so names sort by step)."""
    return Path(out_dir) / CHECKPOINTS / f"{_STEP_PREFIX}{step:08d}"


def step_of(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name[len(_STEP_PREFIX) :])


def checkpoint_dirs(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX) and (p / STATE).is_file()]
    return sorted(found, key=step_of)


def latest(out_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE).read_text())


def clean_partial(out_dir: str | Path) -> None:
    """Remove temporary directories left by a run killed while writing a checkpoint."""
    root = Path(out_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# RNG states as JSON-friendly lists
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def _flatten_optimizer(name: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta[name] = {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(name: str, tensors: dict, meta: dict) -> dict[str, Any]:
    prefix = f"optim.{name}."
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for index, values in meta[name]["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta[name]["param_groups"]}


def _for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses aliases)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    out_dir: str | Path,
    step: int,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``."""
    final = step_dir(out_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():
        return final
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"model.{name}.{key}"] = value
    optim_meta: dict[str, Any] = {}
    for name, optimizer in optimizers.items():
        _flatten_optimizer(name, optimizer, tensors, optim_meta)
    sidecar = {"format": FORMAT, "step": step, **state, "optimizers": optim_meta}

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_file(_for_safetensors(tensors), tmp / WEIGHTS, metadata={"format": "pt", "step": str(step)})
        (tmp / STATE).write_text(json.dumps(sidecar) + "\n")
        for path in (tmp / WEIGHTS, tmp / STATE):
            _fsync(path)
        os.rename(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(
    checkpoint: str | Path,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
) -> dict[str, Any]:
    """Load weights and optimizer states in place; returns the sidecar."""
    checkpoint = Path(checkpoint)
    state = read_state(checkpoint)
    tensors = load_file(checkpoint / WEIGHTS, device="cpu")
    for name, module in modules.items():
        prefix = f"model.{name}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(f"checkpoint {checkpoint} has no weights for module {name!r}")
        module.load_state_dict(own, strict=True)
    for name, optimizer in optimizers.items():
        if name not in state["optimizers"]:
            raise ValueError(f"checkpoint {checkpoint} has no state for optimizer {name!r}")
        optimizer.load_state_dict(_unflatten_optimizer(name, tensors, state["optimizers"]))
    return state


def load_module_weights(checkpoint: str | Path, name: str, module: nn.Module) -> None:
    """Load one module's weights (e.g. ``ema``) from a checkpoint into ``module``."""
    tensors = load_file(Path(checkpoint) / WEIGHTS, device="cpu")
    prefix = f"model.{name}."
    module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
