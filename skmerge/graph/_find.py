"""The public entry point: :func:`find_spaces`."""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import torch
from torch import nn

from ._collect import collect
from ._export import Traced, as_args, trace
from ._runner import GraphRunner, check_graph
from ._spaces import _HAND_HINT, Space, UnsupportedOperationError
from ._walk import DEFAULT_TAPS, Walker, check_taps

__all__ = ["find_spaces", "analyze", "architecture_key"]

# Exporting costs far more than the walk (a second for a small ResNet, more for
# large models) and depends only on the code and the structure of a model:
# models of one architecture share one export. Before a shared export is used
# for another model, check_graph runs it against that model's own forward (on
# a structural copy, with the model's tensors, on the example); a model whose
# forward differs in a way the structure does not show is exported anew.
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 16
_LOCK = threading.Lock()


def architecture_key(model: nn.Module, example_args: tuple, taps: str = DEFAULT_TAPS):
    """What an export depends on: the class, the modules, the tensors' layout, the input's shapes."""
    modules = tuple((name, type(m), m.extra_repr(), len(m._forward_hooks), len(m._forward_pre_hooks))
                    for name, m in model.named_modules())
    ids: dict = {}
    tensors = tuple((name, tuple(t.shape), t.dtype, ids.setdefault(id(t), len(ids)))
                    for name, t in list(model.named_parameters(remove_duplicate=False))
                    + list(model.named_buffers(remove_duplicate=False)))
    inputs = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else repr(a) for a in example_args)
    return (type(model), modules, tensors, inputs, taps)


def analyze(model: nn.Module, example_input, taps: str = DEFAULT_TAPS, cache: bool = True
            ) -> tuple[Traced, list[Space]]:
    """Trace ``model`` and find its spaces; the traced graph is kept to observe the taps."""
    check_taps(taps)  # before the export, which is the slow part
    args = as_args(example_input)
    key = architecture_key(model, args, taps) if cache else None
    with _LOCK:
        hit = _CACHE.get(key) if cache else None
        if hit is not None:
            _CACHE.move_to_end(key)
    if hit is not None and check_graph(GraphRunner(hit[0], (), model), model, args):
        traced, spaces, messages = hit
        for message, category in messages:  # the same warnings as the first time
            warnings.warn(message, category, stacklevel=3)
        return traced, list(spaces)
    traced = trace(model, args)
    if not check_graph(GraphRunner(traced, (), model), model, args):
        raise UnsupportedOperationError(
            f"the graph torch.export captured from {type(model).__name__} does not reproduce the model's "
            "outputs on the example input (a forward pass that draws random numbers in eval mode, or "
            f"state that changes between calls?). {_HAND_HINT}")
    walker = Walker(traced, taps)
    walker.run()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spaces = collect(walker)
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)
    if cache:
        with _LOCK:
            _CACHE[key] = (traced, tuple(spaces), [(str(w.message), w.category) for w in caught])
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
    return traced, spaces




def find_spaces(model: nn.Module, example_input, *, taps: str = DEFAULT_TAPS) -> list[Space]:
    """Find the feature spaces of a model automatically.

    The model is captured with :func:`torch.export.export` (non-strict, on a
    copy of the model whose tensors live on the ``meta`` device), which turns
    modules and functional calls alike into ATen ops with the example's
    shapes. Every tensor then gets the channel each position holds (rules per
    op family, :mod:`skmerge.graph.rules`), and the channels that must share
    one transform are joined with a union-find: residual additions join
    streams, a parameter shared by two modules is one set of entries,
    concatenations give separate spaces, ``chunk`` / ``split`` and reshapes
    into heads are followed through their index maps, attention gives a
    query-key and a value-output space per layer, block-diagonal over heads.
    The model's inputs and outputs are never transformed: spaces joined to
    them are dropped, as are spaces that nothing observes.

    Parameters
    ----------
    model : torch.nn.Module
        The network. It is not modified and not run: no mode switch, hook or
        copy of its tensors.
    example_input : torch.Tensor or tuple of torch.Tensor
        A small batch the model accepts (only its shapes and dtypes are used).
    taps : {"formed", "consumers", "both", "pre_and_post_activation"}, default="both"
        Where each space is observed. ``"formed"``: where its features are
        formed, at the output of the nonlinearity that follows each producer
        (or of the producer or its norm), over all positions, before any
        pooling or strided op, as in the CCA Merge paper; a residual stream
        at every block output. ``"consumers"``: the inputs of the layers that
        read the space (after pooling and flattening), or where it is formed
        when no layer reads it as its input (attention's query-key spaces).
        ``"both"`` (the default): all of them, pooled, each sample once (a
        layer input that only rearranges a formed tensor, such as a flatten,
        adds none); where nothing pools between a space's producers and its
        consumers it observes the same tensors as ``"formed"``.
        ``"pre_and_post_activation"``: where the features are formed and, for
        every nonlinearity on the way there (ReLU, GELU, SiLU, tanh, ...: the
        ops of ``rules.elementwise.ACTIVATIONS``), at its input too, pooled
        (a conv-BN-ReLU block at the BatchNorm output and at the ReLU
        output; a residual stream before and after each block's final ReLU).
        The default gave the best CCA merges on the converged benchmark
        models; which placement merges best depends on the model and the
        aligner (measured on the benchmarks page).
        ``ModelMerger(taps=...)`` passes it on.

    Returns
    -------
    list of Space
        In graph order (the order their first layer is called).

    Raises
    ------
    UnsupportedOperationError
        If the model cannot be captured, or an operation on feature tensors
        has no rule (the message names the graph node, its ATen op and module
        path). Describe the spaces by hand in that case.
    ValueError
        If the model cannot run on ``example_input``, or ``taps`` is not one
        of the placements.

    Warns
    -----
    AveragingFallbackWarning
        When channels produced by a layer cannot be aligned (a constant varying
        along them, an op that depends on their order): they keep each model's
        basis and the merge averages them.

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
    return analyze(model, example_input, taps)[1]
