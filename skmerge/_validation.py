"""Checks of scalar hyper-parameters (and devices) shared by several estimators and the CLI."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

__all__ = ["check_device", "check_nonnegative_real", "check_positive_int"]


def check_positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1; bools (an int subclass) are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def check_nonnegative_real(value: Any, name: str) -> float:
    """``value`` as a finite float >= 0; bools and strings are refused."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or float(value) < 0
    ):
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}.")
    return float(value)


def check_device(value: Any, name: str = "device") -> torch.device:
    """``value`` as a device that can compute here; ``"auto"`` is CUDA when available, else the CPU.

    The meta device (shapes without values) and devices this machine does
    not have are refused with a message that says so.
    """
    if isinstance(value, str) and value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} {value!r} is not a torch device (try 'cpu', 'cuda' or 'auto').") from None
    if device.type == "meta":
        raise ValueError(f"{name} {value!r}: the meta device holds no values, so nothing can be "
                         "computed on it; use 'cpu', 'cuda' or 'auto'.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {value!r} was asked for, but CUDA is not available.")
    if device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as error:  # backend not built in (each says so differently), no such index
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"{name} {value!r} is not available here: {first}") from None
    return device
