"""Find the feature spaces of a model: torch.fx tracing plus per-op rules.

The model is traced with :func:`torch.fx.symbolic_trace`, the traced graph is
run once on the example input (:class:`torch.fx.passes.shape_prop.ShapeProp`)
so every node has concrete shapes, and a walk over the nodes gives every
tensor a :class:`~skmerge.graph._layout.Layout`. Elements of a union-find
stand for the outputs of Linear/Conv layers; the rules join elements that
must share one transform. Every union-find class not joined to the model's
inputs or outputs becomes a :class:`Space`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import Node, _get_qualified_name, map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ._layout import FIXED, FIXED_LAYOUT, Layout, positions, probe_axis, reshape_axis, slice_pieces
from ._spaces import _HAND_HINT, ParamSlice, Space, Tap, UnsupportedOperationError
from ._unionfind import UnionFind

__all__ = ["find_spaces"]


# --------------------------------------------------------------------------
# op tables (built with getattr so a missing op in some torch version is fine)


def _fns(module, names):
    return {getattr(module, n) for n in names if hasattr(module, n)}


_ELEMENTWISE_NAMES = (
    "add sub subtract mul multiply div divide true_divide floor_divide remainder fmod pow "
    "maximum minimum fmax fmin where clamp clip clamp_min clamp_max abs neg negative exp exp2 "
    "expm1 log log1p log2 sqrt rsqrt square sign sin cos erf reciprocal floor ceil round trunc "
    "frac relu relu_ sigmoid sigmoid_ tanh tanh_ selu celu gt ge lt le eq ne logical_and "
    "logical_or logical_not logical_xor masked_fill nan_to_num lerp addcmul addcdiv isnan isfinite "
    "zeros_like ones_like full_like empty_like rand_like randn_like clone detach"
).split()
_F_ELEMENTWISE_NAMES = (
    "relu relu_ relu6 elu elu_ selu celu gelu silu mish leaky_relu leaky_relu_ hardtanh hardtanh_ "
    "hardswish hardsigmoid softplus softsign softshrink hardshrink tanhshrink logsigmoid sigmoid "
    "tanh threshold threshold_ rrelu dropout dropout1d dropout2d dropout3d alpha_dropout "
    "feature_alpha_dropout"
).split()
_OPERATOR_NAMES = (
    "add sub mul truediv floordiv mod pow neg pos abs iadd isub imul itruediv gt ge lt le eq ne "
    "and_ or_ xor invert"
).split()
_ELEMENTWISE_FUNCS = (
    _fns(torch, _ELEMENTWISE_NAMES) | _fns(F, _F_ELEMENTWISE_NAMES) | _fns(operator, _OPERATOR_NAMES)
)
_ELEMENTWISE_METHODS = set(
    (
        "add add_ sub sub_ mul mul_ div div_ true_divide floor_divide remainder fmod pow pow_ "
        "neg neg_ abs abs_ exp exp_ log log_ log1p sqrt sqrt_ rsqrt square sign sin cos erf "
        "reciprocal floor ceil round trunc frac relu relu_ sigmoid sigmoid_ tanh tanh_ clamp clamp_ "
        "clip clip_ clamp_min clamp_max maximum minimum where masked_fill masked_fill_ gt ge lt le eq "
        "ne logical_not nan_to_num lerp addcmul addcdiv isnan isfinite zero_ fill_"
    ).split()
)
# the output follows the first argument only (the others are dtypes/devices/like-tensors)
_UNARY_METHODS = set(
    "to type type_as float double half bfloat16 contiguous clone detach detach_ cpu cuda "
    "requires_grad_".split()
)
# constants built from a tensor's shape/dtype: never transformed
_CONSTANT_METHODS = set("new_zeros new_ones new_full new_empty new_tensor".split())

_REDUCE_NAMES = (
    "mean sum nansum nanmean amax amin max min std var prod logsumexp norm argmax argmin all any "
    "median".split()
)
_REDUCE_FUNCS = _fns(torch, _REDUCE_NAMES)
_REDUCE_METHODS = set(_REDUCE_NAMES)

_PERMUTE_NAMES = "permute transpose movedim moveaxis swapaxes swapdims t".split()
_PERMUTE_FUNCS = _fns(torch, _PERMUTE_NAMES)
_PERMUTE_METHODS = set(_PERMUTE_NAMES)
_PERMUTE_ATTRS = {"T", "mT", "H", "mH"}

_RESHAPE_NAMES = "flatten reshape squeeze unsqueeze unflatten".split()
_RESHAPE_FUNCS = _fns(torch, _RESHAPE_NAMES)
_RESHAPE_METHODS = set(_RESHAPE_NAMES) | {"view", "view_as", "reshape_as"}

_EXPAND_METHODS = {"expand", "expand_as", "repeat", "tile", "broadcast_to"}
_EXPAND_FUNCS = _fns(torch, ["broadcast_to", "tile"])

# ops along one dimension that keep the shape: (position of dim, keyword, default)
_DIMWISE_FUNCS = {
    **{f: (1, "dim", None) for f in _fns(torch, ["softmax", "log_softmax", "cumsum", "cumprod", "flip"])},
    **{f: (1, "dim", None) for f in _fns(F, ["softmax", "log_softmax", "softmin"])},
    **{f: (2, "dims", None) for f in _fns(torch, ["roll"])},
    **{f: (2, "dim", 1) for f in _fns(F, ["normalize"])},
}
_DIMWISE_METHODS = {
    "softmax": (1, "dim", None),
    "log_softmax": (1, "dim", None),
    "cumsum": (1, "dim", None),
    "cumprod": (1, "dim", None),
    "flip": (1, "dims", None),
    "roll": (2, "dims", None),
}

# pooling-like functions acting on the trailing `n` axes (None: all but the first two)
_POOL_FUNCS = {}
for _n in (1, 2, 3):
    for _name in (
        f"max_pool{_n}d",
        f"avg_pool{_n}d",
        f"adaptive_avg_pool{_n}d",
        f"adaptive_max_pool{_n}d",
        f"adaptive_max_pool{_n}d_with_indices",
        f"max_pool{_n}d_with_indices",
        f"lp_pool{_n}d",
    ):
        if hasattr(F, _name):
            _POOL_FUNCS[getattr(F, _name)] = _n
for _f in _fns(F, ["interpolate", "upsample", "upsample_nearest", "upsample_bilinear"]):
    _POOL_FUNCS[_f] = None

_CAT_FUNCS = _fns(torch, ["cat", "concat", "concatenate"])
_STACK_FUNCS = _fns(torch, ["stack"])
_SPLIT_NAMES = ["split", "chunk", "tensor_split", "unbind"]
_SPLIT_FUNCS = _fns(torch, _SPLIT_NAMES)

_ACTIVATION_MODULES = tuple(
    getattr(nn, n)
    for n in (
        "ReLU ReLU6 LeakyReLU RReLU ELU SELU CELU GELU SiLU Mish Sigmoid Tanh Hardtanh Hardswish "
        "Hardsigmoid Softplus Softsign Softshrink Hardshrink Tanhshrink LogSigmoid Threshold "
        "Identity Dropout Dropout1d Dropout2d Dropout3d AlphaDropout FeatureAlphaDropout"
    ).split()
    if hasattr(nn, n)
)
_POOL_MODULES = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
_PAD_MODULES = tuple(
    getattr(nn.modules.padding, n)
    for n in ("_ConstantPadNd", "_ReflectionPadNd", "_ReplicationPadNd", "_CircularPadNd")
    if hasattr(nn.modules.padding, n)
)
_BATCHNORM_MODULES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def _spatial_dims(module: nn.Module, ndim: int) -> int:
    """Number of trailing axes a pooling/padding/upsampling module acts on."""
    name = type(module).__name__
    for n in (1, 2, 3):
        if name.endswith(f"{n}d"):
            return n
    return ndim - 2


# --------------------------------------------------------------------------
# the walk


@dataclass
class _Element:
    """One Linear/Conv/Embedding output: the atoms the union-find joins."""

    dim: int
    name: str
    producers: list = field(default_factory=list)
    consumers: list = field(default_factory=list)
    taps: list = field(default_factory=list)
    group: int = 0  # block-diagonal constraint (0: none)


class _ShapeProp(ShapeProp):
    """ShapeProp that also keeps non-tensor results (sizes used as arguments)."""

    def run_node(self, n):
        result = super().run_node(n)
        if "tensor_meta" not in n.meta:
            n.meta["skmerge_value"] = result
        return result


def _has_tensor(meta) -> bool:
    if isinstance(meta, TensorMetadata):
        return True
    if isinstance(meta, (tuple, list)):
        return any(_has_tensor(m) for m in meta)
    if isinstance(meta, dict):
        return any(_has_tensor(m) for m in meta.values())
    return False


#: stands for a tensor argument where a concrete (non-tensor) value was expected
_TENSOR = object()


class _Walker:
    """Walk a shape-propagated GraphModule and collect the spaces."""

    def __init__(self, gm: torch.fx.GraphModule, model: nn.Module):
        self.gm = gm
        self.model_name = type(model).__name__
        state = model.state_dict(keep_vars=True)
        self.state_keys = set(state)
        # shared parameters appear under several keys; every copy must move
        by_tensor: dict[int, list[str]] = {}
        for k, v in state.items():
            by_tensor.setdefault(id(v), []).append(k)
        self.aliases = {k: by_tensor[id(v)] for k, v in state.items()}
        self.uf = UnionFind()
        self.elements: list[_Element] = []
        self._new_element(0, "<model inputs/outputs>")  # FIXED
        self.env: dict[Node, object] = {}
        self.calls: dict[str, tuple] = {}  # module path -> (input layout, output layout)
        self.node: Node | None = None

    # ---- errors --------------------------------------------------------

    def _where(self, node: Node):
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)
            return node.target, type(mod).__name__, f"{type(mod).__name__} module"
        stack = node.meta.get("nn_module_stack") or {}
        path, cls = "", self.model_name
        if stack:
            path, cls = list(stack.values())[-1]
            cls = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1])
        if node.op == "call_function":
            try:
                what = _get_qualified_name(node.target)
            except Exception:  # builtins without a qualified name
                what = getattr(node.target, "__name__", repr(node.target))
            what = what.replace("_operator.", "operator.")
        elif node.op == "call_method":
            what = f"Tensor.{node.target}"
        else:
            what = f"{node.op} {node.target}"
        return path, cls, what

    def fail(self, reason: str, node: Node | None = None):
        node = node or self.node
        path, cls, what = self._where(node)
        place = f"module {path!r} ({cls})" if path else f"the top level of the model ({cls})"
        raise UnsupportedOperationError(
            f"No rule for node {node.name!r} ({node.op} {what}) in {place}: {reason}. "
            f"skmerge refuses to guess a feature space it cannot prove. {_HAND_HINT}",
            node=node.name,
            target=what,
            module_path=path,
        )

    # ---- union-find helpers -----------------------------------------------

    def _new_element(self, dim: int, name: str) -> int:
        elem = self.uf.add()
        self.elements.append(_Element(dim, name, group=0))
        return elem

    def fix(self, layout):
        """Join every space of a layout (or nested tuple) to FIXED."""
        if isinstance(layout, Layout):
            for elem, _ in layout.pieces:
                self.uf.union(FIXED, elem)
        elif isinstance(layout, (tuple, list)):
            for item in layout:
                self.fix(item)

    def join(self, a: Layout, b: Layout, what: str = "the operands"):
        """One transform for two tensors combined position by position."""
        if a.fixed or b.fixed:
            self.fix(a)
            self.fix(b)
            return
        if a.block != b.block or [n for _, n in a.pieces] != [n for _, n in b.pieces]:
            self.fail(
                f"{what} carry different feature layouts ({a.describe()} vs {b.describe()}), "
                "so they cannot share one transform"
            )
        for (ea, _), (eb, _) in zip(a.pieces, b.pieces):
            self.uf.union(ea, eb)

    # ---- node access -----------------------------------------------------

    @staticmethod
    def meta(node):
        return node.meta.get("tensor_meta") if isinstance(node, Node) else None

    def shape(self, node) -> tuple:
        meta = self.meta(node)
        if not isinstance(meta, TensorMetadata):
            self.fail(f"expected a tensor argument, got {node!r}")
        return tuple(meta.shape)

    def value(self, arg):
        """Concrete value of a non-tensor argument (sizes computed in the graph)."""
        if isinstance(arg, Node):
            if _has_tensor(arg.meta.get("tensor_meta")):
                return _TENSOR
            return arg.meta.get("skmerge_value")
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        if isinstance(arg, slice):  # x[:, :n] with n computed in the graph
            return slice(self.value(arg.start), self.value(arg.stop), self.value(arg.step))
        return arg

    def arg(self, node, pos, name, default=None):
        if len(node.args) > pos:
            return self.value(node.args[pos])
        return self.value(node.kwargs.get(name, default))

    def layouts_in(self, node) -> list:
        """All layouts among a node's arguments (nested tuples flattened)."""
        found = []

        def visit(a):
            v = self.env.get(a) if isinstance(a, Node) else None
            stack = [v]
            while stack:
                x = stack.pop()
                if isinstance(x, Layout):
                    found.append(x)
                elif isinstance(x, (tuple, list)):
                    stack.extend(x)
            return a

        map_aggregate(node.args, visit)
        map_aggregate(node.kwargs, visit)
        return found

    def fixed_like(self, node):
        """FIXED layout with the structure (tensor or tuple) of a node's output."""

        def conv(meta):
            if isinstance(meta, TensorMetadata):
                return FIXED_LAYOUT
            if isinstance(meta, (tuple, list)):
                return tuple(conv(m) for m in meta)
            return None

        return conv(node.meta.get("tensor_meta"))

    def input_layout(self, node, pos=0) -> Layout:
        a = node.args[pos] if len(node.args) > pos else None
        lay = self.env.get(a) if isinstance(a, Node) else None
        if not isinstance(lay, Layout):
            self.fail("expected a tensor input")
        return lay

    # ---- slices ----------------------------------------------------------

    def add_slice(self, elem: int, role: str, key: str, axis: int, index, variance=False):
        if key not in self.state_keys:
            self.fail(
                f"parameter {key!r} is not in the state_dict (weight norm or a parametrization?) "
                "so it cannot be transformed"
            )
        target = getattr(self.elements[elem], role)
        for alias in self.aliases[key]:
            target.append(ParamSlice(alias, axis, index, variance))

    def param_slices(self, path, mod, layout: Layout, names, axis, dims_of, p=0, role="producers", flat=False):
        """Slices of each piece of ``layout`` in the named parameters of ``mod``."""
        for attr in names:
            tensor = getattr(mod, attr, None)
            if not isinstance(tensor, torch.Tensor):
                continue
            dims = dims_of(tensor)
            variance = attr == "running_var"
            for off, elem, n in layout.offsets():
                index = positions(dims, p, off, n, layout.block, flat)
                self.add_slice(elem, role, f"{path}.{attr}", axis, index, variance)

    # ---- shared modules ---------------------------------------------------

    def repeated_call(self, path: str, layout: Layout):
        """For a module seen before: join this input with the first one's."""
        if path not in self.calls:
            return None
        first_in, first_out = self.calls[path]
        self.join(first_in, layout, f"the inputs of the shared module {path!r}")
        return first_out

    # ---- the walk ----------------------------------------------------------

    def run(self) -> list[Space]:
        for node in self.gm.graph.nodes:
            self.node = node
            if node.op in ("placeholder", "get_attr"):
                # inputs, parameters and buffers used as tensors: never transformed
                self.env[node] = self.fixed_like(node)
            elif node.op == "output":
                self.fix(self.layouts_in(node))
            elif not _has_tensor(node.meta.get("tensor_meta")):
                self.env[node] = None  # sizes, dtypes, ...: no feature axis
            elif node.op == "call_module":
                self.env[node] = self.call_module(node)
            elif node.op == "call_function":
                self.env[node] = self.call_function(node)
            elif node.op == "call_method":
                self.env[node] = self.call_method(node)
            else:  # pragma: no cover - torch.fx has no other ops today
                self.fail("unknown node kind")
        return self.collect()

    def collect(self) -> list[Space]:
        classes: dict[int, list[int]] = {}
        for elem in range(1, len(self.elements)):
            classes.setdefault(self.uf.find(elem), []).append(elem)
        fixed_root = self.uf.find(FIXED)
        spaces = []
        for root, elems in classes.items():
            if root == fixed_root:
                continue
            first = self.elements[elems[0]]
            producers, consumers, taps = [], [], []
            block = first.dim
            for e in elems:
                el = self.elements[e]
                if el.dim != first.dim:  # pragma: no cover - join() checks sizes
                    raise AssertionError("joined elements of different sizes")
                producers += [s for s in el.producers if s not in producers]
                consumers += [s for s in el.consumers if s not in consumers]
                taps += [t for t in el.taps if t not in taps]
                if el.group:
                    block = math.gcd(block, el.group)
            if not taps:  # never read by a Linear/Conv (dead code): nothing to align
                continue
            name = first.name + (f" (+{len(elems) - 1} joined)" if len(elems) > 1 else "")
            spaces.append(Space(first.dim, producers, consumers, taps, block, name))
        return spaces

    # ---- call_module -------------------------------------------------------

    def call_module(self, node):
        path = node.target
        mod = self.gm.get_submodule(path)
        if isinstance(mod, nn.Linear):
            return self.linear(node, path, mod)
        if isinstance(mod, nn.modules.conv._ConvNd):
            return self.conv(node, path, mod)
        if isinstance(mod, nn.Embedding):
            return self.embedding(node, path, mod)
        if all(lay.fixed for lay in self.layouts_in(node)):
            # computed from untransformed tensors only; a module with state seen
            # here must stay untransformed wherever else it is called
            if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                if self.repeated_call(path, FIXED_LAYOUT) is None:
                    self.calls[path] = (FIXED_LAYOUT, FIXED_LAYOUT)
            return self.fixed_like(node)
        if isinstance(mod, _BATCHNORM_MODULES):
            return self.batchnorm(node, path, mod)
        if isinstance(mod, nn.LayerNorm):
            return self.layernorm(node, path, mod)
        if isinstance(mod, nn.GroupNorm):
            return self.groupnorm(node, path, mod)
        if isinstance(mod, nn.PReLU):
            return self.prelu(node, path, mod)
        if isinstance(mod, _ACTIVATION_MODULES):
            return self.input_layout(node)
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
            return self.dimwise(node, mod.dim)
        if isinstance(mod, nn.Softmax2d):
            return self.dimwise(node, -3)
        if isinstance(mod, _POOL_MODULES) or isinstance(mod, nn.Upsample):
            lay = self.input_layout(node)
            return self.trailing(node, lay, _spatial_dims(mod, len(self.shape(node.args[0]))))
        if _PAD_MODULES and isinstance(mod, _PAD_MODULES):
            return self.trailing(node, self.input_layout(node), len(mod.padding) // 2)
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node)
        self.fail(f"there is no rule for {type(mod).__name__} modules")

    def linear(self, node, path, mod):
        lay = self.input_layout(node)
        nd = len(self.shape(node.args[0]))
        if not lay.fixed and lay.axis != nd - 1:
            self.fail(
                f"Linear reads the last axis but the features are on axis {lay.axis} of a {nd}-d tensor"
            )
        out_nd = len(self.shape(node))
        first = self.repeated_call(path, lay)
        if first is not None:
            self.add_taps(path, lay, -1)
            return first.with_axis(out_nd - 1)
        self.consume(path, mod, lay, tap_axis=-1, weight_axis=1)
        out = self.produce(path, mod, mod.out_features, weight_axis=0, out_axis=out_nd - 1)
        self.calls[path] = (lay, out)
        return out

    def conv(self, node, path, mod):
        lay = self.input_layout(node)
        nd = len(self.shape(node.args[0]))
        if mod.groups != 1:
            self.fail(
                f"grouped/depthwise convolutions (groups={mod.groups}) tie input and output channels "
                "group by group, which a per-space transform cannot express yet"
            )
        n_spatial = len(mod.kernel_size)
        axis = nd - n_spatial - 1  # 1 for batched inputs, 0 for unbatched ones
        if not lay.fixed and lay.axis != axis:
            self.fail(f"{type(mod).__name__} reads axis {axis} but the features are on axis {lay.axis}")
        first = self.repeated_call(path, lay)
        if first is not None:
            self.add_taps(path, lay, 1)
            return first
        # ConvTranspose weights are (in, out, ...): the two roles swap axes
        in_axis, out_axis = (0, 1) if mod.transposed else (1, 0)
        self.consume(path, mod, lay, tap_axis=1, weight_axis=in_axis)
        out = self.produce(path, mod, mod.out_channels, weight_axis=out_axis, out_axis=axis)
        self.calls[path] = (lay, out)
        return out

    def embedding(self, node, path, mod):
        lay = self.input_layout(node)
        if not lay.fixed:
            self.fail("the indices of an Embedding are computed from features")
        out_nd = len(self.shape(node))
        if path in self.calls:
            return self.calls[path][1].with_axis(out_nd - 1)
        elem = self._new_element(mod.embedding_dim, path)
        out = Layout(out_nd - 1, ((elem, mod.embedding_dim),))
        self.param_slices(path, mod, out, ["weight"], 1, lambda t: t.shape[1:])
        self.calls[path] = (lay, out)
        return out

    def add_taps(self, path, lay: Layout, tap_axis: int):
        if lay.fixed:
            return
        for off, elem, n in lay.offsets():
            tap = Tap(path, tap_axis, off, lay.block, n)
            taps = self.elements[elem].taps
            if tap not in taps:
                taps.append(tap)

    def consume(self, path, mod, lay: Layout, tap_axis, weight_axis):
        if lay.fixed:
            return
        self.add_taps(path, lay, tap_axis)
        self.param_slices(path, mod, lay, ["weight"], weight_axis, lambda t: t.shape[weight_axis:], role="consumers")

    def produce(self, path, mod, n_out, weight_axis, out_axis) -> Layout:
        elem = self._new_element(n_out, path)
        out = Layout(out_axis, ((elem, n_out),))
        self.param_slices(path, mod, out, ["weight"], weight_axis, lambda t: t.shape[weight_axis:])
        self.param_slices(path, mod, out, ["bias"], 0, lambda t: t.shape)
        return out

    def channelwise(self, node, path, mod, lay, names, axis_required):
        """Norm-like modules: layout passes, their per-channel tensors are producers."""
        if lay.fixed:
            return lay
        if lay.axis != axis_required:
            self.fail(
                f"{type(mod).__name__} acts on axis {axis_required} but the features are on axis {lay.axis}"
            )
        if self.repeated_call(path, lay) is None:
            self.param_slices(path, mod, lay, names, 0, lambda t: t.shape)
            self.calls[path] = (lay, lay)
        return lay

    def batchnorm(self, node, path, mod):
        lay = self.input_layout(node)
        nd = len(self.shape(node.args[0]))
        # BatchNorm1d accepts (N, C) and (N, C, L); unbatched InstanceNorm has C first
        axis = 1 if isinstance(mod, nn.modules.batchnorm._BatchNorm) or nd > mod._get_no_batch_dim() else 0
        names = ["weight", "bias", "running_mean", "running_var"]
        return self.channelwise(node, path, mod, lay, names, axis)

    def prelu(self, node, path, mod):
        lay = self.input_layout(node)
        if mod.num_parameters == 1:
            return lay
        nd = len(self.shape(node.args[0]))
        return self.channelwise(node, path, mod, lay, ["weight"], 1 if nd > 1 else 0)

    def groupnorm(self, node, path, mod):
        lay = self.input_layout(node)
        if lay.fixed:
            return lay
        if lay.axis != 1 or lay.block != 1:
            self.fail(f"GroupNorm normalizes axis 1 but the features are on {lay.describe()}")
        per_group = mod.num_channels // mod.num_groups
        for off, elem, n in lay.offsets():
            if off % per_group or n % per_group:
                self.fail(
                    f"GroupNorm({mod.num_groups}, {mod.num_channels}) has groups of {per_group} "
                    f"channels that straddle two spaces (a space of {n} channels at offset {off})"
                )
            el = self.elements[elem]
            el.group = math.gcd(el.group, per_group) if el.group else per_group
        return self.channelwise(node, path, mod, lay, ["weight", "bias"], 1)

    def layernorm(self, node, path, mod):
        lay = self.input_layout(node)
        if lay.fixed:
            return lay
        nd = len(self.shape(node.args[0]))
        p = lay.axis - (nd - len(mod.normalized_shape))
        if p < 0:
            # normalizes each channel on its own: any channel permutation commutes
            return lay
        if self.repeated_call(path, lay) is None:
            # LayerNorm([C, H, W]): k = H*W positions per channel in the flattened weight
            flat = len(mod.normalized_shape) > 1
            self.param_slices(path, mod, lay, ["weight", "bias"], 0, lambda t: t.shape, p=p, flat=flat)
            self.calls[path] = (lay, lay)
        return lay

    # ---- call_function / call_method ----------------------------------------

    def call_function(self, node):
        fn = node.target
        layouts = self.layouts_in(node)
        if all(lay.fixed for lay in layouts):
            return self.fixed_like(node)
        if fn in _CAT_FUNCS:
            return self.cat(node)
        if fn in _STACK_FUNCS:
            return self.stack(node)
        if fn is operator.getitem:
            return self.getitem(node)
        if fn is getattr:
            if node.args[1] in _PERMUTE_ATTRS:
                return self.probe(node, lambda t: getattr(t, node.args[1]))
            self.fail(f"there is no rule for the tensor attribute {node.args[1]!r}")
        if fn in _REDUCE_FUNCS or fn in _PERMUTE_FUNCS:
            if fn in (torch.max, torch.min) and isinstance(self.meta(self._arg_node(node, 1)), TensorMetadata):
                return self.elementwise(node)  # torch.max(x, y)
            return self.probe(node, self._bind(node))
        if fn in _ELEMENTWISE_FUNCS:
            return self.elementwise(node)
        if fn in _RESHAPE_FUNCS:
            return self.reshape(node)
        if fn in _EXPAND_FUNCS:
            return self.expand(node)
        if fn in _DIMWISE_FUNCS:
            pos, name, default = _DIMWISE_FUNCS[fn]
            return self.dimwise(node, self.arg(node, pos, name, default))
        if fn in _POOL_FUNCS:
            lay = self.input_layout(node)
            nd = len(self.shape(node.args[0]))
            n = _POOL_FUNCS[fn]
            return self.trailing(node, lay, nd - 2 if n is None else n)
        if fn is F.pad:
            return self.trailing(node, self.input_layout(node), len(self.arg(node, 1, "pad")) // 2)
        if fn in _SPLIT_FUNCS:
            return self.split(node)
        self.fail("there is no rule for this operation on feature tensors")

    def call_method(self, node):
        name = node.target
        layouts = self.layouts_in(node)
        if all(lay.fixed for lay in layouts):
            return self.fixed_like(node)
        if name in _CONSTANT_METHODS:
            return self.fixed_like(node)
        if name in _UNARY_METHODS:
            return self.input_layout(node)
        if name in _REDUCE_METHODS or name in _PERMUTE_METHODS:
            if name in ("max", "min") and isinstance(self.meta(self._arg_node(node, 1)), TensorMetadata):
                return self.elementwise(node)
            return self.probe(node, self._bind(node, method=True))
        if name in _ELEMENTWISE_METHODS:
            return self.elementwise(node)
        if name in _RESHAPE_METHODS:
            return self.reshape(node)
        if name in _EXPAND_METHODS:
            return self.expand(node)
        if name in _DIMWISE_METHODS:
            pos, kw, default = _DIMWISE_METHODS[name]
            return self.dimwise(node, self.arg(node, pos, kw, default))
        if name in _SPLIT_NAMES:
            return self.split(node)
        self.fail("there is no rule for this method on feature tensors")

    @staticmethod
    def _arg_node(node, pos):
        return node.args[pos] if len(node.args) > pos else node.kwargs.get("other")

    def _bind(self, node, method=False):
        """The node's op as a function of its tensor argument (for probing)."""
        args = [self.value(a) for a in node.args[1:]]
        kwargs = {k: self.value(v) for k, v in node.kwargs.items()}
        if method:
            return lambda t: getattr(t, node.target)(*args, **kwargs)
        return lambda t: node.target(t, *args, **kwargs)

    # ---- rules -------------------------------------------------------------

    def elementwise(self, node):
        """Position-wise op of one or more tensors (with broadcasting)."""
        out_shape = self.shape(node)
        out_nd = len(out_shape)
        result, fixed_shapes = None, []
        operands = []
        map_aggregate(node.args, lambda a: operands.append(a) if isinstance(a, Node) else None)
        map_aggregate(node.kwargs, lambda a: operands.append(a) if isinstance(a, Node) else None)
        for a in operands:
            lay = self.env.get(a)
            if not isinstance(lay, Layout):
                continue
            shp = self.shape(a)
            if lay.fixed:
                fixed_shapes.append(shp)
                continue
            axis = out_nd - (len(shp) - lay.axis)
            if shp[lay.axis] != out_shape[axis]:
                self.fix(lay)  # a one-channel space broadcast over channels
                continue
            lay = lay.with_axis(axis)
            if result is None:
                result = lay
            else:
                self.join(result, lay)
        if result is None:
            return FIXED_LAYOUT
        for shp in fixed_shapes:
            k = len(shp) - (out_nd - result.axis)
            if k >= 0 and shp[k] != 1:
                self.fix(result)  # a fixed tensor varies along the channels
        return result

    def probe(self, node, fn):
        lay = self.input_layout(node)
        nd = len(self.shape(node.args[0]))
        try:
            axis = probe_axis(fn, nd, lay.axis)
        except Exception as exc:
            self.fail(f"could not follow the feature axis ({type(exc).__name__}: {exc})")
        if axis is None:
            self.fail(f"it reduces over the feature axis {lay.axis}")
        out = lay.with_axis(axis)
        meta = node.meta.get("tensor_meta")
        return out if isinstance(meta, TensorMetadata) else tuple(out for _ in meta)

    def dimwise(self, node, dims):
        lay = self.input_layout(node)
        nd = len(self.shape(node.args[0]))
        if dims is None:
            self.fail("it acts along an implicit dimension")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if lay.axis in [d % nd for d in dims]:
            self.fail(f"it acts along the feature axis {lay.axis}")
        return lay

    def trailing(self, node, lay: Layout, n_axes: int):
        """Pooling, padding, upsampling: act on the last ``n_axes`` axes."""
        nd = len(self.shape(node.args[0]))
        if lay.axis >= nd - n_axes:
            self.fail(f"it acts on the last {n_axes} axes, which include the feature axis {lay.axis}")
        meta = node.meta.get("tensor_meta")
        if not isinstance(meta, TensorMetadata):  # (values, indices)
            return tuple(lay for _ in meta)
        if len(meta.shape) != nd:
            self.fail("it changes the number of axes")
        return lay

    def reshape(self, node):
        lay = self.input_layout(node)
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        if in_shape[lay.axis] == 1:
            self.fix(lay)  # a one-channel axis cannot be told apart from unit axes
            return FIXED_LAYOUT
        try:
            axis, block = reshape_axis(in_shape, out_shape, lay.axis, lay.n_channels, lay.block)
        except ValueError as exc:
            self.fail(f"{exc} (shape {in_shape} -> {out_shape}, features on {lay.describe()})")
        return Layout(axis, lay.pieces, block)

    def expand(self, node):
        lay = self.input_layout(node)
        in_shape, out_shape = self.shape(node.args[0]), self.shape(node)
        axis = len(out_shape) - (len(in_shape) - lay.axis)
        if out_shape[axis] != in_shape[lay.axis]:
            self.fail(f"it changes the size of the feature axis ({in_shape} -> {out_shape})")
        return lay.with_axis(axis)

    def getitem(self, node):
        src, idx = node.args[0], self.value(node.args[1])
        val = self.env.get(src)
        if isinstance(val, (tuple, list)):
            return val[idx]
        if not isinstance(val, Layout):
            self.fail("indexing a value without a known layout")
        lay, shape = val, self.shape(src)
        if lay.fixed:
            return lay
        items = list(idx) if isinstance(idx, tuple) else [idx]
        n_used = sum(1 for it in items if it is not None and it is not Ellipsis)
        in_dim = out_dim = 0
        new_axis = None
        for it in items:
            if it is Ellipsis:
                skip = len(shape) - n_used
                if in_dim <= lay.axis < in_dim + skip:
                    new_axis = out_dim + lay.axis - in_dim
                in_dim, out_dim = in_dim + skip, out_dim + skip
            elif it is None:
                out_dim += 1
            elif isinstance(it, int):
                if in_dim == lay.axis:
                    self.fail("it selects a single channel of the feature axis")
                in_dim += 1
            elif isinstance(it, slice):
                if in_dim == lay.axis:
                    new_axis = out_dim
                    start, stop, step = it.indices(shape[in_dim])
                    if step != 1 or start % lay.block or stop % lay.block:
                        self.fail("it slices the feature axis inside its channels")
                    pieces = slice_pieces(lay, start // lay.block, stop // lay.block)
                    if pieces is None:
                        self.fail(
                            f"it slices channels {start // lay.block}:{stop // lay.block} of "
                            f"{lay.describe()}, not along the boundaries of its spaces"
                        )
                    lay = Layout(lay.axis, pieces, lay.block)
                in_dim, out_dim = in_dim + 1, out_dim + 1
            else:
                self.fail("advanced (tensor or list) indexing of a feature tensor")
        if new_axis is None:
            new_axis = out_dim + (lay.axis - in_dim)  # an axis after the indexed ones
        return lay.with_axis(new_axis)

    def cat(self, node):
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        out_nd = len(self.shape(node))
        dim = self.arg(node, 1, "dim", None)
        if dim is None:  # torch.concatenate spells it `axis`
            dim = self.value(node.kwargs.get("axis", 0))
        dim %= out_nd
        items = [(self.env.get(t), self.shape(t)) for t in tensors]
        live = [lay for lay, _ in items if not lay.fixed]
        if all(lay.axis == dim for lay in live):
            blocks = {lay.block for lay in live}
            if len(blocks) != 1:
                self.fail("it concatenates feature axes with different block factors")
            block = blocks.pop()
            pieces = []
            for lay, shp in items:
                if lay.fixed:
                    if shp[dim] % block:
                        self.fail("it concatenates a fixed tensor that does not fit the block factor")
                    pieces.append((FIXED, shp[dim] // block))
                else:
                    pieces.extend(lay.pieces)
            return Layout(dim, tuple(pieces), block)
        if any(lay.axis != live[0].axis for lay in live):
            self.fail("it concatenates tensors whose feature axes differ")
        result = live[0]
        for lay in live[1:]:
            self.join(result, lay, "the concatenated tensors")
        if len(live) < len(items):
            self.fix(result)
        return result

    def stack(self, node):
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        out_nd = len(self.shape(node))
        dim = self.arg(node, 1, "dim", 0) % out_nd
        live = [self.env.get(t) for t in tensors]
        result = next(lay for lay in live if not lay.fixed)
        if any(not lay.fixed and lay.axis != result.axis for lay in live):
            self.fail("it stacks tensors whose feature axes differ")
        for lay in live:
            self.join(result, lay, "the stacked tensors")
        return result.with_axis(result.axis + (dim <= result.axis))

    def split(self, node):
        lay = self.input_layout(node)
        nd = len(self.shape(node.args[0]))
        pos = 1 if node.target in ("unbind", torch.unbind) else 2
        dim = self.arg(node, pos, "dim", 0) % nd
        metas = node.meta["tensor_meta"]
        if dim != lay.axis:
            if node.target in ("unbind", torch.unbind):
                return tuple(lay.with_axis(lay.axis - (dim < lay.axis)) for _ in metas)
            return tuple(lay for _ in metas)
        if node.target in ("unbind", torch.unbind):
            self.fail("it unbinds the feature axis into single channels")
        parts, start = [], 0
        for meta in metas:
            size = meta.shape[dim]
            if start % lay.block or size % lay.block:
                self.fail("it splits the feature axis inside its channels")
            pieces = slice_pieces(lay, start // lay.block, (start + size) // lay.block)
            if pieces is None:
                self.fail(f"it splits {lay.describe()} not along the boundaries of its spaces")
            parts.append(Layout(lay.axis, pieces, lay.block))
            start += size
        return tuple(parts)


# --------------------------------------------------------------------------
# public entry point


def _as_args(example_input) -> tuple:
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    return (example_input,)


def _to_device(args, model):
    """Move tensor inputs to the model's device, a convenience for GPU models."""
    param = next(iter(model.parameters()), None)
    if param is None:
        return args
    return tuple(
        a.to(param.device) if isinstance(a, torch.Tensor) and a.device != param.device else a for a in args
    )


# layers with a rule stay leaves even when subclassed outside torch.nn
# (custom init, wrappers), as long as the subclass keeps the forward
_LEAF_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
)


class _Tracer(torch.fx.Tracer):
    """torch.fx's standard tracer, plus subclasses of the layers with a rule."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        for cls in _LEAF_TYPES:
            if isinstance(m, cls) and type(m).forward is cls.forward:
                return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace ``model``; a failure becomes UnsupportedOperationError."""
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # TraceError, proxies used as bools/ints, ...
        raise UnsupportedOperationError(
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}). "
            "find_spaces needs a model that torch.fx.symbolic_trace can trace: no control flow "
            "that depends on tensor values (such as `if x.sum() > 0`) and no tensor sizes used "
            f"as Python numbers in loops. {_HAND_HINT}"
        ) from exc


def propagate_shapes(gm: torch.fx.GraphModule, model: nn.Module, args: tuple) -> None:
    """Run the traced graph once so every node has concrete shapes.

    Runs in eval mode without gradients (BatchNorm statistics stay as they
    are) and restores every module's training flag; the inputs are cloned
    because a model may modify them in place.
    """
    flags = [(m, m.training) for m in model.modules()]
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in _to_device(args, model))
    try:
        gm.eval()
        with torch.no_grad():
            _ShapeProp(gm).propagate(*args)
    except UnsupportedOperationError:
        raise
    except Exception as exc:
        raise ValueError(
            f"running {type(model).__name__} on example_input failed ({type(exc).__name__}: {exc}); "
            "example_input must be a tensor (or a tuple of tensors) the model accepts, e.g. a small batch"
        ) from exc
    finally:
        for m, flag in flags:
            m.training = flag


def find_spaces(model: nn.Module, example_input) -> list[Space]:
    """Find the feature spaces of a model automatically.

    The model is traced with :func:`torch.fx.symbolic_trace`, the traced
    graph is run on ``example_input`` to give every operation concrete shapes,
    and per-operation rules join the channels that must share one transform
    (a union-find over the outputs of Linear/Conv/Embedding layers).
    The model's inputs and outputs are never transformed: spaces joined to
    them are dropped, as are spaces that no Linear/Conv reads.

    Parameters
    ----------
    model : torch.nn.Module
        The network. It is not modified: tracing does not run it, and the
        shape pass runs in eval mode without gradients (BatchNorm running
        statistics are untouched) and restores the training flags.
    example_input : torch.Tensor or tuple of torch.Tensor
        A small batch the model accepts (moved to the model's device).

    Returns
    -------
    list of Space
        In graph order (the order their first layer is called).

    Raises
    ------
    UnsupportedOperationError
        If the model cannot be traced, or an operation on a feature tensor
        has no rule (the message names the fx node, its op and module path).
        Describe the spaces by hand in that case.
    ValueError
        If the model fails to run on ``example_input``.

    See Also
    --------
    permute_model : the self-check that the spaces are right.
    apply_transforms : transform a state_dict space by space.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skmerge.graph import find_spaces
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> spaces = find_spaces(model, torch.randn(3, 4))
    >>> [(s.name, s.dim) for s in spaces]
    [('0', 8)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    gm = trace(model)
    propagate_shapes(gm, model, _as_args(example_input))
    return _Walker(gm, model).run()
