"""Reductions, pooling and ops along one axis (softmax, cumulative sums, sorting).

Over axes without channels (pixels, tokens) these act on every channel alike:
the channels pass, and labels that differed along the reduced axes (a class
token and the patches) are unified first. Over the channel axis:

- reductions that do not depend on the channels' order (sum, mean, max,
  norms, variance) give a per-sample value that carries no channel;
- softmax and log-softmax keep the channels (they commute with permutations);
- ops that depend on the order of the channels (cumulative sums, sorting,
  argmax) cannot be transformed: the channels are fixed and a warning says the
  merge falls back to averaging there.
"""

from __future__ import annotations

import torch

from .._labels import FIXED, NEUTRAL, Layout
from ._registry import ops, rule


def _dims(w, dim, ndim: int) -> list[int]:
    dim = w.value(dim)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(ndim))
    if isinstance(dim, int):
        return [dim % ndim]
    return [d % ndim for d in dim]


def reduce_over(w, node, inp, dims: list[int], keepdim: bool) -> Layout:
    shape = w.shape(inp)
    lay = w.layout(inp)
    over_channels = [d for d in dims if d in lay.feature_axes()]
    if over_channels:
        w.read(lay.labels)
        kept = [a for a in lay.feature_axes() if a not in dims]
        if kept:
            w.fail("it reduces over some channel axes and keeps others")
        out_nd = len(w.shape(node))
        return Layout.constant(NEUTRAL, out_nd)
    keep = tuple(a for a in range(len(shape)) if a not in dims)
    lay = w.collapse(lay, shape, keep)
    full = lay.full(shape)
    for d in sorted(dims, reverse=True):
        full = full.narrow(d, 0, 1) if keepdim else full.select(d, 0)
    return Layout.from_full(full)


@rule(*ops("mean", "sum", "nansum", "nanmean", "amax", "amin", "prod", "logsumexp", "std", "var",
           "linalg_vector_norm", "norm", "any", "all", "count_nonzero"))
def reduction(w, node):
    args = w.args(node) if hasattr(node.target, "_schema") else {}
    inp = node.args[0]
    dim = args.get("dim", None)
    if dim is None and "dims" in args:
        dim = args["dims"]
    keepdim = bool(w.value(args.get("keepdim", False)) or False)
    shape = w.shape(inp)
    out = reduce_over(w, node, inp, _dims(w, dim, len(shape)), keepdim)
    if isinstance(w.t.shapes.get(node), list):
        return [out, out]
    return out


@rule(*ops("max", "min", "median", "nanmedian", "mode", "kthvalue"))
def max_min(w, node):
    """``max(x)``, ``max(x, dim)`` -> (values, indices), or the elementwise ``max(x, y)``."""
    from .elementwise import elementwise

    tensors = w.tensor_args(node)
    if len(tensors) > 1:
        return elementwise(w, node)
    inp = node.args[0]
    shape = w.shape(inp)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = bool(w.value(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)))
    out = reduce_over(w, node, inp, _dims(w, dim, len(shape)), keepdim)
    if isinstance(w.t.shapes.get(node), list):
        return [out, _order_dependent(w, inp, _dims(w, dim, len(shape)), out)]
    return out


def _order_dependent(w, inp, dims, out: Layout) -> Layout:
    """Indices along ``dims``: over the channels they depend on their order (fixed)."""
    if any(d in w.layout(inp).feature_axes() for d in dims):
        return Layout.constant(FIXED, out.ndim, "constant")
    return out


@rule(*ops("argmax", "argmin"))
def argmax(w, node):
    inp = node.args[0]
    shape = w.shape(inp)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = bool(w.value(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)))
    dims = _dims(w, dim, len(shape))
    lay = w.layout(inp)
    if any(d in lay.feature_axes() for d in dims):
        w.fix(lay.labels, reason=f"read by {w.where()[2]}, which depends on their order", warn=True)
        w.warn(_order_message(w))
        return Layout.constant(FIXED, len(w.shape(node)), "constant")
    return reduce_over(w, node, inp, dims, keepdim)


