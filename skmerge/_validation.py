"""Checks of scalar hyper-parameters shared by several estimators."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_nonnegative_real", "check_positive_int"]


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
