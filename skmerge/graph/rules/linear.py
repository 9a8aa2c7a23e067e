"""Layers with weights: Linear (``linear``, ``addmm``, a product with a parameter), Conv, Embedding.

A layer reads the channels of its input through its weight's input columns
(consumers) and creates new channels in its output rows and bias
(producers). Everything else about its input is a position: a Linear applies
the same map at every token, a convolution at every pixel, so the labels along
those axes must be one channel (a class token and the patches, say) and are
unified.

Convolutions with ``groups > 1``: a depthwise convolution (one filter per
channel) keeps its input's channels, its filters moving with them (exact for
permutations, like a BatchNorm); a grouped convolution creates new channels
and keeps input and output channels in blocks, one per group (block-diagonal
transforms).
"""

from __future__ import annotations

import torch

from .._labels import CONSUMER, PRODUCER, Layout
from ._registry import ops, rule


def _weight(w, arg, what: str):
    ref = w.param(arg)
    if ref is None:
        w.fail(f"the {what} of this layer is computed in the graph (weight normalization, a "
               "parametrization, a product of tensors), not a parameter, so it cannot be transformed")
    return ref


def dense(w, node, inp, ref, in_axis: int, out_axis: int, bias=None, feature_axis: int = -1) -> Layout:
    """A dense map along ``feature_axis`` of ``inp`` by the parameter ``ref``.

    ``in_axis`` / ``out_axis`` are the parameter's axes that read the input
    channels and create the output channels.
    """
    shape, out_shape = w.shape(inp), w.shape(node)
    lay = w.layout(inp)
    nd = len(shape)
    axis = feature_axis % nd
    out_axis_of_value = axis + (len(out_shape) - nd)
    n_out = ref.shape[out_axis]
    if axis not in lay.axes and any(a != axis for a in lay.feature_axes()):
        # applied along an axis without channels while other axes carry them
        # (a token-mixing MLP): those channels pass, the new units stay as they are
        w.warn(f"{w.where()[0] or 'the model'}: {w.where()[2]} maps an axis without channels while "
               "other axes carry channels; its output units keep each model's basis (merged by "
               "averaging)")
        return Layout.from_full(lay.full(shape).narrow(axis, 0, 1).expand(
            *shape[:axis], n_out, *shape[axis + 1:]))
    lay = w.collapse(lay, shape, (axis,))
    columns = lay.grid(shape, (axis,)).reshape(-1)
    w.read(columns)
    w.bind(ref.name, in_axis, torch.arange(columns.numel()), columns, CONSUMER)
    w.consumer_input(inp)
    atoms = w.new_atoms(n_out)
    w.bind(ref.name, out_axis, torch.arange(n_out), atoms, PRODUCER)
    bias_ref = w.param(bias) if bias is not None else None
    if bias is not None and bias_ref is None and not w.layout(bias).inert:
        w.fail("the bias of this layer is computed in the graph, not a parameter")
    if bias_ref is not None:
        w.bind(bias_ref.name, bias_ref.dims[-1], torch.arange(n_out), atoms, PRODUCER)
    w.former(node)
    return Layout.along(out_axis_of_value, atoms, len(out_shape))


@rule(*ops("linear"))
def linear(w, node) -> Layout:
    args = w.args(node)
    ref = _weight(w, args["weight"], "weight")
    if len(ref.dims) != 2:
        w.fail("a Linear weight that is not 2-d")
    return dense(w, node, args["input"], ref, in_axis=ref.dims[1], out_axis=ref.dims[0], bias=args["bias"])


def param_product(w, node, left, right) -> Layout | None:
    """``features @ parameter`` (or ``parameter @ features``) as a layer; None if neither is one."""
    ref_r, ref_l = w.param(right), w.param(left)
    if ref_r is not None and ref_l is None and len(ref_r.dims) == 2:
        return dense(w, node, left, ref_r, in_axis=ref_r.dims[0], out_axis=ref_r.dims[1])
    if ref_l is not None and ref_r is None and len(ref_l.dims) == 2 and len(w.shape(right)) >= 2:
        return dense(w, node, right, ref_l, in_axis=ref_l.dims[1], out_axis=ref_l.dims[0], feature_axis=-2)
    return None


@rule(*ops("addmm"))
def addmm(w, node) -> Layout:
    """``bias + x @ W`` (GPT-2's Conv1D: ``W`` is ``(in, out)``)."""
    args = w.args(node)
    ref = _weight(w, args["mat2"], "weight")
    return dense(w, node, args["mat1"], ref, in_axis=ref.dims[0], out_axis=ref.dims[1], bias=args["self"])