def _order_message(w) -> str:
    path, _, what = w.where()
    return (f"{path or 'the top level of the model'}: {what} depends on the order of the channels, so "
            "the channels it reads keep each model's basis (the merge falls back to averaging there)")


@rule(*ops("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"))
def softmax(w, node):
    inp = node.args[0]
    shape = w.shape(inp)
    dim = w.value(node.args[1]) % len(shape)
    lay = w.layout(inp)
    if dim in lay.feature_axes():
        w.read(lay.labels)
        return lay  # commutes with permutations of the channels
    return w.collapse(lay, shape, tuple(a for a in range(len(shape)) if a != dim))


@rule(*ops("cumsum", "cumprod", "cummax", "cummin", "sort", "argsort", "topk", "msort", "logcumsumexp"))
def order_dependent(w, node):
    inp = node.args[0]
    shape = w.shape(inp)
    target = node.target.overloadpacket
    if target is torch.ops.aten.topk:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    elif target in (torch.ops.aten.sort, torch.ops.aten.argsort):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", -1)
        if not isinstance(w.value(dim), int):
            dim = -1
    elif target is torch.ops.aten.msort:
        dim = 0
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dim = w.value(dim) % len(shape)
    lay = w.layout(inp)
    out_shapes = w.t.shapes.get(node)
    if dim in lay.feature_axes():
        w.fix(lay.labels, reason=f"read by {w.where()[2]}, which depends on their order", warn=True)
        w.warn(_order_message(w))
        fixed = Layout.constant(FIXED, len(shape), "constant")
        return [fixed, fixed] if isinstance(out_shapes, list) else fixed
    lay = w.collapse(lay, shape, tuple(a for a in range(len(shape)) if a != dim))
    if isinstance(out_shapes, list):
        return [Layout.from_full(lay.full(shape).narrow(dim, 0, 1).expand(s)) for s in out_shapes]
    return Layout.from_full(lay.full(shape).narrow(dim, 0, 1).expand(out_shapes))


def _pool(w, node, n_axes: int | None):
    """Pooling and resampling of the last ``n_axes`` axes (all but the first two when None)."""
    inp = node.args[0]
    shape = w.shape(inp)
    nd = len(shape)
    n_axes = nd - 2 if n_axes is None else n_axes
    pooled = tuple(range(nd - n_axes, nd))
    lay = w.layout(inp)
    if any(a in pooled for a in lay.feature_axes()):
        w.fail(f"it pools over the last {n_axes} axes, which carry channels")
    lay = w.collapse(lay, shape, tuple(a for a in range(nd) if a not in pooled))
    out = w.t.shapes.get(node)
    if isinstance(out, list):  # (values, indices)
        return [Layout.from_full(lay.full(shape).narrow(pooled[0], 0, 1).expand(s)
                                 if len(s) == nd else lay.full(shape)) for s in out]
    if len(out) != nd:
        w.fail("it changes the number of axes")
    index = tuple(slice(0, 1) if a in pooled else slice(None) for a in range(nd))
    return Layout.from_full(lay.full(shape)[index].expand(out))


for _n in (1, 2, 3):
    rule(*ops(f"max_pool{_n}d", f"max_pool{_n}d_with_indices", f"avg_pool{_n}d", f"adaptive_avg_pool{_n}d",
              f"_adaptive_avg_pool{_n}d", f"adaptive_max_pool{_n}d", f"lp_pool{_n}d",
              f"fractional_max_pool{_n}d"))(lambda w, node, _k=_n: _pool(w, node, _k))
rule(*ops("upsample_nearest1d"))(lambda w, node: _pool(w, node, 1))
rule(*ops("upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d", "_upsample_bilinear2d_aa",
          "_upsample_nearest_exact2d"))(lambda w, node: _pool(w, node, 2))
rule(*ops("upsample_nearest3d", "upsample_trilinear3d"))(lambda w, node: _pool(w, node, 3))
rule(*ops("upsample_linear1d", "_upsample_nearest_exact1d"))(lambda w, node: _pool(w, node, 1))
