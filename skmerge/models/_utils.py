"""Small helpers shared by the reference architectures."""

from __future__ import annotations


def scaled(channels: int, width: float) -> int:
    """Scale a channel count by a width multiplier.

    Parameters
    ----------
    channels : int
        Channel (or unit) count of the width-1 architecture.
    width : float
        Width multiplier; must be positive.

    Returns
    -------
    int
        ``round(channels * width)``, at least 1.
    """
    if not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    return max(1, int(round(channels * width)))
