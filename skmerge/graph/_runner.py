"""Run a model's computation with any model's tensors, reporting the tapped values.

The mergers observe every model at the same places. They never touch the
models themselves: no hook, no mode switch, no copy of a module. Two runners:

- :class:`GraphRunner` runs the exported graph (:mod:`skmerge.graph._export`)
  as a pure function of the parameters and the inputs, with an observer call
  inserted after every tapped node (the taps of :func:`find_spaces`).
- :class:`ModuleRunner` runs a structural copy of the model (its tensors on
  the ``meta`` device, in eval mode) with :func:`torch.func.functional_call`,
  reading the inputs of tapped modules with forward pre-hooks on that copy
  (spaces written by hand with :class:`~skmerge.graph.Tap`).

Both are safe to use from several threads at once on the same models.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.export.graph_signature import InputKind

from ._export import Traced, as_args, meta_copy, tensor_leaves, trace

__all__ = ["GraphRunner", "ModuleRunner", "check_graph", "model_tensors", "runner_for"]


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by name (tied tensors under each name)."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _writes(user: torch.fx.Node, node: torch.fx.Node) -> tuple[bool, bool]:
    """Whether ``user`` writes into ``node``'s memory, and whether its output aliases it (a view)."""
    schema = getattr(user.target, "_schema", None)
    if user.op != "call_function" or schema is None:
        return False, False
    write = alias = False
    for i, argument in enumerate(schema.arguments):
        value = user.args[i] if i < len(user.args) else user.kwargs.get(argument.name)
        if value is node and argument.alias_info is not None:
            write = write or argument.alias_info.is_write
            alias = True
    return write, alias


