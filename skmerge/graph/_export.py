"""Tracer front-end: a model becomes one ATen op list with parameter names.

The model is captured with :func:`torch.export.export` (``strict=False``),
which traces what :func:`torch.fx.symbolic_trace` cannot (tensor sizes used
as Python numbers, Hugging Face models) and turns modules and functional calls
alike into high-level ATen ops (``aten.linear``, ``aten.conv2d``,
``aten.layer_norm``, ``aten.scaled_dot_product_attention``, ...), with every
parameter a graph input named by its ``state_dict`` key.

The capture runs on a *structural copy* of the model whose parameters and
buffers live on the ``meta`` device: the user's model is never touched (no
mode switch, no hook, no memory). The batch axis of the inputs is exported as
dynamic where the model allows it, so the same graph runs the alignment
batches of any size (:mod:`skmerge.graph._runner`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.export.graph_signature import InputKind

from ._spaces import _HAND_HINT, UnsupportedOperationError

__all__ = ["Traced", "trace", "meta_copy", "tensor_leaves", "as_args"]

_PREFIX = "model."


def as_args(example_input) -> tuple:
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    return (example_input,)


def tensor_leaves(output) -> list[torch.Tensor]:
    """The tensors of a model's output (tuples, lists, dicts, dataclasses, model outputs).

    Objects that are none of these (a key/value cache, say) are dropped: the
    merge cares about what the model computes, not about its caches.
    """
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        output = list(output.values())
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        output = [getattr(output, f.name) for f in dataclasses.fields(output)]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensor_leaves(item)]
    return []


class _TensorOutputs(nn.Module):
    """Wraps a model so that its output is a flat tuple of tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return tuple(tensor_leaves(self.model(*args)))


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every parameter and buffer on the meta device, in eval mode.

    Shared (tied) parameters stay shared; no memory is copied.
    """
    memo = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in memo:
            continue
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    try:
        clone = copy.deepcopy(model, memo)
    except Exception as exc:  # modules holding uncopyable state (locks, compiled functions)
        raise UnsupportedOperationError(
            f"{type(model).__name__} cannot be copied to trace it ({type(exc).__name__}: {exc}). "
            f"{_HAND_HINT}") from exc
    return clone.eval()


def _concrete(size) -> int:
    if isinstance(size, int):
        return size
    try:
        from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
        return int(guarding_hint_or_throw(size))
    except Exception:  # older torch: the hint lives on the node
        return int(size.node.hint)


def _shape_of(value):
    """Concrete shape(s) of a node's example value: a tuple, a list of those, or None."""
    if isinstance(value, torch.Tensor):
        return tuple(_concrete(s) for s in value.shape)
    if isinstance(value, (tuple, list)):
        return [_shape_of(v) for v in value]
    return None


@dataclass
class Traced:
    """An exported model and what the walker needs to know about its graph.

    Attributes
    ----------
    program : torch.export.ExportedProgram
    graph : torch.fx.Graph
        ``program.graph``.
    params : dict
        Placeholder name -> ``state_dict`` key (canonical alias) of each
        floating parameter or buffer the graph reads.
    aliases : dict
        ``state_dict`` key -> every key of the same tensor (tied weights).
    shapes : dict
        Node -> concrete shape (or list of shapes) at the example input.
    dtypes : dict
        Node -> dtype (or list of dtypes) of its example value.
    model_name : str
    dynamic_batch : bool
        Whether the graph accepts batches of any size.
    input_specs : list
        ``(kind, state_dict key or None)`` per graph input, in order.
    """

    program: object
    graph: torch.fx.Graph
    params: dict
    aliases: dict
    shapes: dict
    dtypes: dict
    model_name: str
    dynamic_batch: bool
    input_specs: list = field(default_factory=list)

    def module_path(self, node) -> str:
        """Path of the innermost module a node was called from (``""`` for the top level)."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = list(stack.values())[-1][0]
        return _strip(path)

    def module_type(self, node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return self.model_name
        cls = list(stack.values())[-1][1]
        name = cls.__name__ if isinstance(cls, type) else str(cls)
        return name.rsplit(".", 1)[-1]


def _strip(path: str) -> str:
    """Drop the wrapper's ``model`` prefix from a module path or parameter name."""
    path = re.sub(r"^L__self___", "", path)
    if path == "model":
        return ""
    return path[len(_PREFIX):] if path.startswith(_PREFIX) else path