def _conv(w, node, inp, weight, bias, groups: int, transposed: bool) -> Layout:
    ref = _weight(w, weight, "weight")
    if ref.dims != tuple(range(len(ref.shape))):
        w.fail("a convolution weight read through a transpose")
    shape, out_shape = w.shape(inp), w.shape(node)
    n_spatial = len(ref.shape) - 2
    axis = len(shape) - n_spatial - 1  # 1 for batched inputs, 0 for unbatched ones
    lay = w.collapse(w.layout(inp), shape, (axis,))
    channels = lay.grid(shape, (axis,)).reshape(-1)
    c_in = channels.numel()
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    c_out = out_shape[axis]
    bias_ref = w.param(bias) if bias is not None else None
    w.consumer_input(inp)
    w.former(node)
    if groups == 1:
        w.read(channels)
        w.bind(ref.name, in_axis, torch.arange(c_in), channels, CONSUMER)
        atoms = w.new_atoms(c_out)
        w.bind(ref.name, out_axis, torch.arange(c_out), atoms, PRODUCER)
        if bias_ref is not None:
            w.bind(bias_ref.name, 0, torch.arange(c_out), atoms, PRODUCER)
        return Layout.along(axis, atoms, len(out_shape))
    if not transposed and groups == c_in == c_out:
        # depthwise: one filter per channel, which moves with its channel
        w.bind(ref.name, 0, torch.arange(c_out), channels, PRODUCER)
        if bias_ref is not None:
            w.bind(bias_ref.name, 0, torch.arange(c_out), channels, PRODUCER)
        return Layout.along(axis, channels, len(out_shape))
    if transposed:
        w.fail(f"a grouped transposed convolution (groups={groups})")
    # grouped: channels stay in blocks, one per group, on both sides
    per_in, per_out = c_in // groups, c_out // groups
    family = w.new_family("groups", groups)
    w.link(channels, family.repeat_interleave(per_in))
    atoms = w.new_atoms(c_out)
    w.link(atoms, family.repeat_interleave(per_out))
    w.read(channels)
    w.bind(ref.name, 0, torch.arange(c_out), atoms, PRODUCER)
    if bias_ref is not None:
        w.bind(bias_ref.name, 0, torch.arange(c_out), atoms, PRODUCER)
    # input columns: entry (o, i, kernel) reads channel (group of o) * per_in + i
    kernel = 1
    for s in ref.shape[2:]:
        kernel *= s
    o = torch.arange(c_out)[:, None, None]
    i = torch.arange(per_in)[None, :, None]
    t = torch.arange(kernel)[None, None, :]
    flat = (o * per_in + i) * kernel + t
    read = channels[(o // per_out) * per_in + i].expand_as(flat)
    w.bind(ref.name, -1, flat.reshape(-1), read.reshape(-1), CONSUMER)
    return Layout.along(axis, atoms, len(out_shape))


@rule(*ops("conv1d", "conv2d", "conv3d"))
def conv(w, node) -> Layout:
    args = w.args(node)
    return _conv(w, node, args["input"], args["weight"], args["bias"], int(w.value(args["groups"])), False)


@rule(*ops("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
def conv_transpose(w, node) -> Layout:
    args = w.args(node)
    return _conv(w, node, args["input"], args["weight"], args["bias"], int(w.value(args["groups"])), True)


@rule(*ops("convolution", "_convolution"))
def convolution(w, node) -> Layout:
    args = w.args(node)
    return _conv(w, node, args["input"], args["weight"], args["bias"], int(w.value(args["groups"])),
                 bool(w.value(args["transposed"])))


@rule(*ops("embedding"))
def embedding(w, node) -> Layout:
    args = w.args(node)
    ref = _weight(w, args["weight"], "embedding table")
    if ref.dims != (0, 1):
        w.fail("an embedding table read through a transpose")
    if not w.layout(args["indices"]).inert:
        w.fail("the indices of an embedding are computed from features")
    out_shape = w.shape(node)
    atoms = w.new_atoms(ref.shape[1])
    w.bind(ref.name, 1, torch.arange(ref.shape[1]), atoms, PRODUCER)
    w.former(node)
    return Layout.along(len(out_shape) - 1, atoms, len(out_shape))
