"""Shape ops: views, permutations, slicing, splitting, concatenation, shuffles.

A shape op moves values without combining them, so the labels are moved the
same way: the op itself is applied to the expanded label tensor of its input
(with the concrete sizes of the example), and the result is compressed again.
This follows every index map exactly: a flatten of ``(C, H, W)`` gives each
channel ``H*W`` positions, a reshape into heads spreads the channels over two
axes, a channel shuffle interleaves two branches, a ``chunk`` along the
channels splits them. No rule per shape op is needed beyond knowing which
arguments are tensors.
"""

from __future__ import annotations

import operator

import torch
from torch.fx.node import Node

from .._labels import NEUTRAL, Layout, ParamRef
from ._registry import ops, rule

# Ops that only reorder axes: a parameter read through them stays a parameter
# (so that ``x @ w.T`` is recognized as a layer).
_AXIS_ONLY = set(ops("t", "transpose", "permute", "numpy_T", "alias", "detach", "contiguous", "_to_copy",
                     "to", "clone", "lift_fresh_copy", "type_as"))


def _permutation(w, node, ndim: int) -> tuple | None:
    """The axis order of an axis-only op, or None if it is not one."""
    target = node.target.overloadpacket
    if target in (torch.ops.aten.t, torch.ops.aten.numpy_T):
        return tuple(reversed(range(ndim)))
    if target is torch.ops.aten.transpose:
        a, b = (w.value(x) % ndim for x in node.args[1:3])
        dims = list(range(ndim))
        dims[a], dims[b] = dims[b], dims[a]
        return tuple(dims)
    if target is torch.ops.aten.permute:
        return tuple(d % ndim for d in w.value(node.args[1]))
    return tuple(range(ndim))


def _concrete(w, arg, fill):
    """An argument with tensors replaced by ``fill(node)`` and sizes made concrete."""
    if isinstance(arg, Node):
        if isinstance(w.env.get(arg), (Layout, ParamRef)):
            return fill(arg)
        value = w.value(arg)
        if isinstance(value, Node):  # a tensor without labels (indices computed from inputs)
            return torch.zeros(w.t.shapes[arg], dtype=w.t.dtypes.get(arg) or torch.long)
        return value
    if isinstance(arg, (list, tuple)):
        return type(arg)(_concrete(w, a, fill) for a in arg)
    return arg


def _as_layouts(result):
    if isinstance(result, torch.Tensor):
        return Layout.from_full(result)
    if isinstance(result, (list, tuple)):
        return [_as_layouts(r) for r in result]
    return None


def apply_to_labels(w, node):
    """Run the op itself on the label tensors of its tensor arguments."""

    def fill(arg):
        return w.layout(arg).full(w.shape(arg)).contiguous()

    args = _concrete(w, node.args, fill)
    kwargs = {k: _concrete(w, v, fill) for k, v in node.kwargs.items()}
    kwargs.pop("memory_format", None)
    kwargs.pop("device", None)
    kwargs.pop("dtype", None)
    kwargs.pop("layout", None)
    kwargs.pop("pin_memory", None)
    try:
        return _as_layouts(node.target(*args, **kwargs))
    except Exception as exc:  # pragma: no cover - an op that rejects integer tensors
        w.fail(f"could not follow the channels through it ({type(exc).__name__}: {exc})")


#: Ops that only rearrange the values of their input (no value dropped, repeated or combined): a
#: tensor read through them holds the samples of its source (the walker does not observe them twice).
REARRANGEMENTS = set(ops("view", "reshape", "_unsafe_view", "permute", "transpose", "t", "numpy_T",
                         "unsqueeze", "squeeze", "flatten", "unflatten", "movedim", "alias", "detach",
                         "contiguous", "clone"))


def _numel(shape) -> int:
    n = 1
    for s in shape or ():
        n *= s
    return n


def _same_channels(before: Layout, after: Layout) -> bool:
    """Whether an op kept every channel at one place (only moved, merged or split other axes)."""
    fb, fa = before.feature_axes(), after.feature_axes()
    if len(fb) != 1 or len(fa) != 1:
        return False
    lb = Layout.from_full(before.labels).labels
    la = Layout.from_full(after.labels).labels
    return lb.shape == la.shape and torch.equal(lb, la)


@rule(*ops("view", "reshape", "_unsafe_view", "permute", "transpose", "t", "numpy_T", "unsqueeze",
           "squeeze", "flatten", "unflatten", "expand", "repeat", "tile", "movedim", "alias", "detach",
           "contiguous", "select", "slice", "narrow", "flip", "roll", "pixel_shuffle", "pixel_unshuffle",
           "channel_shuffle", "native_channel_shuffle", "diagonal"))
def shape_op(w, node):
    source = node.args[0]
    ref = w.param(source)
    if ref is not None and node.target.overloadpacket in _AXIS_ONLY:
        dims = _permutation(w, node, len(ref.dims))
        return ref.permuted(dims)
    out = apply_to_labels(w, node)
    before = w.layout(source)
    same_positions = _numel(w.t.shapes.get(node)) == _numel(w.t.shapes.get(source))
    if isinstance(out, Layout) and before is not None and same_positions and _same_channels(before, out):
        w.chain.add(node)  # the channels only moved, no position was dropped: observe after it
    return out


@rule(*ops("cat", "concat", "concatenate", "stack", "hstack", "vstack", "split", "split_with_sizes",
           "chunk", "unbind", "tensor_split", "unsafe_split", "unsafe_chunk", "unsafe_split_with_sizes"))
def split_or_join(w, node):
    return apply_to_labels(w, node)


@rule(*ops("constant_pad_nd", "pad"))
def pad(w, node):
    """Padded positions hold constants: they carry no channel (NEUTRAL)."""
    lay = w.input_layout(node)
    args = w.args(node)
    full = lay.full(w.shape(node.args[0])).contiguous()
    padded = torch.nn.functional.pad(full, list(w.value(args["pad"])), value=NEUTRAL)
    return Layout.from_full(padded)


@rule(*ops("index_select", "gather", "index", "take_along_dim"))
def index(w, node):
    """Indexing along axes without channels (tokens, positions); along the channels it is refused."""
    lay = w.input_layout(node)
    target = node.target.overloadpacket
    shape = w.shape(node.args[0])
    if target is torch.ops.aten.index:
        axes = [i for i, idx in enumerate(node.args[1]) if idx is not None]
    else:
        axes = [w.value(node.args[1]) % len(shape)]
    if any(a in lay.feature_axes() for a in axes):
        w.fail("it indexes the channels with a tensor, an index map skmerge does not follow")
    if any(a in lay.axes for a in axes):
        # entries of a parameter looked up by a constant index (a relative position bias
        # table): the entries of one column are treated as one channel, whatever rows are read
        kept = tuple(a for a in range(len(shape)) if a not in axes)
        w.env[node.args[0]] = w.collapse(lay, shape, kept)
    return apply_to_labels(w, node)


@rule(operator.getitem)
def getitem(w, node):
    source, index = node.args[0], node.args[1]
    value = w.env.get(source)
    if isinstance(value, (list, tuple)):
        return value[w.value(index)]
    w.fail("indexing a value without channels")