def _export(wrapper: nn.Module, args: tuple):
    from torch.export import Dim

    dynamic = tuple({0: Dim.AUTO} if isinstance(a, torch.Tensor) and a.ndim >= 1 else None for a in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(wrapper, args, strict=False, dynamic_shapes={"args": dynamic})
        except Exception:  # a model that pins its batch size: a static graph
            return torch.export.export(wrapper, args, strict=False)


def _first_layer_hint(model: nn.Module) -> str:
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return f"; its first layer {path!r} (Linear) expects {module.in_features} input features on the last axis"
        if isinstance(module, nn.modules.conv._ConvNd):
            return (f"; its first layer {path!r} ({type(module).__name__}) expects "
                    f"{module.in_channels} input channels on axis 1")
        if isinstance(module, nn.Embedding):
            return f"; its first layer {path!r} (Embedding) expects integer indices"
    return ""


def _describe_inputs(args) -> str:
    parts = [f"shape {tuple(a.shape)} and dtype {str(a.dtype).replace('torch.', '')}"
             if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]
    return ", ".join(parts)


def _cannot_run(model: nn.Module, example_args, exc: Exception) -> ValueError:
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ValueError(
        f"{type(model).__name__} cannot run on the example input ({_describe_inputs(example_args)}): "
        f"{cause[:200]}{_first_layer_hint(model)}. The alignment data must be batches the models accept.")


def _not_captured(model: nn.Module, exc: Exception) -> UnsupportedOperationError:
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return UnsupportedOperationError(
        f"torch.export could not trace {type(model).__name__} ({type(exc).__name__}: {cause[:400]}). "
        "find_spaces needs a model that torch.export.export(model, args, strict=False) can capture: "
        "no control flow that depends on tensor values (such as `if x.sum() > 0`). "
        f"{_HAND_HINT}")


def trace(model: nn.Module, example_args: tuple) -> Traced:
    """Export ``model`` on ``example_args`` (the user's model is not touched).

    Raises
    ------
    ValueError
        If the model cannot run on the example inputs (wrong shape or dtype).
    UnsupportedOperationError
        If the model runs but :func:`torch.export.export` cannot capture it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    copy_ = meta_copy(model)
    meta_args = tuple(a.detach().to("meta") if isinstance(a, torch.Tensor) else a for a in example_args)
    wrapper = _TensorOutputs(copy_)
    try:
        program = _export(wrapper, meta_args)
    except Exception as exc:
        try:
            with torch.no_grad():
                copy_(*meta_args)
        except Exception as run_exc:
            cause = str(run_exc).strip().splitlines()[0] if str(run_exc).strip() else type(run_exc).__name__
            if "meta" in cause.lower():  # needs real values: a tracing limit, not a bad input
                raise _not_captured(model, exc) from exc
            raise _cannot_run(model, example_args, run_exc) from None
        raise _not_captured(model, exc) from exc

    state = model.state_dict(keep_vars=True)
    by_tensor: dict[int, list[str]] = {}
    for key, value in state.items():
        by_tensor.setdefault(id(value), []).append(key)
    aliases = {key: by_tensor[id(value)] for key, value in state.items()}

    params, specs = {}, []
    for spec in program.graph_signature.input_specs:
        name = _strip(spec.target) if spec.target is not None else None
        specs.append((spec.kind, name))
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and name in aliases:
            tensor = state[name]
            if tensor.is_floating_point() or tensor.is_complex():
                params[spec.arg.name] = aliases[name][0]

    graph = program.graph
    shapes, dtypes = {}, {}
    for node in graph.nodes:
        value = node.meta.get("val")
        shapes[node] = _shape_of(value)
        dtypes[node] = (value.dtype if isinstance(value, torch.Tensor)
                        else [v.dtype if isinstance(v, torch.Tensor) else None for v in value]
                        if isinstance(value, (tuple, list)) else None)
    dynamic = False
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            value = node.meta.get("val")
            if isinstance(value, torch.Tensor) and value.ndim and not isinstance(value.shape[0], int):
                dynamic = True
    return Traced(program, graph, params, aliases, shapes, dtypes, type(model).__name__, dynamic, specs)