def _overwritten_later(node: torch.fx.Node) -> bool:
    """Whether an in-place op of the graph writes into ``node``'s output, directly or through a view."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        for user in current.users:
            write, alias = _writes(user, current)
            if write:
                return True
            if alias and user not in seen:
                seen.add(user)
                stack.append(user)
    return False


class _NoObserver:
    def observe(self, tensor, key):
        return None


class GraphRunner:
    """The exported graph of a model, instrumented to report the values of some nodes.

    Parameters
    ----------
    traced : Traced
        The export of the reference model.
    nodes : sequence of str
        Names of the nodes whose outputs are reported.
    model : torch.nn.Module, optional
        The reference model, to export it again for batches of another size
        when the model pinned its batch size.
    """

    def __init__(self, traced: Traced, nodes=(), model: nn.Module | None = None):
        self.traced = traced
        self.nodes = list(dict.fromkeys(nodes))
        self.model = model
        self._modules: dict = {}
        self._shapes: dict = {}
        self._lock = threading.Lock()

    def _example_shapes(self, traced: Traced) -> list:
        shapes = []
        for node in traced.graph.nodes:
            if node.op == "placeholder" and node.name in traced.program.graph_signature.user_inputs:
                shapes.append(traced.shapes[node])
        return shapes

    def _module_for(self, inputs: tuple, device: torch.device):
        traced = self.traced
        if not traced.dynamic_batch:
            shapes = tuple(tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor))
            if shapes != tuple(tuple(s) for s in self._example_shapes(traced)):
                with self._lock:
                    if shapes not in self._shapes:
                        if self.model is None:
                            raise ValueError("this graph was exported for batches of shape "
                                             f"{self._example_shapes(traced)}, got {shapes}")
                        self._shapes[shapes] = trace(self.model, inputs)
                    traced = self._shapes[shapes]
        key = (id(traced), str(device))
        with self._lock:
            if key not in self._modules:
                self._modules[key] = self._instrumented(traced, device)
        return traced, self._modules[key]

    def _instrumented(self, traced: Traced, device: torch.device) -> torch.fx.GraphModule:
        program = traced.program
        graph = torch.fx.Graph()
        env = {}
        names = set(self.nodes)
        observer = None
        for node in program.graph.nodes:
            if node.op != "placeholder" and observer is None:
                observer = graph.placeholder("skmerge_observer")
                for original, value in env.items():  # reported inputs (a first layer's): once all are read
                    if original.name in names:
                        graph.call_method("observe", (observer, value, original.name))
            if node.op == "output":
                graph.output(torch.fx.map_arg(node.args[0], lambda n: env[n]))
                continue
            new = graph.node_copy(node, lambda n: env[n])
            if "device" in new.kwargs and isinstance(new.kwargs["device"], torch.device) \
                    and new.kwargs["device"].type == "meta":
                new.kwargs = {**new.kwargs, "device": device}
            env[node] = new
            if node.name in names and node.op != "placeholder":
                # a value an in-place op overwrites later (a BatchNorm output before ReLU(inplace=True))
                # is reported as a copy: the statistics hold views of what they are given
                value = graph.call_method("clone", (new,)) if _overwritten_later(node) else new
                graph.call_method("observe", (observer, value, node.name))
        missing = names - {n.name for n in program.graph.nodes}
        if missing:
            raise ValueError(f"the spaces observe nodes {sorted(missing)[:3]} that the exported graph of "
                             "this model does not have (spaces found on another model or torch version?)")
        module = torch.fx.GraphModule(program.graph_module, graph)
        return module

    def reporting(self, keys) -> GraphRunner:
        """A runner of the same graph that also reports the nodes ``keys``."""
        return GraphRunner(self.traced, self.nodes + [k for k in keys if k not in self.nodes], self.model)

    def layer_inputs(self, layers: dict) -> tuple[dict, list]:
        """Where the inputs of Linear / Conv modules are reported: ``({node: [path, ...]}, unmapped)``.

        A layer's input is the first argument of every ``linear`` /
        ``conv1d`` / ``conv2d`` call that reads its weight with the module's
        own stride, padding, dilation and groups. Layers called otherwise (or
        never) are ``unmapped``: observe them with a :class:`ModuleRunner`.
        """
        by_weight = {f"{path}.weight" if path else "weight": path for path in layers}
        found: dict = {}
        odd: set = set()  # read by a convolution with other settings than the module's
        for node in self.traced.graph.nodes:
            packet = getattr(node.target, "overloadpacket", None)
            if node.op != "call_function" or packet not in _LAYER_OPS or len(node.args) < 2:
                continue
            weight, inp = node.args[1], node.args[0]
            path = by_weight.get(self.traced.params.get(getattr(weight, "name", None)))
            if path is None or not isinstance(inp, torch.fx.Node):
                continue
            if packet is not torch.ops.aten.linear and not _called_as(node, layers[path]):
                odd.add(path)
            found.setdefault(inp.name, []).append(path)
        found = {key: [p for p in paths if p not in odd] for key, paths in found.items()}
        mapped = {p for paths in found.values() for p in paths}
        return {key: paths for key, paths in found.items() if paths}, [p for p in layers if p not in mapped]

    def run(self, tensors: dict, inputs, observer=None):
        """Run the graph with ``tensors`` (name -> tensor) on ``inputs``; returns the output tensors."""
        inputs = as_args(inputs)
        device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        traced, module = self._module_for(inputs, device)
        args, user = [], iter(inputs)
        constants = traced.program.constants
        for kind, name in traced.input_specs:
            if kind in (InputKind.PARAMETER, InputKind.BUFFER):
                if name not in tensors:
                    raise KeyError(f"the model has no tensor {name!r}, which the graph reads")
                args.append(tensors[name])
            elif kind == InputKind.USER_INPUT:
                args.append(next(user))
            elif kind == InputKind.CONSTANT_TENSOR:
                args.append(_constant(constants[_raw(traced, name)], name, device))
            else:  # pragma: no cover - custom objects and effect tokens
                raise ValueError(f"the exported graph has an input of kind {kind}, which skmerge cannot run")
        return module(*args, observer or _NoObserver())


_LAYER_OPS = tuple(getattr(torch.ops.aten, n) for n in ("linear", "conv1d", "conv2d"))


def _called_as(node: torch.fx.Node, module: nn.Module) -> bool:
    """Whether a ``conv1d`` / ``conv2d`` node uses the module's own stride, padding, dilation, groups."""
    n = len(module.kernel_size)

    def spatial(value) -> tuple:
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        return value * n if len(value) == 1 else value

    names, defaults = ("stride", "padding", "dilation", "groups"), (1, 0, 1, 1)
    given = dict(zip(names, node.args[3:7]), **node.kwargs)
    stride, padding, dilation, groups = (given.get(k, d) for k, d in zip(names, defaults))
    if isinstance(padding, str) or module.padding_mode != "zeros":
        return False
    return (spatial(stride), spatial(padding), spatial(dilation), groups) == (
        tuple(module.stride), tuple(module.padding), tuple(module.dilation), module.groups)


