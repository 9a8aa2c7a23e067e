"""Normalization layers: their per-channel parameters and statistics move with the channels.

Whether a norm is a module or a functional call with the module's
parameters (a subclassed LayerNorm calling ``F.layer_norm``), the graph holds
one ATen op, so one rule covers both. Exact for permutations; a dense map
does not commute with a per-channel scale or with statistics over the
channels, which is what the merge accepts for every nonlinearity.

- BatchNorm / InstanceNorm: channel axis 1; ``running_var`` transforms as a
  variance (squared map).
- LayerNorm / RMSNorm over the last axes: if the channels are among them, the
  norm reads them together and its weight entries are producers (``H*W``
  entries per channel for ``LayerNorm([C, H, W])``); over other axes it is a
  per-channel op.
- GroupNorm: channels in blocks of ``C / G`` (block-diagonal transforms).
"""

from __future__ import annotations

import math

import torch

from .._labels import NEUTRAL, PRODUCER, Layout
from ._registry import ops, rule


def _formed_here(w, node, inp) -> None:
    """A norm forms channels unless it reads a tensor others read too (a pre-norm of a stream)."""
    if len(getattr(inp, "users", ())) <= 1:
        w.former(node)


def _bind_per_channel(w, channels, arg, variance: bool = False, scale: bool = False) -> None:
    """A norm's per-channel parameter or buffer ``arg`` (None: absent) moves with ``channels``."""
    if arg is None:
        return
    ref = w.param(arg)
    if ref is None:
        if w.layout(arg) is not None and not w.layout(arg).inert:
            w.fail("a normalization parameter computed in the graph")
        return
    w.bind(ref.name, ref.dims[0], torch.arange(channels.numel()), channels, PRODUCER, variance, scale)


def _channelwise_norm(w, node, inp, weight, bias, mean, var, axis=1) -> Layout:
    shape = w.shape(inp)
    axis = axis % len(shape)
    lay = w.collapse(w.layout(inp), shape, (axis,))
    channels = lay.grid(shape, (axis,)).reshape(-1)
    _bind_per_channel(w, channels, weight, scale=True)
    for arg in (bias, mean):
        _bind_per_channel(w, channels, arg)
    _bind_per_channel(w, channels, var, variance=True)
    _formed_here(w, node, inp)
    return lay


@rule(*ops("batch_norm", "instance_norm"), chain=True)
def batch_norm(w, node) -> Layout:
    args = w.args(node)
    return _channelwise_norm(w, node, args["input"], args["weight"], args["bias"], args["running_mean"],
                             args["running_var"])


@rule(*ops("_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm"),
      chain=True)
def native_batch_norm(w, node):
    args = w.args(node)
    lay = _channelwise_norm(w, node, args["input"], args["weight"], args["bias"],
                            args.get("running_mean"), args.get("running_var"))
    return [lay, Layout.constant(NEUTRAL, 1), Layout.constant(NEUTRAL, 1)]


def _layer_norm(w, node, inp, normalized_shape, weight, bias) -> Layout:
    shape = w.shape(inp)
    normed = tuple(range(len(shape) - len(normalized_shape), len(shape)))
    lay = w.layout(inp)
    if not any(a in normed for a in lay.feature_axes()):
        return lay  # statistics over axes without channels: a per-channel op
    lay = w.collapse(lay, shape, normed)
    grid = lay.grid(shape, normed)  # one label per entry of the normalized shape
    w.read(grid)
    for arg in (weight, bias):
        if arg is None:
            continue
        ref = w.param(arg)
        scale = arg is weight
        if ref is None:
            if not w.layout(arg).inert:
                w.fail("a normalization parameter computed in the graph")
            continue
        if ref.value_shape != tuple(normalized_shape):
            w.fail(f"a normalization weight of shape {ref.value_shape} for normalized shape "
                   f"{tuple(normalized_shape)}")
        positions = torch.arange(math.prod(ref.shape)).reshape(ref.shape).permute(ref.dims)
        w.bind(ref.name, -1, positions.reshape(-1), grid.reshape(-1), PRODUCER, scale=scale)
    _formed_here(w, node, inp)
    return lay


@rule(*ops("layer_norm"), chain=True)
def layer_norm(w, node) -> Layout:
    args = w.args(node)
    return _layer_norm(w, node, args["input"], w.value(args["normalized_shape"]), args["weight"], args["bias"])


@rule(*ops("native_layer_norm"), chain=True)
def native_layer_norm(w, node):
    args = w.args(node)
    lay = _layer_norm(w, node, args["input"], w.value(args["normalized_shape"]), args["weight"], args["bias"])
    stats = Layout.constant(NEUTRAL, lay.ndim)
    return [lay, stats, stats]


@rule(*ops("rms_norm"), chain=True)
def rms_norm(w, node) -> Layout:
    args = w.args(node)
    return _layer_norm(w, node, args["input"], w.value(args["normalized_shape"]), args["weight"], None)


def _group_norm(w, node, inp, groups: int, weight, bias) -> Layout:
    shape = w.shape(inp)
    lay = w.collapse(w.layout(inp), shape, (1,))
    channels = lay.grid(shape, (1,)).reshape(-1)
    per = channels.numel() // groups
    if groups > 1 and per >= 1:
        family = w.new_family("groups", groups)
        w.link(channels, family.repeat_interleave(per))
    w.read(channels)
    _bind_per_channel(w, channels, weight, scale=True)
    _bind_per_channel(w, channels, bias)
    _formed_here(w, node, inp)
    return lay


@rule(*ops("group_norm"), chain=True)
def group_norm(w, node) -> Layout:
    args = w.args(node)
    return _group_norm(w, node, args["input"], int(w.value(args["num_groups"])), args["weight"], args["bias"])


@rule(*ops("native_group_norm"), chain=True)
def native_group_norm(w, node):
    args = w.args(node)
    lay = _group_norm(w, node, args["input"], int(w.value(args["group"])), args["weight"], args["bias"])
    stats = Layout.constant(NEUTRAL, 2)
    return [lay, stats, stats]


@rule(*ops("prelu", "_prelu_kernel"), chain=True)
def prelu(w, node) -> Layout:
    """One slope per channel (axis 1), or a single slope."""
    inp, weight = node.args[0], node.args[1]
    shape = w.shape(inp)
    ref = w.param(weight)
    lay = w.layout(inp)
    if ref is None or ref.shape[0] == 1:
        return lay
    axis = 1 if len(shape) > 1 else 0
    lay = w.collapse(lay, shape, (axis,))
    channels = lay.grid(shape, (axis,)).reshape(-1)
    w.bind(ref.name, ref.dims[0], torch.arange(channels.numel()), channels, PRODUCER)
    w.former(node)
    return lay
