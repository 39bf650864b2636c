"""Which devices this machine can run a model on, and a one-line refusal of one it cannot."""

from __future__ import annotations


class DeviceError(ValueError):
    """A device this machine does not have; the message names the flag and what is available."""


def available_devices() -> list[str]:
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str, flag: str = "--device") -> None:
    """Raise :class:`DeviceError` for a device this machine does not have (one line naming ``flag`` and what
    it has). Imports torch unless ``device`` is the CPU."""
    if device == "cpu":
        return
    import torch

    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{flag} {device}: not a device name; available: {', '.join(available_devices())}") from None
    if kind.type == "cpu":
        return
    if kind.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if torch.version.cuda is None and torch.version.hip is None:
            why = f"this torch ({torch.__version__}) is built without CUDA"
        elif count == 0:
            why = "no CUDA device is visible"
        elif (kind.index or 0) >= count:
            why = f"there {'is 1 CUDA device' if count == 1 else f'are {count} CUDA devices'}"
        else:
            return
    elif kind.type == "mps":
        if torch.backends.mps.is_available():
            return
        why = "MPS (Apple GPUs) is not available here"
    else:
        backend = getattr(torch, kind.type, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return
        why = f"{kind.type} is not available here"
    raise DeviceError(f"{flag} {device}: {why}; available: {', '.join(available_devices())}")
