"""The registry of rules: ATen op (overload or overload packet) -> rule."""

from __future__ import annotations

from collections.abc import Callable

import torch

RULES: dict = {}
#: ops that carry their input's channels position by position (tap placement
#: follows them from where channels are formed to where they are observed)
CHAIN: set = set()


def rule(*targets, chain: bool = False) -> Callable:
    """Register a rule for ATen ops (``torch.ops.aten.x`` packets or ``.overload`` objects).

    ``chain=True`` marks ops that keep every channel at its position (an
    activation, a norm, a residual addition): features are observed after
    them, not before.
    """

    def register(fn: Callable) -> Callable:
        for target in targets:
            if target is None:
                continue
            RULES[target] = fn
            if chain:
                CHAIN.add(target)
        return fn

    return register


def ops(*names: str) -> list:
    """ATen overload packets by name (those missing in this torch version are skipped)."""
    return [getattr(torch.ops.aten, n) for n in names if hasattr(torch.ops.aten, n)]


def _key(target):
    if target in RULES:
        return target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in RULES:
        return packet
    return None


def lookup(target) -> Callable | None:
    """The rule of an op: its overload's, its packet's, or the pointwise rule for pointwise ops."""
    key = _key(target)
    if key is not None:
        return RULES[key]
    if torch.Tag.pointwise in getattr(target, "tags", ()):
        from .elementwise import elementwise

        return elementwise
    return None


def is_chain(target) -> bool:
    key = _key(target)
    if key is not None:
        return key in CHAIN
    return torch.Tag.pointwise in getattr(target, "tags", ())
