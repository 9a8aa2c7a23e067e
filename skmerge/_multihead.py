"""A model with one shared (zipped) trunk and one head per source model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MultiHeadModel", "share_tensors"]


class MultiHeadModel(nn.Module):
    """Several copies of one architecture that share their trunk; the output averages the heads'.

    What :class:`~skmerge.zipit.ZipItMerger` returns with ``stop_at``: copy
    ``k`` is model ``k`` with the zipped trunk in place of its own first
    layers. Parameters and buffers of the trunk are the *same* tensors in
    every copy (stored once; fine-tuning the model trains one trunk), the
    rest (the head) is each model's own, reading the trunk's features
    through its unmerge matrix.

    Parameters
    ----------
    heads : sequence of torch.nn.Module
        One full model per source model (tensors of the trunk shared).
    weights : sequence of float
        Weights of the heads' outputs in :meth:`forward` (they sum to one).

    Notes
    -----
    :meth:`forward` returns the weighted mean of the heads' outputs (their
    logits for a classifier): the output has the shape of one model's, so
    ``predict``, ``score``, BatchNorm re-estimation and every tool that takes
    a model work unchanged, and at a cut after the last feature space (only
    the output layers kept per model) the mean of the logits of linear output
    layers is exactly the fully zipped model's output. Use
    :meth:`head_outputs` for the separate outputs (e.g. to average
    probabilities, or to route each task's inputs to its own head).

    Each copy runs the whole computation: the cut is a set of parameters
    (the trunk), not a module boundary, so it is valid on any graph, but the
    trunk is computed once per head. The compute cost is that of the
    ensemble; the memory saved is the trunk's parameters.
    """

    def __init__(self, heads: Sequence[nn.Module], weights: Sequence[float]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        weights = torch.as_tensor([float(w) for w in weights], dtype=torch.float64)
        if weights.shape != (len(self.heads),):
            raise ValueError(f"need one weight per head ({len(self.heads)}), got {tuple(weights.shape)}")
        self.register_buffer("head_weights", weights, persistent=False)

    def head_outputs(self, *args, **kwargs) -> tuple:
        """Every head's output on the inputs, in the order of the source models."""
        return tuple(head(*args, **kwargs) for head in self.heads)

    def forward(self, *args, **kwargs):
        """The weighted mean of the heads' outputs (tensors of one shape)."""
        outputs = self.head_outputs(*args, **kwargs)
        if not all(isinstance(out, torch.Tensor) for out in outputs):
            raise TypeError("MultiHeadModel averages tensor outputs; these models return "
                            f"{type(outputs[0]).__name__}. Use head_outputs() for the separate outputs.")
        total = None
        for weight, out in zip(self.head_weights.tolist(), outputs):
            total = weight * out if total is None else total + weight * out
        return total

    def extra_repr(self) -> str:
        return f"n_heads={len(self.heads)}"


def share_tensors(modules: Sequence[nn.Module], names: set) -> None:
    """Make ``modules[k]`` use ``modules[0]``'s parameter or buffer for every name in ``names``."""
    first = modules[0]
    for name in names:
        owner_path, _, attr = name.rpartition(".")
        source = first.get_submodule(owner_path)
        for module in modules[1:]:
            owner = module.get_submodule(owner_path)
            if attr in owner._parameters:
                owner._parameters[attr] = source._parameters[attr]
            elif attr in owner._buffers:
                owner._buffers[attr] = source._buffers[attr]
