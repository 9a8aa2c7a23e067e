"""Position-wise ops: every output position combines the inputs at that position.

The operands are broadcast as PyTorch broadcasts them; at each output
position the channels of all operands become one channel (a residual
addition joins the two branches, a gate joins its gated map). Operands that
are broadcast along the channels do not constrain them: a per-sample scale,
a mask over tokens, a scalar parameter. A parameter that varies along the
channels (a layer scale, a positional embedding, a bias) becomes a producer of
the channels it meets; one that multiplies them (``mul``: a layer scale) is a
scale (see ``ParamSlice.scale``). A constant that varies along the channels fixes them
(reported in a warning: the merge falls back to averaging there).
"""

from __future__ import annotations

import torch

from .._labels import Layout
from ._registry import ops, rule

#: ops whose parameter operands scale the features (``ParamSlice.scale``)
_SCALING_OPS = set(ops("mul", "mul_"))


def _in_output_coords(lay: Layout, shape: tuple, out_nd: int) -> tuple[tuple, tuple]:
    """Varying axes (and feature-varying axes) of an operand, counted on the output's axes."""
    offset = out_nd - len(shape)
    return tuple(a + offset for a in lay.axes), tuple(a + offset for a in lay.feature_axes())


def _grid(lay: Layout, shape: tuple, out_shape: tuple, axes: tuple) -> torch.Tensor:
    """The operand's labels over the output axes ``axes`` (broadcast where it has size 1)."""
    offset = len(out_shape) - len(shape)
    view = [1] * len(axes)
    for i, a in enumerate(lay.axes):
        view[axes.index(a + offset)] = lay.labels.shape[i]
    return lay.labels.reshape(view).expand(tuple(out_shape[a] for a in axes))


def combine(w, node, operands, out_shape: tuple) -> Layout:
    """Labels of a position-wise combination of ``operands`` (argument nodes)."""
    out_nd = len(out_shape)
    entries = []
    for arg in operands:
        lay, shape = w.layout(arg), w.shape(arg)
        varying, feature = _in_output_coords(lay, shape, out_nd)
        entries.append((lay, shape, varying, feature))
    feature_axes = sorted({a for _, _, _, f in entries for a in f})

    def size_on(shape, axis):
        k = axis - (out_nd - len(shape))
        return shape[k] if k >= 0 else 1

    used, constant, binds = [], None, False
    for lay, shape, varying, feature in entries:
        broadcast = [a for a in feature_axes if size_on(shape, a) == 1]
        if lay.has_features and broadcast:
            # one channel (or a few) broadcast over many: they cannot share a transform
            w.fix(lay.labels, reason=f"broadcast over the channels of another tensor ({w.where()[2]})",
                  warn=bool(lay.feature_axes()))
            continue
        if not lay.has_features and feature_axes and all(size_on(shape, a) == 1 for a in feature_axes):
            continue  # a per-position scalar, mask or scale: commutes with any channel map
        if lay.inert and lay.fixed and feature_axes and lay.origin == "constant":
            constant = f"combined with a constant that varies along them ({w.where()[2]})"
        binds = binds or lay.has_params
        used.append((lay, shape, varying))
    if binds and len(used) > 1:
        w.former(node)  # a parameter (bias, scale, embedding) joins the channels here
    if not used:
        return Layout.constant(-1, out_nd)
    axes = tuple(sorted({a for _, _, v in used for a in v}))
    if len(used) == 1:
        lay, shape, _ = used[0]
        grid = _grid(lay, shape, out_shape, axes)
    else:
        grids = [_grid(lay, shape, out_shape, axes).reshape(-1) for lay, shape, _ in used]
        sizes = tuple(out_shape[a] for a in axes)
        scale = getattr(node.target, "overloadpacket", node.target) in _SCALING_OPS
        grid = w.unify(torch.stack(grids, 1), constant=constant, scale=scale).reshape(sizes)
    full_view = [1] * out_nd
    for i, a in enumerate(axes):
        full_view[a] = grid.shape[i]
    return Layout.from_full(grid.reshape(full_view))


def elementwise(w, node) -> Layout:
    """Any position-wise op (also the fallback for ops PyTorch tags ``pointwise``)."""
    shape = w.t.shapes.get(node)
    if not isinstance(shape, tuple):
        w.fail("a position-wise op with several outputs")
    return combine(w, node, w.tensor_args(node), shape)


#: The nonlinearities that form features (``taps="pre_and_post_activation"`` also observes their inputs).
ACTIVATION_NAMES = (
    "relu", "relu_", "relu6", "gelu", "gelu_", "silu", "silu_", "mish", "mish_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "softplus",
    "softshrink", "hardshrink", "threshold", "threshold_", "log_sigmoid",
)
ACTIVATIONS = frozenset(ops(*ACTIVATION_NAMES, "prelu", "_prelu_kernel"))

rule(*ops(
    # arithmetic and comparisons
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "true_divide", "floor_divide",
    "remainder", "fmod", "pow", "pow_", "maximum", "minimum", "fmax", "fmin", "where", "lerp", "lerp_",
    "addcmul", "addcdiv", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_not", "logical_xor", "masked_fill", "masked_fill_", "bitwise_and", "bitwise_or",
    "bitwise_not", "copysign", "hypot", "atan2", "xlogy",
    # activations and unary maths
    *ACTIVATION_NAMES,
    "exp", "exp_", "exp2", "expm1", "log", "log_", "log1p", "log2", "log10", "sqrt", "sqrt_", "rsqrt",
    "rsqrt_", "square", "abs", "abs_", "neg", "neg_", "sign", "sgn", "sin", "cos", "tan", "erf",
    "erfc", "erfinv", "reciprocal", "reciprocal_", "floor", "ceil", "round", "trunc", "frac",
    "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "clip", "clip_",
    "nan_to_num", "nan_to_num_", "isnan", "isinf", "isfinite", "logit", "sinh", "cosh", "asinh",
    "acosh", "atanh", "asin", "acos", "atan",
    # identities in eval mode, casts, copies
    "dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout",
    "feature_alpha_dropout", "clone", "alias", "detach", "detach_", "contiguous", "_to_copy", "to",
    "type_as", "lift_fresh_copy", "copy", "_assert_tensor_metadata", "zero_", "fill_",
), chain=True)(elementwise)


@rule(*ops("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
           "randint_like", "new_zeros", "new_ones", "new_full", "new_empty", "scalar_tensor"))
def constant_like(w, node) -> Layout:
    """A tensor of constants shaped like a feature tensor: it carries no channel."""
    return w.constant_like(node, 0, "constant")


@rule(*ops("native_dropout"))
def native_dropout(w, node):
    """``(output, mask)``: the mask is a constant in eval mode."""
    lay = w.input_layout(node)
    return [lay, Layout.constant(0, lay.ndim, "constant")]


@rule(*ops("glu"))
def glu(w, node) -> Layout:
    """``a * sigmoid(b)`` for the two halves along ``dim``: the halves become one channel."""
    args = w.args(node)
    lay, shape = w.layout(args["self"]), w.shape(args["self"])
    dim = w.value(args["dim"]) % len(shape)
    half = shape[dim] // 2
    full = lay.full(shape).contiguous()
    a, b = full.narrow(dim, 0, half), full.narrow(dim, half, half)
    out = w.unify(torch.stack([a.reshape(-1), b.reshape(-1)], 1)).reshape(a.shape)
    return Layout.from_full(out)
