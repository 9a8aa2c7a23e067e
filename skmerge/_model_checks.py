"""Checks of the input models: one architecture, usable tensors.

Architectures are compared by structure, not by class object: two models
built by one factory function that defines its class inside the function
have two distinct classes of the same qualified name, and merge fine. The
structure is the module tree (each module's path and the qualified name of
its type) and the ``state_dict`` layout (keys, shapes, dtypes).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["all_finite", "architecture_difference", "check_model_tensors"]


def _type_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe(path: str) -> str:
    return f"module {path!r}" if path else "the model itself"


def architecture_difference(model: nn.Module, reference: nn.Module, name: str = "the model",
                            reference_name: str = "the reference") -> str | None:
    """How ``model``'s structure differs from ``reference``'s; None when it does not.

    Parameters
    ----------
    model, reference : torch.nn.Module
    name, reference_name : str
        How the messages call them, e.g. ``"models[1]"`` and ``"models[0]"``.

    Returns
    -------
    str or None
        The first difference found: a module of another type or path, a
        missing or extra module or ``state_dict`` key, a shape or a dtype.
    """
    where = f"in {name} but"
    modules = [(path, _type_name(m)) for path, m in model.named_modules()]
    expected = [(path, _type_name(m)) for path, m in reference.named_modules()]
    for (path, kind), (ref_path, ref_kind) in zip(modules, expected):
        if path != ref_path:
            return f"{name} has {_describe(path)} where {reference_name} has {_describe(ref_path)}"
        if kind != ref_kind:
            return f"{_describe(path)} is a {kind} {where} a {ref_kind} in {reference_name}"
    if len(modules) != len(expected):
        if len(modules) > len(expected):
            return f"{name} has an extra {_describe(modules[len(expected)][0])}"
        return f"{name} lacks {reference_name}'s {_describe(expected[len(modules)][0])}"

    state, ref_state = model.state_dict(), reference.state_dict()
    if state.keys() != ref_state.keys():
        missing = sorted(ref_state.keys() - state.keys())[:3]
        extra = sorted(state.keys() - ref_state.keys())[:3]
        parts = ([f"lacks {reference_name}'s keys {missing}"] if missing else []) + (
            [f"has extra keys {extra}"] if extra else [])
        return f"the state_dict of {name} {' and '.join(parts)}"
    for key, tensor in state.items():
        ref = ref_state[key]
        if tensor.shape != ref.shape:
            return f"{key} has shape {tuple(tensor.shape)} {where} {tuple(ref.shape)} in {reference_name}"
        if tensor.dtype != ref.dtype:
            return f"{key} has dtype {tensor.dtype} {where} {ref.dtype} in {reference_name}"
    return None


def check_model_tensors(model: nn.Module, name: str) -> None:
    """Refuse a model whose parameters or buffers cannot be merged, naming the tensor.

    Every tensor must hold data (not the meta device), all must be on one
    device, and the floating ones must be finite: a NaN or inf that no
    activation statistic observes (the last layer's weight, a running
    variance) would otherwise pass silently into the merged model.

    Parameters
    ----------
    model : torch.nn.Module
    name : str
        How to call the model in messages, e.g. ``"models[1]"``.

    Raises
    ------
    ValueError
        On the first offending tensor.
    """
    tensors = [("parameter", key, t) for key, t in model.named_parameters()]
    tensors += [("buffer", key, t) for key, t in model.named_buffers()]
    device = None
    for kind, key, tensor in tensors:
        if tensor.is_meta:
            raise ValueError(
                f"{name} has {kind} {key!r} on the meta device, which holds no values: "
                "materialize the model first (e.g. model.to_empty(device='cpu') and "
                "load_state_dict).")
        if device is None:
            device, first = tensor.device, key
        elif tensor.device != device:
            raise ValueError(
                f"{name} has {kind} {key!r} on {tensor.device} but {first!r} on {device}: "
                "put each model on one device (model.to(device)).")
    for kind, key, tensor in tensors:
        if (tensor.is_floating_point() or tensor.is_complex()) and not all_finite(tensor):
            raise ValueError(
                f"{name} has non-finite values (NaN or inf) in {kind} {key!r}: the merged model "
                "would inherit them. Fix or retrain the model.")


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite, reading the tensor once in the common case.

    A NaN or inf makes the sum non-finite, so a finite sum proves the tensor
    finite; only a non-finite sum (a bad value, or finite values whose sum
    overflows) needs the entrywise check. The sum is several times faster
    than ``isfinite(tensor).all()``, which writes a mask as large as the
    tensor: the check matters for models of hundreds of millions of values.
    """
    accumulate = torch.float32 if tensor.is_floating_point() and tensor.element_size() < 4 else None
    if bool(torch.isfinite(tensor.detach().sum(dtype=accumulate))):
        return True
    return bool(torch.isfinite(tensor).all())
