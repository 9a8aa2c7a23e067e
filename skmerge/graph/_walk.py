"""The walk: give every tensor of an exported graph its channel labels.

The walker visits the nodes of a :class:`~skmerge.graph._export.Traced`
graph in order and asks the rule registered for each ATen op
(:mod:`skmerge.graph.rules`) for the labels of its output. Rules state
constraints through the walker:

- :meth:`Walker.new_atoms`: a layer creates channels that it may mix freely
  (the output rows of a Linear or Conv);
- :meth:`Walker.bind`: a parameter's entries move with channels, as a
  *producer* (transformed with ``mapping.T``: output rows, biases, norm
  weights) or a *consumer* (``inverse_mapping.T``: input columns);
- :meth:`Walker.unify`: positions combined elementwise must be one channel
  (a residual addition); :meth:`Walker.pair` ties dual channels (a query and
  the key it meets in ``q @ k.T``);
- :meth:`Walker.read`: an op that reads a set of channels together (a
  consumer's columns, a LayerNorm's statistics): a transform may only mix
  channels read together;
- :meth:`Walker.link`: channels that must stay in one block (an attention
  head, a group of GroupNorm or of a grouped convolution);
- :meth:`Walker.fix`: channels that must not be transformed (the model's
  inputs and outputs, or an op that is not equivariant).

:mod:`skmerge.graph._collect` turns these records into spaces.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch.fx.node import Node, map_aggregate

from ._export import Traced
from ._labels import CONSUMER, FIXED, NEUTRAL, PRODUCER, Layout, ParamPositions, ParamRef  # noqa: F401
from ._spaces import _HAND_HINT, UnsupportedOperationError
from ._unionfind import ParityUnionFind
from .rules import lookup
from .rules._registry import is_chain
from .rules.elementwise import ACTIVATIONS
from .rules.shape import REARRANGEMENTS

__all__ = ["DEFAULT_TAPS", "TAPS", "Walker", "check_taps"]

#: Where a space can be observed (``find_spaces(taps=...)``).
TAPS = ("formed", "consumers", "both", "pre_and_post_activation")
#: The placement used unless one is asked for: where the features are formed
#: and at the inputs of their consumers, pooled (the best CCA merges on the
#: converged benchmark models, see the benchmarks page).
DEFAULT_TAPS = "both"


def check_taps(taps) -> None:
    """Raise a ValueError naming the placements when ``taps`` is none of them."""
    if taps not in TAPS:
        raise ValueError(f"taps must be one of {', '.join(map(repr, TAPS))}, got {taps!r}.")

#: parameters used directly with more entries than this are refused (labels cost memory)
_MAX_DIRECT_PARAM = 20_000_000


@dataclass
class Producer:
    """A node that created channels (one union-find element each)."""

    node: str
    module_path: str
    start: int
    count: int
    kind: str = "layer"  # "layer": mixes its inputs freely; "param": entries of parameters
    label: str = ""  # name in space names when the module path is not enough (an LSTM's layers)

    @property
    def name(self) -> str:
        return self.label or self.module_path or self.node


@dataclass
class Family:
    """Blocks that must stay blocks (heads, groups): one element per block."""

    kind: str  # "heads" or "groups"
    node: str
    module_path: str
    start: int
    count: int


@dataclass
class Binding:
    """Entries of a parameter that move with channels."""

    param: str
    axis: int  # -1: flat positions over the whole tensor
    positions: torch.Tensor
    atoms: torch.Tensor
    role: int
    variance: bool = False
    scale: bool = False


@dataclass
class FixEvent:
    atoms: torch.Tensor
    reason: str
    node: str
    module_path: str
    warn: bool


@dataclass
class Records:
    """What a walk found, for :mod:`skmerge.graph._collect`."""

    uf: ParityUnionFind
    producers: list = field(default_factory=list)
    families: list = field(default_factory=list)
    bindings: list = field(default_factory=list)
    reads: list = field(default_factory=list)
    links: list = field(default_factory=list)  # (atoms, family elements)
    fixes: list = field(default_factory=list)
    taps: list = field(default_factory=list)  # (node name, Layout, shape, fallback)


def _has_tensor(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


class Walker:
    """Walk a traced graph; rules call the methods below."""

    def __init__(self, traced: Traced, tap_placement: str = DEFAULT_TAPS):
        self.t = traced
        self.tap_placement = tap_placement
        self.uf = ParityUnionFind()
        self.uf.add()  # FIXED
        self.rec = Records(self.uf)
        self.params = ParamPositions()
        self.env: dict = {}
        self.node: Node | None = None
        self.formers: list[Node] = []  # nodes whose output forms channels (tap placement)
        self.chain: set = set()  # nodes that carry their input's channels position by position
        self.consumer_inputs: list[Node] = []
        self._param_rows: dict[str, torch.Tensor] = {}  # lazily created atoms for parameter entries
        self.warnings: list[str] = []
        self.param_shapes: dict[str, tuple] = {}

    # ---------------------------------------------------------------- errors
    def where(self, node: Node | None = None) -> tuple[str, str, str]:
        node = node or self.node
        target = node.target
        what = getattr(target, "__name__", None) or str(target)
        if hasattr(target, "_schema"):
            what = f"aten.{target._schema.name.split('::')[-1]}"
            overload = target._overloadname
            if overload and overload != "default":
                what += f".{overload}"
        elif target is operator.getitem:
            what = "getitem"
        return self.t.module_path(node), self.t.module_type(node), what

    def fail(self, reason: str, node: Node | None = None, hint: str = ""):
        node = node or self.node
        path, cls, what = self.where(node)
        place = f"module {path!r} ({cls})" if path else f"the top level of the model ({cls})"
        raise UnsupportedOperationError(
            f"No rule for node {node.name!r} ({what}) in {place}: {reason}. "
            f"skmerge refuses to guess a feature space it cannot prove. {hint}{_HAND_HINT}",
            node=node.name, target=what, module_path=path)

    def warn(self, message: str) -> None:
        """A merge that will fall back to averaging somewhere: reported once the walk ends."""
        if message not in self.warnings:
            self.warnings.append(message)

    # ---------------------------------------------------------------- access
    def shape(self, arg) -> tuple:
        shape = self.t.shapes.get(arg) if isinstance(arg, Node) else None
        if not isinstance(shape, tuple):
            self.fail(f"expected a tensor argument, got {arg!r}")
        return shape

    def value(self, arg):
        """Concrete value of a non-tensor argument (sizes computed in the graph are resolved)."""
        if isinstance(arg, Node):
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor):
                return arg
            if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                from ._export import _concrete
                return _concrete(val)
            return val
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        if isinstance(arg, (torch.SymInt,)):
            from ._export import _concrete
            return _concrete(arg)
        return arg

    def args(self, node: Node) -> dict:
        """The node's arguments by schema name (defaults filled in)."""
        schema = node.target._schema
        out = {}
        for i, a in enumerate(schema.arguments):
            if i < len(node.args):
                out[a.name] = node.args[i]
            elif a.name in node.kwargs:
                out[a.name] = node.kwargs[a.name]
            elif a.has_default_value():
                out[a.name] = a.default_value
            else:
                out[a.name] = None
        return out

    def env_of(self, arg):
        return self.env.get(arg) if isinstance(arg, Node) else None

    def param(self, arg) -> ParamRef | None:
        value = self.env_of(arg)
        return value if isinstance(value, ParamRef) else None

    def layout(self, arg) -> Layout | None:
        """Labels of a tensor argument (a parameter's entries when it is one)."""
        value = self.env_of(arg)
        if isinstance(value, ParamRef):
            return self.param_layout(value)
        return value if isinstance(value, Layout) else None

    def param_layout(self, ref: ParamRef) -> Layout:
        numel = 1
        for s in ref.shape:
            numel *= s
        if numel > _MAX_DIRECT_PARAM:
            self.fail(f"the parameter {ref.name!r} ({numel} entries) is used directly as a tensor; "
                      "only parameters up to 20 million entries are followed entry by entry")
        labels = self.params.labels(ref.name, ref.shape).permute(ref.dims)
        return Layout.from_full(labels)

    def input_layout(self, node: Node, pos: int = 0) -> Layout:
        arg = node.args[pos] if len(node.args) > pos else None
        lay = self.layout(arg)
        if lay is None:
            self.fail("expected a tensor input")
        return lay

    def tensor_args(self, node: Node) -> list:
        found = []
        map_aggregate(node.args, lambda a: found.append(a) if isinstance(a, Node) and
                      isinstance(self.env.get(a), (Layout, ParamRef)) else None)
        map_aggregate(node.kwargs, lambda a: found.append(a) if isinstance(a, Node) and
                      isinstance(self.env.get(a), (Layout, ParamRef)) else None)
        return found

    # ---------------------------------------------------------------- records
    def new_atoms(self, count: int, kind: str = "layer", node: Node | None = None, label: str = "") -> torch.Tensor:
        """Create ``count`` channels produced by ``node`` (the current node by default)."""
        node = node or self.node
        start = self.uf.add(count)
        self.rec.producers.append(Producer(node.name, self.t.module_path(node), start, count, kind, label))
        return torch.arange(start, start + count, dtype=torch.long)

    def new_family(self, kind: str, count: int) -> torch.Tensor:
        start = self.uf.add(count)
        self.rec.families.append(Family(kind, self.node.name, self.t.module_path(self.node), start, count))
        return torch.arange(start, start + count, dtype=torch.long)

    def bind(self, param: str, axis: int, positions, atoms, role: int = PRODUCER,
             variance: bool = False, scale: bool = False) -> None:
        """Entries ``positions`` (along ``axis``; -1: flat positions) of ``param`` move with ``atoms``.

        ``variance``: a variance-like buffer (squared map); ``scale``: a
        multiplicative per-channel parameter (norm weights, layer scale).

        ``atoms`` may hold any labels: FIXED entries are recorded as untransformed,
        parameter labels make the two parameters' entries one channel.
        """
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        atoms = torch.as_tensor(atoms, dtype=torch.long).reshape(-1)
        if axis == -1 and len(self.param_shapes.get(param, ())) == 1:
            axis = 0  # flat positions of a vector are its only axis
        if positions.numel() != atoms.numel():  # pragma: no cover - rule bug
            raise AssertionError("bind: positions and atoms differ in length")
        keep = atoms != NEUTRAL
        positions, atoms = positions[keep], atoms[keep]
        params = atoms < NEUTRAL
        if bool(params.any()):  # two parameters meet: their entries become one channel
            atoms = atoms.clone()
            atoms[params] = self._param_atoms(atoms[params])
        if positions.numel():
            self.rec.bindings.append(Binding(param, axis, positions, atoms, role, variance, scale))

    def _param_atoms(self, labels: torch.Tensor) -> torch.Tensor:
        """A channel for each parameter entry (created on first use)."""
        out = torch.empty_like(labels)
        for name, mask, flat in self.params.decode(labels):
            table = self._param_rows.get(name, torch.full((0,), -1, dtype=torch.long))
            needed = int(flat.max()) + 1
            if table.numel() < needed:
                grown = torch.full((needed,), -1, dtype=torch.long)
                grown[: table.numel()] = table
                table = grown
            missing = torch.unique(flat[table[flat] < 0])
            if missing.numel():
                atoms = self.new_atoms(missing.numel(), kind="param")
                table[missing] = atoms
                self.bind(name, -1, missing, atoms, PRODUCER)
            self._param_rows[name] = table
            out[mask] = table[flat]
        return out

    def fix(self, labels, reason: str = "output", warn: bool = False) -> None:
        """Channels among ``labels`` are never transformed."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        labels = torch.unique(labels[labels != NEUTRAL])
        if not labels.numel():
            return
        params = labels < NEUTRAL
        if bool(params.any()):
            labels = torch.cat([labels[~params], self._param_atoms(labels[params])])
        atoms = labels[labels > FIXED]
        for a in atoms.tolist():
            self.uf.union(FIXED, a)
        if atoms.numel():
            node = self.node
            self.rec.fixes.append(FixEvent(atoms, reason, node.name if node is not None else "",
                                           self.t.module_path(node) if node is not None else "", warn))

    def read(self, labels) -> None:
        """The channels among ``labels`` are read together by one op."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        atoms = torch.unique(labels[labels > FIXED])
        if atoms.numel() > 1:
            self.rec.reads.append(atoms)

    def link(self, atoms, family_elements) -> None:
        """Channel ``atoms[i]`` belongs to block ``family_elements[i]``."""
        atoms = torch.as_tensor(atoms, dtype=torch.long).reshape(-1)
        family_elements = torch.as_tensor(family_elements, dtype=torch.long).reshape(-1)
        keep = atoms > FIXED
        if bool(keep.any()):
            self.rec.links.append((atoms[keep], family_elements[keep]))

    def unify(self, rows: torch.Tensor, constant: str | None = None, scale: bool = False) -> torch.Tensor:
        """Make the labels of each row one channel; return one label per row.

        ``rows`` has shape ``(n, m)``. Feature channels of a row are joined,
        FIXED fixes them, NEUTRAL is ignored and parameter entries become
        producers of the row's channel (or of a new channel when a row holds
        only parameter entries). ``constant`` names the op when a FIXED label
        comes from a constant tensor rather than the model's inputs: the
        channels it fixes are then reported in a warning. ``scale``: the
        parameter entries multiply the features (bound as scales).
        """
        if rows.ndim == 1:
            rows = rows[:, None]
        if rows.shape[1] == 1:
            return rows[:, 0].clone()
        unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        result = torch.empty(unique.shape[0], dtype=torch.long)
        pending_params, pending_atoms = [], []
        for i, row in enumerate(unique.tolist()):
            feats = sorted({a for a in row if a > FIXED})
            params = sorted({a for a in row if a < NEUTRAL})
            fixed = FIXED in row
            if feats:
                rep = feats[0]
                for a in feats[1:]:
                    self.uf.union(rep, a)
                if fixed:
                    self.fix(torch.tensor(feats), reason=constant or "input", warn=constant is not None)
                for p in params:
                    pending_params.append(p)
                    pending_atoms.append(rep)
                result[i] = rep
            elif params:
                if fixed:
                    self.fix(torch.tensor(params), reason="constant")
                    result[i] = FIXED
                elif len(params) == 1:
                    result[i] = params[0]
                else:
                    rep = int(self._param_atoms(torch.tensor(params[:1]))[0])
                    for p in params[1:]:
                        pending_params.append(p)
                        pending_atoms.append(rep)
                    result[i] = rep
            else:
                result[i] = FIXED if fixed else NEUTRAL
        if pending_params:
            p = torch.tensor(pending_params, dtype=torch.long)
            a = torch.tensor(pending_atoms, dtype=torch.long)
            for name, mask, flat in self.params.decode(p):
                self.bind(name, -1, flat, a[mask], PRODUCER, scale=scale)
        return result[inverse]

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Dual channels: ``a[i]`` transforms with a map, ``b[i]`` with its inverse transpose."""
        rows = torch.unique(torch.stack([a.reshape(-1), b.reshape(-1)], 1), dim=0)
        for x, y in rows.tolist():
            if x > FIXED and y > FIXED:
                self.uf.union(x, y, 1)
            elif x > FIXED or y > FIXED:
                self.fix(torch.tensor([x, y]), reason=f"multiplied by a constant ({self.where()[2]})",
                         warn=True)

    def collapse(self, lay: Layout, shape, keep: tuple) -> Layout:
        """Unify labels along every axis not in ``keep`` (positions of one channel)."""
        keep = tuple(a % len(shape) for a in keep)
        if all(a in keep for a in lay.axes):
            return lay
        axes = tuple(sorted(set(lay.axes) | set(keep)))
        grid = lay.grid(shape, axes)
        kept = [axes.index(a) for a in keep if a in axes]
        other = [i for i in range(len(axes)) if i not in kept]
        moved = grid.permute(kept + other).reshape(*[grid.shape[i] for i in kept], -1)
        flat = moved.reshape(-1, moved.shape[-1])
        labels = self.unify(flat).reshape(moved.shape[:-1])
        full = torch.full(tuple(shape[a] if a in keep else 1 for a in range(len(shape))), 0, dtype=torch.long)
        view_shape = [1] * len(shape)
        for i, a in enumerate(a for a in keep if a in axes):
            view_shape[a] = labels.shape[i]
        return Layout.from_full(labels.reshape(view_shape).expand(full.shape))

    def former(self, node: Node) -> None:
        """``node``'s output forms channels: a tap candidate once its chain ends."""
        self.formers.append(node)

    def consumer_input(self, arg) -> None:
        if isinstance(arg, Node):
            self.consumer_inputs.append(arg)

    # ---------------------------------------------------------------- the walk
    def run(self) -> Records:
        for node in self.t.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                self.env[node] = self.placeholder(node)
            elif node.op == "output":
                for arg in self.tensor_args(node):
                    lay = self.layout(arg)
                    self.fix(lay.labels, reason="output")
            elif node.op == "get_attr":
                self.env[node] = None
            elif not _has_tensor(node.meta.get("val")):
                self.env[node] = None  # sizes, dtypes, asserts: no channels
            else:
                self.env[node] = self.call(node)
        self.place_taps()
        return self.rec

    def placeholder(self, node: Node):
        shape = self.t.shapes.get(node)
        if node.name in self.t.params:
            name = self.t.params[node.name]
            self.param_shapes[name] = shape
            return ParamRef(name, shape, tuple(range(len(shape))))
        if isinstance(shape, tuple):  # inputs; integer buffers and constants
            user = node.name in self.t.program.graph_signature.user_inputs
            return Layout.constant(FIXED, len(shape), "input" if user else "constant")
        return None

    def call(self, node: Node):
        target = node.target
        layouts, refs = [], []

        def visit(value):
            if isinstance(value, Layout):
                layouts.append(value)
            elif isinstance(value, ParamRef):
                refs.append(value)
            elif isinstance(value, (list, tuple)):
                for v in value:
                    visit(v)

        map_aggregate(node.args, lambda a: visit(self.env.get(a)) if isinstance(a, Node) else None)
        map_aggregate(node.kwargs, lambda a: visit(self.env.get(a)) if isinstance(a, Node) else None)
        if not refs and all(lay.inert for lay in layouts):
            # computed from inputs and constants only: fixed, whatever the op
            label = FIXED if any(lay.fixed for lay in layouts) or not layouts else NEUTRAL
            origin = "input" if any(lay.origin == "input" for lay in layouts) else "constant"
            return self.constant_like(node, label, origin)
        rule = lookup(target)
        if rule is None:
            self.fail("there is no rule for this operation on feature tensors")
        out = rule(self, node)
        if is_chain(target):
            self.chain.add(node)
        return out

    def constant_like(self, node: Node, label: int, origin: str = "constant"):
        shape = self.t.shapes.get(node)

        def conv(s):
            if isinstance(s, tuple):
                return Layout.constant(label, len(s), origin)
            if isinstance(s, list):
                return [conv(x) for x in s]
            return None

        return conv(shape)

    # ---------------------------------------------------------------- taps
    def _rearranged_from(self, node: Node) -> Node:
        """The first tensor up ``node``'s chain of pure rearrangements (``node`` itself if none)."""
        while (getattr(node.target, "overloadpacket", None) in REARRANGEMENTS and node.args
               and isinstance(node.args[0], Node)):
            shape, source = self.t.shapes.get(node), self.t.shapes.get(node.args[0])
            if shape is None or source is None or math.prod(shape) != math.prod(source):
                break
            node = node.args[0]
        return node

    def place_taps(self) -> None:
        check_taps(self.tap_placement)
        # where features are formed: the taps of every placement but "consumers" (its fallback there)
        formed, starts = [], []
        for node in self.formers:  # a layer with several outputs: start at each of them
            if isinstance(self.env.get(node), list):
                starts.extend(u for u in node.users if u.target is operator.getitem)
            else:
                starts.append(node)
        pre_activation = []  # the inputs of the nonlinearities on the chains, in chain order
        for node in starts:
            end = node
            while True:
                users = [u for u in end.users if u.op != "output"]
                if len(users) != 1 or len(end.users) != len(users):
                    break
                (user,) = users
                if user not in self.chain or not isinstance(self.env.get(user), Layout):
                    break
                if getattr(user.target, "overloadpacket", None) in ACTIVATIONS:
                    pre_activation.append(end)
                end = user
            formed.append(end)
        # (node, fallback): with "consumers", a space that no layer reads as its input (the
        # query-key space of attention) is observed where it is formed instead
        nodes = [(n, False) for n in formed] if self.tap_placement != "consumers" else []
        if self.tap_placement == "pre_and_post_activation":
            nodes.extend((n, False) for n in pre_activation)
        if self.tap_placement == "consumers":
            nodes.extend((n, False) for n in self.consumer_inputs)
        elif self.tap_placement == "both":  # a consumer reading a formed tensor rearranged adds no sample
            nodes.extend((n, False) for n in self.consumer_inputs if self._rearranged_from(n) not in formed)
        if self.tap_placement == "consumers":
            nodes.extend((n, True) for n in formed)
        seen = set()
        for node, fallback in nodes:
            lay = self.env.get(node)
            if node in seen or not isinstance(lay, Layout) or not lay.has_features:
                continue
            seen.add(node)
            self.rec.taps.append((node.name, lay, self.t.shapes[node], fallback))