def _constant(value, name: str, device: torch.device):
    """A tensor constant of the graph on ``device`` (the capture saw it on the meta device)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.device.type != "meta":
        return value.to(device)
    if value.numel() == 0:
        return torch.empty(value.shape, dtype=value.dtype, device=device)
    raise ValueError(f"the tensor constant {name!r} created by the model during the capture has no value "
                     "(it was built from a parameter's data); describe the spaces by hand")


def _raw(traced: Traced, name: str) -> str:
    for spec in traced.program.graph_signature.input_specs:
        if spec.target is not None and (spec.target == name or spec.target.endswith("." + name)
                                        or spec.target == "model." + name):
            return spec.target
    return name


class ModuleRunner:
    """A structural copy of a model, run with any model's tensors; reports the inputs of modules."""

    def __init__(self, model: nn.Module, modules=()):
        self.model = model
        self.copy = meta_copy(model)
        self.modules = list(dict.fromkeys(modules))
        for path in self.modules:
            self.copy.get_submodule(path)  # a clear AttributeError for a wrong path
        self._local = threading.local()
        for path in self.modules:
            def hook(_module, args, _path=path):
                observer = getattr(self._local, "observer", None)
                if observer is not None and args:
                    observer.observe(args[0].detach(), _path)
            self.copy.get_submodule(path).register_forward_pre_hook(hook)

    def reporting(self, keys) -> ModuleRunner:
        """A runner of the same structure that also reports the inputs of the modules ``keys``."""
        return ModuleRunner(self.model, self.modules + [k for k in keys if k not in self.modules])

    def layer_inputs(self, layers: dict) -> tuple[dict, list]:
        """Where the inputs of modules are reported: each module's path (``({path: [path]}, [])``)."""
        return {path: [path] for path in layers}, []

    def run(self, tensors: dict, inputs, observer=None):
        self._local.observer = observer
        try:
            with torch.no_grad():
                out = torch.func.functional_call(self.copy, tensors, as_args(inputs), strict=False)
        finally:
            self._local.observer = None
        return tuple(tensor_leaves(out))


def runner_for(model: nn.Module, example_input, spaces, traced: Traced | None = None):
    """The runner that observes ``spaces`` (graph taps: GraphRunner; module taps: ModuleRunner)."""
    from ._spaces import GraphTap, Tap

    taps = [t for s in spaces for t in s.taps]
    if any(isinstance(t, Tap) for t in taps):
        if any(isinstance(t, GraphTap) for t in taps):
            raise ValueError("the spaces mix module taps (Tap) and graph taps (GraphTap); use one kind")
        return ModuleRunner(model, [t.module for t in taps])
    if traced is None:
        traced = trace(model, as_args(example_input))
    return GraphRunner(traced, [t.node for t in taps], model)


def check_graph(runner: GraphRunner, model: nn.Module, example_args: tuple, rtol: float = 1e-5) -> bool:
    """Whether the exported graph computes what ``model`` computes on the example inputs.

    The model's forward runs on a structural copy with the model's tensors; inputs
    without values (meta tensors) cannot be checked and count as a pass.
    """
    args = as_args(example_args)
    if any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
        return True
    device = next((t.device for t in model_tensors(model).values()), torch.device("cpu"))
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    tensors = model_tensors(model)
    try:
        with torch.no_grad():
            expected = tensor_leaves(ModuleRunner(model).run(tensors, args))
    except Exception as exc:  # the model itself cannot take these inputs
        from ._export import _cannot_run

        raise _cannot_run(model, args, exc) from None
    try:
        with torch.no_grad():
            got = tensor_leaves(runner.run(tensors, args))
    except Exception:
        return False
    if len(expected) != len(got):
        return False
    for a, b in zip(expected, got):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            scale = float(a.abs().max()) if a.numel() else 0.0
            if a.numel() and not float((a - b).abs().max()) <= rtol * max(scale, 1e-30) + 1e-12:
                return False
        elif not torch.equal(a, b):
            return False
    return True
