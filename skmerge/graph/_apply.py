"""Apply per-space transforms (permutations or invertible maps) to a state_dict."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .._model_checks import all_finite
from ._spaces import ParamSlice, Space

__all__ = ["apply_transforms", "gather_slice", "permute_space_", "transform_tensor", "slices_by_tensor",
           "normalize_transforms", "work_dtype"]


def _as_matrix(x) -> torch.Tensor | None:
    try:
        t = torch.as_tensor(x)
    except Exception:
        return None
    return t if t.ndim == 2 else None


def _normalize(transform, space: Space, i: int):
    """Return ``None``, ``("perm", perm)`` or ``("pair", mapping, inverse)``."""
    if transform is None:
        return None
    d = space.dim
    if isinstance(transform, (tuple, list)) and len(transform) == 2:
        mats = [_as_matrix(x) for x in transform]
        if all(m is not None for m in mats):
            for name, m in zip(("mapping", "inverse_mapping"), mats):
                if tuple(m.shape) != (d, d):
                    raise ValueError(
                        f"transforms[{i}]: {name} has shape {tuple(m.shape)}, expected ({d}, {d}) "
                        f"for space {space.name!r}"
                    )
                if not all_finite(m):
                    raise ValueError(f"transforms[{i}]: {name} contains NaN or inf")
            # float32 maps (of wide spaces solved in float32) stay float32: half the memory
            dtype = torch.float32 if all(m.dtype == torch.float32 for m in mats) else torch.float64
            return ("pair", mats[0].to(dtype), mats[1].to(dtype))
    try:
        perm = torch.as_tensor(transform)
    except Exception:
        perm = None
    if perm is not None and perm.ndim == 1 and not (perm.is_floating_point() or perm.is_complex()):
        perm = perm.to(device="cpu", dtype=torch.long)
        if perm.numel() != d or not torch.equal(perm.sort().values, torch.arange(d)):
            raise ValueError(f"transforms[{i}] is not a permutation of range({d}) (space {space.name!r})")
        return ("perm", perm)
    raise TypeError(
        f"transforms[{i}] must be None, a 1-D integer permutation of length {d}, or a pair "
        f"(mapping, inverse_mapping) of ({d}, {d}) matrices; got {type(transform).__name__}"
    )


def _locate(t: torch.Tensor, sl: ParamSlice):
    """Return ``(view, positions, d, k)``: where the channels of ``sl`` sit in ``t``.

    ``view`` is ``t`` or ``t.flatten(sl.axis)`` (a view when ``t`` is contiguous)
    and ``positions`` the flat index along ``sl.axis`` of ``view``.
    """
    index = sl.index.to(t.device)
    d, k = index.shape
    # k > 1 (or positions past the axis): the positions count tensor.flatten(axis)
    flat = sl.flat
    if flat is None:
        flat = k > 1 or (index.numel() > 0 and int(index.max()) >= t.shape[sl.axis])
    view = t.flatten(sl.axis) if flat else t
    positions = index.reshape(-1)
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= view.shape[sl.axis]):
        raise ValueError(
            f"{sl!r} points past the {view.shape[sl.axis]} positions of axis {sl.axis} of "
            f"{sl.name!r} (shape {tuple(t.shape)}): the space does not match this state_dict"
        )
    return view, positions, d, k


def gather_slice(t: torch.Tensor, sl: ParamSlice) -> torch.Tensor:
    """The positions of ``sl`` in ``t``, channel first.

    Parameters
    ----------
    t : torch.Tensor
        The tensor named ``sl.name`` (any dtype and device).
    sl : ParamSlice

    Returns
    -------
    torch.Tensor
        A new tensor of shape ``(d, k, *rest)``: channel ``c`` of the space,
        its ``k`` positions along ``sl.axis``, then every other axis of ``t``
        (in order). ``gather_slice(t, sl).reshape(d, -1)`` is the matrix whose
        row ``c`` holds every entry of ``t`` that belongs to channel ``c``.
    """
    view, positions, d, k = _locate(t, sl)
    g = view.index_select(sl.axis, positions).movedim(sl.axis, 0)
    return g.reshape(d, k, *g.shape[1:])


def _scatter_(view: torch.Tensor, sl: ParamSlice, positions: torch.Tensor, g: torch.Tensor) -> None:
    d, k, *rest = g.shape
    view.index_copy_(sl.axis, positions, g.reshape(d * k, *rest).movedim(0, sl.axis))


def permute_space_(tensors: dict, space: Space, perm) -> None:
    """Permute the channels of one space in place, by indexing.

    Parameters
    ----------
    tensors : dict of str to torch.Tensor
        Must hold every tensor named by the producers and consumers of
        ``space``, contiguous (modified in place).
    space : Space
    perm : sequence of int
        New channel ``j`` is old channel ``perm[j]`` (as in
        :func:`apply_transforms`); not checked here.
    """
    for sl in space.producers + space.consumers:
        t = tensors[sl.name]
        view, positions, _, _ = _locate(t, sl)
        g = gather_slice(t, sl)
        _scatter_(view, sl, positions, g[torch.as_tensor(perm, dtype=torch.long, device=t.device)])


#: entries of the largest product output formed at once when transforming a tensor in place
_CHUNK = 1 << 24

#: a whole-axis slice with at least this many entries per channel and row (a
#: Linear after a flatten) is multiplied row by row in place (a batched
#: product); with fewer (a 3x3 convolution) that is several times slower than
#: one product on a channel-first copy
_BATCHED_MIN_COLUMNS = 16


def _is_whole_axis(view: torch.Tensor, sl: ParamSlice, positions: torch.Tensor) -> bool:
    """Whether ``sl`` owns every position of its (possibly flattened) axis, in order.

    Most slices do: the rows of a layer, the columns of the next one, the
    ``H*W`` columns per channel of a Linear after a flatten.
    """
    n = view.shape[sl.axis]
    return positions.numel() == n and torch.equal(positions, torch.arange(n, device=positions.device))


def _transform_slice(t: torch.Tensor, sl: ParamSlice, op, role: str) -> None:
    """Transform the positions of ``sl`` in ``t`` (contiguous, the work precision) in place."""
    view, positions, d, k = _locate(t, sl)
    if not _is_whole_axis(view, sl, positions):
        g = gather_slice(t, sl)  # channel, its k positions, everything else
        _scatter_(view, sl, positions, _transformed(g, sl, op, role, t.device))
        return
    if view.numel() == 0:
        return
    # The slice is the whole axis (channel-major): the tensor is a
    # (before, channel, after) view, transformed in place a chunk at a time so
    # that no product output is as large as a big tensor (a classifier).
    before = math.prod(view.shape[:sl.axis])
    x = view.view(before, d, view.numel() // (before * d))
    if op[0] == "perm":
        perm = op[1].to(t.device)
        _in_chunks(x, 0, lambda part, out: torch.index_select(part, 1, perm, out=out))
        return
    matrix = _left_matrix(sl, op, role, t.device, t.dtype)
    if before == 1:  # channels along the first axis (a layer's rows): one product per chunk of columns
        _in_chunks(x[0], 1, lambda part, out: torch.matmul(matrix, part, out=out))
    elif x.shape[2] == 1:  # along the last axis (a Linear's columns): rows times matrix^T
        _in_chunks(x[:, :, 0], 0, lambda part, out: torch.matmul(part, matrix.T, out=out))
    elif x.shape[2] >= _BATCHED_MIN_COLUMNS:  # a Linear after a flatten: row by row
        _in_chunks(x, 0, lambda part, out: torch.matmul(matrix, part, out=out))
    else:  # a convolution's input channels: one product on a channel-first copy
        _in_chunks(x, 0, lambda part, out: out.copy_(_channel_first_product(matrix, part)))


def _in_chunks(x: torch.Tensor, axis: int, product) -> None:
    """``x = product(x)`` in place, a slab of ``axis`` at a time.

    ``product(part, out)`` writes its result (of ``part``'s shape) into
    ``out``, which is one buffer reused by every slab: a new output per slab
    would be a fresh allocation, page faults included, of up to ``_CHUNK``
    entries each time.
    """
    step = max(1, _CHUNK * x.shape[axis] // max(1, x.numel()))
    buffer = None
    for start in range(0, x.shape[axis], step):
        part = x.narrow(axis, start, min(step, x.shape[axis] - start))
        if buffer is None:
            buffer = torch.empty(part.numel(), dtype=x.dtype, device=x.device)
        out = buffer[:part.numel()].view(part.shape)
        product(part, out)
        part.copy_(out)


def _channel_first_product(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix`` applied along axis 1 of a ``(rows, channels, columns)`` tensor, by one product."""
    g = x.movedim(1, 0)
    return (matrix @ g.reshape(g.shape[0], -1)).reshape(g.shape).movedim(0, 1)


def _left_matrix(sl: ParamSlice, op, role: str, device, dtype) -> torch.Tensor:
    """The ``(d, d)`` matrix ``L`` whose product ``L @ g`` puts channel-first entries in the new basis."""
    if role == "producers":
        mapping = op[1].to(device=device, dtype=dtype)
        if sl.scale:  # s'_j = sum_i inverse[j, i] s_i mapping[i, j]: diag(M^-1 diag(s) M)
            return op[2].to(device=device, dtype=dtype) * mapping.T
        # rows: P' = mapping^T P ; variances: v' = (mapping**2)^T v
        return (mapping.square() if sl.variance else mapping).T
    # columns: C' = C inverse^T, i.e. new channel j = sum_i inverse[j, i] old channel i
    return op[2].to(device=device, dtype=dtype)


def _transformed(g: torch.Tensor, sl: ParamSlice, op, role: str, device) -> torch.Tensor:
    """``g`` (channels first) in the new basis of its space, in ``g``'s precision."""
    if op[0] == "perm":
        return g[op[1].to(device)]
    matrix = _left_matrix(sl, op, role, device, g.dtype)
    return (matrix @ g.reshape(g.shape[0], -1)).reshape(g.shape)


def slices_by_tensor(spaces: Sequence[Space], ops: Sequence) -> dict:
    """``{state_dict key: [(slice, op, role)]}`` for the spaces with a transform."""
    by_key: dict = {}
    for space, op in zip(spaces, ops):
        if op is None:
            continue
        for role in ("producers", "consumers"):
            for sl in getattr(space, role):
                by_key.setdefault(sl.name, []).append((sl, op, role, space))
    return by_key


def normalize_transforms(spaces: Sequence[Space], transforms: Sequence) -> list:
    """Check one transform per space; return the normalized operations (see :func:`apply_transforms`)."""
    spaces, transforms = list(spaces), list(transforms)
    if len(spaces) != len(transforms):
        raise ValueError(f"got {len(transforms)} transforms for {len(spaces)} spaces")
    return [_normalize(t, s, i) for i, (s, t) in enumerate(zip(spaces, transforms))]


def work_dtype(dtype: torch.dtype, device: torch.device, precision: str = "double") -> torch.dtype:
    """The precision a tensor is transformed in: float64, or float32 for float32 tensors when asked."""
    if device.type == "mps":
        return torch.float32  # MPS has no float64
    if precision == "single" and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    return torch.float64


def transform_tensor(value: torch.Tensor, entries: list, precision: str = "double") -> torch.Tensor:
    """A new tensor: ``value`` with every slice of ``entries`` transformed (dtype and device kept).

    Permutations move entries by indexing (exact in any precision); dense
    maps are matrix products in the work precision (:func:`work_dtype`).
    """
    device = value.device
    work = value.detach().to(dtype=work_dtype(value.dtype, device, precision), copy=True).contiguous()
    for sl, op, role, _ in entries:
        _transform_slice(work, sl, op, role)
    return work.to(dtype=value.dtype)


def apply_transforms(state_dict: dict, spaces: Sequence[Space], transforms: Sequence,
                     precision: str = "double") -> dict:
    """Transform a state_dict space by space.

    Convention: a model's features ``z`` (a row vector over a space's
    channels) become ``z @ mapping`` in the new basis. Producers therefore
    become ``mapping.T @ P`` along their axis, variance slices
    ``(mapping**2).T @ v``, and consumers ``C @ inverse_mapping.T``; with
    ``k > 1`` positions per channel every position transforms the same way.
    A permutation ``perm`` (new channel ``j`` = old channel ``perm[j]``) is the
    mapping with ``mapping[perm[j], j] = 1`` and is applied by indexing.

    Parameters
    ----------
    state_dict : dict of str to torch.Tensor
        A model's ``state_dict()``; it is not modified.
    spaces : sequence of Space
        Spaces from :func:`find_spaces` (or built by hand).
    transforms : sequence
        One entry per space: ``None`` (unchanged), a 1-D integer
        permutation of length ``dim`` (LongTensor, array or list), or a pair
        ``(mapping, inverse_mapping)`` of ``(dim, dim)`` float matrices
        (tensors or arrays, on any device).
    precision : {"double", "single"}, default="double"
        Precision of the products with dense maps: float64, or float32 for
        float32 (and half) tensors. Permutations are exact either way.

    Returns
    -------
    dict
        A new state_dict (same key order, ``_metadata`` kept) whose tensors are
        new tensors with the original dtypes and devices.

    Raises
    ------
    ValueError
        If the lengths differ, a transform has the wrong shape, is not a
        permutation, or contains NaN/inf.
    KeyError
        If a slice names a key that is not in ``state_dict``.

    Notes
    -----
    Spaces never share positions of a tensor, so the order in which they are
    applied does not matter. ``block_size`` is not enforced here: a
    transform that is not block-diagonal under GroupNorm changes the function.
    """
    by_key = slices_by_tensor(spaces, normalize_transforms(spaces, transforms))
    for key, entries in by_key.items():
        if key not in state_dict:
            raise KeyError(f"space {entries[0][3].name!r}: {key!r} is not in the state_dict")
    out = OrderedDict()
    for key, value in state_dict.items():
        if key in by_key:
            out[key] = transform_tensor(value, by_key[key], precision)
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().clone()
        else:
            out[key] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out
