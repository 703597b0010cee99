"""Checks every second-order solver's settings share: counts, damping, and the device to work on."""

from __future__ import annotations

import math

import torch


def check_counts(owner: str, settings: object, names: tuple[str, ...]) -> None:
    """ValueError unless each named setting is an integer >= 1."""
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner} {name} must be an integer >= 1, got {value!r}")


def check_damp(owner: str, damp: object, diagonal: str) -> None:
    """ValueError unless `damp` is a finite number > 0 (a fraction of the mean `diagonal`)."""
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp <= 0:
        raise ValueError(f"{owner} damp must be a finite number > 0 (a fraction of the mean {diagonal} "
                         f"diagonal, e.g. 0.01), got {damp!r}")


def check_device(owner: str, device: object) -> None:
    """ValueError unless `device` is None or names a torch device."""
    if device is None:
        return
    if not isinstance(device, str):
        raise ValueError(f"{owner} device must be a string such as 'cpu' or 'cuda', or None, got {device!r}")
    try:
        torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"{owner} device {device!r} is not a torch device: {err}") from None


def resolve_device(owner: str, device: str | None) -> torch.device:
    """The device to work on: `device`, or CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{owner} device {device!r} asked for CUDA, which is not available here; "
                         f"use device='cpu' or leave it unset")
    return resolved
