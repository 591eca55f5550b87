"""Choosing where tensors live: ``"auto"``, ``"cpu"``, ``"cuda"`` (``"cuda:1"``), ``"mps"``."""

from __future__ import annotations

import torch


class DeviceUnavailableError(RuntimeError):
    """A device was asked for that this machine (or this build of torch) does not have.

    >>> from torchlens_edu.models import GPT2, DeviceUnavailableError
    >>> try:
    ...     device = resolve_device("cuda")
    ... except DeviceUnavailableError:
    ...     device = resolve_device("cpu")
    """


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` for a choice; ``"auto"`` (or None) picks CUDA, then MPS, then CPU.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda', 'cuda:N' "
                         "or 'mps'") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA GPU or driver was found")
            raise DeviceUnavailableError(f"device {str(dev)!r} was asked for, but CUDA is not "
                                         f"available ({why}); use device='cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"device {str(dev)!r} does not exist: this machine has "
                                         f"{torch.cuda.device_count()} CUDA device(s), "
                                         f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not _mps_available():
        raise DeviceUnavailableError("device 'mps' was asked for, but Apple's Metal backend is "
                                     "not available here; use device='cpu' or 'auto'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(dev)!r} is not supported here: use 'auto', 'cpu', "
                         "'cuda' or 'mps'")
    return dev


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())
