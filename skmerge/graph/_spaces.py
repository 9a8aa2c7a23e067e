"""Data classes describing feature spaces: :class:`ParamSlice`, :class:`Tap`, :class:`Space`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["ParamSlice", "Tap", "GraphTap", "Space", "UnsupportedOperationError", "AveragingFallbackWarning"]

_HAND_HINT = (
    "To merge such a model, describe its feature spaces by hand: build "
    "skmerge.graph.Space objects (with ParamSlice and Tap) and pass them as "
    "ModelMerger(..., spaces=spaces), or to permute_model/check_spaces(spaces=...) to "
    "check them (see the user guide page 'Feature spaces')."
)


class AveragingFallbackWarning(UserWarning):
    """Some channels of a model cannot be aligned: the merge averages them as they are.

    Issued by :func:`~skmerge.graph.find_spaces` (and so by the mergers) when
    an operation fixes channels that a layer produces (a constant varying
    along them, an op that depends on their order, a map along an axis
    without channels) and when a model has no feature space at all. The
    message names the module and the operation.
    """


class UnsupportedOperationError(ValueError):
    """A model contains an operation that :func:`find_spaces` has no rule for.

    Raised instead of guessing, so that a merge never uses a silently wrong
    description of the model. The message names the graph node, its ATen op
    and the module path it was called from, and explains how to pass the
    spaces by hand.

    Attributes
    ----------
    node : str or None
        Name of the offending node of the exported graph (None for tracing failures).
    target : str or None
        Readable op/target of that node.
    module_path : str or None
        Path of the module the node was called from (``""`` for the root).
    """

    def __init__(self, message, *, node=None, target=None, module_path=None):
        super().__init__(message)
        self.node = node
        self.target = target
        self.module_path = module_path


def _as_index(index) -> torch.Tensor:
    index = torch.as_tensor(index, dtype=torch.long, device="cpu")
    if index.ndim == 1:
        index = index[:, None]
    if index.ndim != 2:
        raise ValueError(f"ParamSlice.index must be 1-D or 2-D, got shape {tuple(index.shape)}")
    return index


def _index_text(index: torch.Tensor, axis: int) -> str:
    """Compact text for an index: a slice when it is a contiguous range."""
    d, k = index.shape
    flat = index.reshape(-1)
    if d and k == 1 and torch.equal(flat, torch.arange(int(flat[0]), int(flat[0]) + d)):
        rng = f"{int(flat[0])}:{int(flat[0]) + d}"
        return "[" + ":, " * axis + rng + "]"
    return f"[axis {axis}: {d} ch x {k}]"


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """Positions of one state_dict tensor that belong to a feature space.

    Parameters
    ----------
    name : str
        ``state_dict`` key, e.g. ``"layer1.0.conv1.weight"``; parameters and
        buffers (``running_mean``, ``running_var``) alike.
    axis : int
        Axis of that tensor the space lives on (0 for output rows, biases and
        norm parameters; 1 for the input columns of Linear/Conv weights).
    index : torch.Tensor
        LongTensor of shape ``(d, k)`` (a 1-D index is read as ``(d, 1)``):
        channel ``c`` of the space owns positions ``index[c, :]`` along
        ``axis``. ``k`` is 1 normally, ``H*W`` for the input columns of a
        Linear after a Flatten of ``(C, H, W)``, and ``H*W`` for the weight of
        ``LayerNorm([C, H, W])``. When ``k > 1`` (or the index points past the
        size of ``axis``) the positions count ``tensor.flatten(axis)``, i.e.
        the axis together with all trailing dimensions; when ``k == 1``
        trailing dimensions (convolution kernels) are carried along.
    variance : bool, default=False
        True for variance-like buffers (``running_var``): they transform with
        the elementwise squares of the mapping.
    flat : bool or None, default=None
        Whether ``index`` counts the positions of ``tensor.flatten(axis)``
        (True) or of ``axis`` itself, trailing dimensions carried along
        (False). None decides as described above (flat when ``k > 1`` or an
        index points past the size of ``axis``); :func:`find_spaces` always
        says which.
    scale : bool, default=False
        True for multiplicative per-channel parameters (the weights of
        BatchNorm, LayerNorm, GroupNorm, RMSNorm; a layer scale): under a
        dense map ``M`` (inverse ``M^-1``) they become the diagonal of
        ``M^-1 diag(s) M``, the per-channel scale closest to what the scale
        does in the new basis. Exact for permutations and for constant
        scales; treating them as vectors (``M^T s``) is exact for neither.
    """

    name: str
    axis: int
    index: torch.Tensor
    variance: bool = False
    flat: bool | None = None
    scale: bool = False

    def __post_init__(self):
        object.__setattr__(self, "index", _as_index(self.index))
        object.__setattr__(self, "axis", int(self.axis))
        if self.flat is not None:
            object.__setattr__(self, "flat", bool(self.flat))

    @property
    def dim(self) -> int:
        """Number of channels ``d`` covered by the slice."""
        return int(self.index.shape[0])

    def __eq__(self, other):
        if not isinstance(other, ParamSlice):
            return NotImplemented
        return (
            self.name == other.name
            and self.axis == other.axis
            and self.variance == other.variance
            and self.scale == other.scale
            and self.index.shape == other.index.shape
            and torch.equal(self.index, other.index)
            and (self.flat is None or other.flat is None or self.flat == other.flat)
        )

    def __hash__(self):
        return hash((self.name, self.axis, self.variance, self.scale, tuple(self.index.shape)))

    def __repr__(self):
        var = ", variance" if self.variance else (", scale" if self.scale else "")
        return f"ParamSlice({self.name}{_index_text(self.index, self.axis)}{var})"


@dataclass(frozen=True)
class Tap:
    """A place where a space is observed: the input of a consumer module.

    The input is read with a forward pre-hook on ``module``.

    Parameters
    ----------
    module : str
        Module path of the consumer (Linear/Conv) whose *input* is observed,
        e.g. ``"layer2.0.conv1"``.
    axis : int
        Feature axis of that input (1 for convolutions and ``(N, C)`` inputs,
        -1 for Linear layers on ``(N, ..., C)``).
    offset : int
        First channel of the space along that axis (non-zero after
        ``torch.cat``).
    block : int, default=1
        After a Flatten of ``(C, H, W)`` the axis has ``C * block`` entries,
        channel ``c`` at ``c * block + j``; the ``j`` become extra samples.
    dim : int or None, default=None
        Number of channels of the space. ``find_spaces`` fills it in, and so
        does :class:`Space` for taps built by hand; None means "to the end of
        the axis".
    """

    module: str
    axis: int
    offset: int = 0
    block: int = 1
    dim: int | None = None

    def extract(self, tensor: torch.Tensor) -> torch.Tensor:
        """Return this space's channels of a consumer input as a sample matrix.

        Parameters
        ----------
        tensor : torch.Tensor
            The input of ``module`` (what a forward pre-hook receives).

        Returns
        -------
        torch.Tensor
            ``(n_samples, dim)`` matrix: every position other than the
            channel (batch, spatial, token and block positions) is a sample.
        """
        grouped = self.extract_grouped(tensor)
        return grouped.reshape(-1, grouped.shape[-1])

    def extract_grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        """The same samples as :meth:`extract`, as ``(n_groups, group_size, dim)``, without a copy where possible.

        For a ``(N, C, *spatial)`` convolution input observed on axis 1 this is
        a strided view ``(N, prod(spatial), dim)`` of the tensor itself (the
        statistics center it straight into the layout their matrix products
        read, its only copy); otherwise one group holding :meth:`extract`'s
        matrix.
        """
        if self.block == 1 and tensor.ndim >= 3 and self.axis in (1, 1 - tensor.ndim):
            stop = self._stop(tensor)
            grouped = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
            return grouped[:, self.offset : stop].transpose(1, 2)
        return self._sample_matrix(tensor).unsqueeze(0)

    def _stop(self, tensor: torch.Tensor) -> int:
        width = tensor.shape[self.axis]
        if width % self.block:
            raise ValueError(
                f"tap on {self.module!r}: axis of size {width} is not a multiple of block {self.block}"
            )
        n_channels = width // self.block
        stop = n_channels if self.dim is None else self.offset + self.dim
        if stop > n_channels:
            raise ValueError(
                f"tap on {self.module!r}: channels {self.offset}:{stop} exceed the {n_channels} "
                "channels of the observed tensor"
            )
        return stop

    def _sample_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        stop = self._stop(tensor)
        x = tensor.movedim(self.axis, -1)
        n_channels = x.shape[-1] // self.block
        # channel c sits at c * block + j; the j's become samples
        x = x.reshape(*x.shape[:-1], n_channels, self.block).movedim(-1, -2)
        return x.reshape(-1, n_channels)[:, self.offset : stop]

    def __repr__(self):
        extra = f", offset={self.offset}" if self.offset else ""
        extra += f", block={self.block}" if self.block != 1 else ""
        return f"Tap({self.module!r}, axis={self.axis}{extra})"


@dataclass(frozen=True, eq=False)
class GraphTap:
    """A place where :func:`find_spaces` observes a space: a tensor of the exported graph.

    Taps are placed where a space's features are formed: at the output of the
    nonlinearity that follows each layer producing the space (or of the layer,
    or its norm, when none follows), over all positions, before any pooling,
    strided or shape-changing op; by default (``find_spaces(taps="both")``)
    also at the inputs of the layers that read the space. A residual stream
    is observed at the output of every block that writes to it.

    Parameters
    ----------
    node : str
        Name of the node of the exported graph (``torch.export``) whose output
        is observed.
    axes : tuple of int
        Axes of that tensor that hold the space's channels (usually one).
    index : torch.Tensor
        LongTensor ``(d, k)``: channel ``c`` of the space is read at positions
        ``index[c, :]`` of the tensor's ``axes`` flattened in order; every
        other position, and the ``k`` positions of a channel, are samples.
    dual : bool, default=False
        The observed channels transform with the inverse transpose of the
        space's map (the keys of a query-key space).
    module : str, default=""
        Path of the module the node belongs to (for reading only).
    """

    node: str
    axes: tuple
    index: torch.Tensor
    dual: bool = False
    module: str = ""

    def __post_init__(self):
        object.__setattr__(self, "index", _as_index(self.index))
        object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))

    @property
    def dim(self) -> int:
        """Number of channels ``d`` read by the tap."""
        return int(self.index.shape[0])

    def _contiguous_range(self):
        """``(axis, start)`` when the tap reads one axis at consecutive positions, else None."""
        d, k = self.index.shape
        if len(self.axes) != 1 or k != 1 or d == 0:
            return None
        start = int(self.index[0, 0])
        if torch.equal(self.index[:, 0], torch.arange(start, start + d)):
            return self.axes[0], start
        return None

    def extract_grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        """Samples of the space in ``tensor``, as ``(n_groups, group_size, d)``, without a copy where possible.

        A channel range on axis 1 of a ``(N, C, *spatial)`` map is a strided
        view ``(N, prod(spatial), d)``; otherwise one group holding the sample
        matrix of :meth:`extract`.
        """
        fast = self._contiguous_range()
        if fast is not None:
            axis, start = fast
            if axis == 1 and tensor.ndim >= 3:
                grouped = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
                return grouped[:, start:start + self.dim].transpose(1, 2)
            if axis == tensor.ndim - 1:
                return tensor.reshape(-1, tensor.shape[-1])[:, start:start + self.dim].unsqueeze(0)
        return self.extract(tensor).unsqueeze(0)

    def extract(self, tensor: torch.Tensor) -> torch.Tensor:
        """Samples of the space in ``tensor`` as an ``(n_samples, d)`` matrix."""
        moved = tensor.movedim(self.axes, tuple(range(-len(self.axes), 0)))
        flat = moved.reshape(*moved.shape[: moved.ndim - len(self.axes)], -1)
        d, k = self.index.shape
        picked = flat.index_select(-1, self.index.reshape(-1).to(tensor.device))
        picked = picked.reshape(*flat.shape[:-1], d, k).movedim(-1, -2)
        return picked.reshape(-1, d)

    def __eq__(self, other):
        if not isinstance(other, GraphTap):
            return NotImplemented
        return (self.node == other.node and self.axes == other.axes and self.dual == other.dual
                and self.index.shape == other.index.shape and torch.equal(self.index, other.index))

    def __hash__(self):
        return hash((self.node, self.axes, self.dual, tuple(self.index.shape)))

    def __repr__(self):
        where = f"{self.module}: " if self.module else ""
        fast = self._contiguous_range()
        if fast is not None:
            axis, start = fast
            chans = f"axis {axis}" + (f"[{start}:{start + self.dim}]" if start else "")
        else:
            chans = f"axes {self.axes}: {self.dim} ch x {self.index.shape[1]}"
        return f"GraphTap({where}{self.node}, {chans}{', dual' if self.dual else ''})"


def _short_list(items, limit=6) -> str:
    items = list(items)
    text = ", ".join(repr(i) for i in items[:limit])
    if len(items) > limit:
        text += f", ... (+{len(items) - limit} more)"
    return text or "-"


@dataclass
class Space:
    """A set of channels that must share one transform.

    Parameters
    ----------
    dim : int
        Number of channels.
    producers : sequence of ParamSlice
        Slices creating the space: Linear/Conv weight rows and biases, and the
        channel-wise norm parameters and running statistics that follow.
        They transform as ``P' = mapping.T @ P`` along their axis.
    consumers : sequence of ParamSlice
        Input columns of Linear/Conv weights reading the space. They
        transform as ``C' = C @ inverse_mapping.T`` along their axis.
    taps : sequence of Tap or GraphTap
        Where the space is observed (:class:`Tap`: the input of a module, for
        spaces written by hand; :class:`GraphTap`: a tensor of the exported
        graph, as :func:`find_spaces` places them). A residual stream has
        several and their statistics are pooled.
    block_size : int or None, default=None
        Transforms must be block-diagonal with blocks of this size (``dim``
        normally; ``C // G`` under ``GroupNorm(G, C)`` or a grouped
        convolution; the head size in attention). None means ``dim``.
    name : str, default=""
        Readable name, e.g. ``"layer1.0.conv2 (+3 joined)"``.
    orthogonal : bool, default=False
        Some entries are both producers and consumers of the space (a weight
        tied between an embedding and an output layer): only maps equal to
        their inverse transpose (permutations, rotations) keep the model's
        function. Such entries are listed once, as producers.
    block_family : str or None, default=None
        Spaces with the same family (the query-key and value-output spaces of
        one attention layer) may permute their blocks (heads) only together,
        with one permutation of whole blocks.
    """

    dim: int
    producers: tuple = ()
    consumers: tuple = ()
    taps: tuple = ()
    block_size: int | None = None
    name: str = ""
    orthogonal: bool = False
    block_family: str | None = None

    def __post_init__(self):
        self.dim = int(self.dim)
        self.producers = tuple(self.producers)
        self.consumers = tuple(self.consumers)
        if self.block_size is None:
            self.block_size = self.dim
        self.block_size = int(self.block_size)
        if self.block_size < 1 or self.dim % self.block_size:
            raise ValueError(f"block_size {self.block_size} does not divide dim {self.dim}")
        for s in self.producers + self.consumers:
            if not isinstance(s, ParamSlice):
                raise TypeError(f"producers and consumers must be ParamSlice objects, got {s!r}")
            if s.dim != self.dim:
                raise ValueError(f"{s!r} covers {s.dim} channels but the space has dim {self.dim}")
        taps = []
        for t in self.taps:
            if isinstance(t, GraphTap):
                if t.dim != self.dim:
                    raise ValueError(f"{t!r} reads {t.dim} channels but the space has dim {self.dim}")
                taps.append(t)
                continue
            if not isinstance(t, Tap):
                raise TypeError(f"taps must be Tap or GraphTap objects, got {t!r}")
            if t.dim is None:  # hand-built taps: the space knows its width
                t = dataclasses.replace(t, dim=self.dim)
            elif t.dim != self.dim:
                raise ValueError(f"{t!r} has dim {t.dim} but the space has dim {self.dim}")
            taps.append(t)
        self.taps = tuple(taps)

    def __repr__(self):
        block = f", block_size={self.block_size}" if self.block_size != self.dim else ""
        block += ", orthogonal" if self.orthogonal else ""
        block += f", block_family={self.block_family!r}" if self.block_family else ""
        return (
            f"Space(dim={self.dim}{block}, name={self.name!r})\n"
            f"  producers ({len(self.producers)}): {_short_list(self.producers)}\n"
            f"  consumers ({len(self.consumers)}): {_short_list(self.consumers)}\n"
            f"  taps ({len(self.taps)}): {_short_list(self.taps)}"
        )

