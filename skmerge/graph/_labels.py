"""Channel labels of a tensor: which channel (or parameter entry) sits at each position.

Every position of a tensor seen by the walker carries an integer *label*:

- ``>= 1``: a feature channel (a union-find element, one per output channel
  of a Linear/Conv/Embedding, ...);
- ``FIXED`` (0): never transformed (model inputs and outputs, constants);
- ``NEUTRAL`` (-1): carries no channel and constrains nothing (a per-sample
  scalar such as the mean over the channels);
- ``<= -2``: an entry of a parameter or buffer used directly as a tensor
  (a layer scale, a positional embedding, a class token), see
  :class:`ParamPositions`.

A :class:`Layout` stores the labels compressed to the axes along which they
vary (a convolution's features vary along the channel axis only, so a
``(N, C, H, W)`` map is described by ``C`` labels). Shape operations
(reshape, permute, slicing, concatenation, a channel shuffle) are followed by
applying the operation itself to the expanded labels: the index maps of the
operation come out exactly, with no rule per shape op.

Pure helpers with no tracer knowledge, so the bookkeeping can be read (and
tested) on its own.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

FIXED = 0
NEUTRAL = -1

__all__ = ["FIXED", "NEUTRAL", "PRODUCER", "CONSUMER", "Layout", "ParamPositions", "ParamRef"]

#: roles of a parameter entry bound to a channel: transformed with ``mapping.T``
#: (rows that create the channel) or ``inverse_mapping.T`` (columns that read it)
PRODUCER, CONSUMER = 0, 1


@dataclass(frozen=True, eq=False)
class Layout:
    """Labels of a tensor, stored along the axes where they vary.

    Parameters
    ----------
    axes : tuple of int
        Sorted (non-negative) axes of the tensor along which the labels vary.
    labels : torch.LongTensor
        Shape ``[size of each axis in axes]``; the label of a position is
        ``labels`` at its coordinates on ``axes`` (constant along the others).
    ndim : int
        Number of axes of the tensor.
    origin : str
        For a layout without channels, where it comes from: ``"input"`` (the
        model's inputs: joining a channel to it is expected) or
        ``"constant"`` (a tensor built in the graph: joining a channel to it
        is reported).
    """

    axes: tuple
    labels: torch.Tensor
    ndim: int
    #: for labels without channels: "input" (from the model's inputs) or "constant"
    origin: str = ""

    @staticmethod
    def constant(label: int, ndim: int, origin: str = "") -> Layout:
        """Every position carries ``label`` (FIXED for inputs and constants)."""
        return Layout((), torch.tensor(label, dtype=torch.long), ndim, origin)

    @staticmethod
    def along(axis: int, labels: torch.Tensor, ndim: int) -> Layout:
        """Labels varying along one axis (the features of a layer's output)."""
        return Layout.from_full(_unsqueezed(labels, (axis % ndim,), ndim))

    @staticmethod
    def from_full(full: torch.Tensor) -> Layout:
        """Compress a label tensor (or a broadcastable view of one) to its varying axes."""
        full = torch.as_tensor(full, dtype=torch.long)
        axes = []
        for axis in range(full.ndim):
            if full.shape[axis] > 1:
                first = full.narrow(axis, 0, 1)
                if not torch.equal(full, first.expand_as(full)):
                    axes.append(axis)
        index = tuple(slice(None) if a in axes else 0 for a in range(full.ndim))
        labels = full[index] if full.ndim else full
        return Layout(tuple(axes), labels.contiguous(), full.ndim)

    def full(self, shape) -> torch.Tensor:
        """The labels of every position of a tensor of ``shape`` (an expanded view)."""
        shape = tuple(shape)
        if len(shape) != self.ndim:
            raise ValueError(f"layout of a {self.ndim}-d tensor applied to shape {shape}")
        return _unsqueezed(self.labels, self.axes, self.ndim).expand(shape)

    def grid(self, shape, axes) -> torch.Tensor:
        """Labels over the axes ``axes`` of a tensor of ``shape`` (a superset of ``self.axes``)."""
        axes = tuple(axes)
        view = _unsqueezed(self.labels, tuple(axes.index(a) for a in self.axes), len(axes))
        return view.expand(tuple(shape[a] for a in axes))

    @property
    def inert(self) -> bool:
        """No feature channel and no parameter entry: only FIXED or NEUTRAL labels."""
        return bool((self.labels >= NEUTRAL).all()) and not bool((self.labels > FIXED).any())

    @property
    def fixed(self) -> bool:
        """Every label is FIXED."""
        return bool((self.labels == FIXED).all())

    @property
    def has_features(self) -> bool:
        return bool((self.labels > FIXED).any())

    @property
    def has_params(self) -> bool:
        return bool((self.labels < NEUTRAL).any())

    def feature_axes(self) -> tuple:
        """Axes along which feature labels (not only parameter entries) vary."""
        if not self.axes:
            return ()
        feat = torch.where(self.labels > FIXED, self.labels, torch.zeros_like(self.labels))
        return tuple(self.axes[i] for i in Layout.from_full(feat).axes)

    def describe(self) -> str:
        if not self.axes:
            kind = {FIXED: "fixed", NEUTRAL: "neutral"}.get(int(self.labels), "one channel")
            return f"{kind} ({self.ndim}-d)"
        sizes = "x".join(str(s) for s in self.labels.shape)
        return f"labels on axes {self.axes} ({sizes}) of a {self.ndim}-d tensor"


def _unsqueezed(labels: torch.Tensor, axes: tuple, ndim: int) -> torch.Tensor:
    """View ``labels`` (one dim per entry of ``axes``) as an ``ndim``-d tensor with 1s elsewhere."""
    shape = [1] * ndim
    for i, axis in enumerate(axes):
        shape[axis] = labels.shape[i]
    return labels.reshape(shape)


class ParamPositions:
    """Labels ``<= -2`` for the entries of parameters used directly as tensors.

    Each parameter gets a contiguous range of positions on first use; the
    label of entry ``i`` (row-major) of a parameter is ``-2 - (offset + i)``.
    """

    def __init__(self):
        self._offsets: list[int] = []
        self._names: list[str] = []
        self._by_name: dict[str, int] = {}
        self._next = 0

    def labels(self, name: str, shape) -> torch.Tensor:
        """Labels of every entry of the parameter ``name`` of ``shape``."""
        numel = math.prod(shape)
        if name not in self._by_name:
            self._by_name[name] = self._next
            self._offsets.append(self._next)
            self._names.append(name)
            self._next += max(numel, 1)
        offset = self._by_name[name]
        return -2 - (offset + torch.arange(numel, dtype=torch.long)).reshape(tuple(shape))

    def decode(self, labels: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """Group parameter labels by parameter: ``[(name, mask into labels, flat positions)]``."""
        flat = -2 - labels
        out = []
        for i, start in enumerate(self._offsets):
            stop = self._offsets[i + 1] if i + 1 < len(self._offsets) else self._next
            mask = (flat >= start) & (flat < stop)
            if bool(mask.any()):
                out.append((self._names[i], mask, flat[mask] - start))
        return out

    def name_of(self, label: int) -> str:
        position = -2 - int(label)
        return self._names[bisect.bisect_right(self._offsets, position) - 1]


@dataclass(frozen=True)
class ParamRef:
    """A parameter (or buffer) read by the graph, possibly through a transpose.

    Axis ``i`` of the value is axis ``dims[i]`` of the parameter ``name``.
    """

    name: str
    shape: tuple
    dims: tuple

    def permuted(self, dims) -> ParamRef:
        return ParamRef(self.name, self.shape, tuple(self.dims[d] for d in dims))

    @property
    def value_shape(self) -> tuple:
        return tuple(self.shape[d] for d in self.dims)
