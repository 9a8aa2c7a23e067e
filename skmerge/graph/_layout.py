"""Tensor layouts: where a tensor's feature axis is and which spaces lie on it.

Pure helpers with no torch.fx knowledge, so the shape arithmetic can be read
(and tested) on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: union-find element of everything that must never be transformed
#: (the model's inputs and outputs, constants, parameters used as tensors)
FIXED = 0


@dataclass(frozen=True)
class Layout:
    """Feature axis of a tensor and the spaces along it.

    ``axis is None`` marks a *fixed* tensor (model input, constant): none of
    its axes may be transformed, whatever the axis.
    ``pieces`` are ``(element, n_channels)`` in order along ``axis``; the
    axis holds ``sum(n) * block`` positions, channel ``c`` at
    ``c * block + j`` (``block > 1`` after flattening ``(C, H, W)``).
    """

    axis: int | None
    pieces: tuple = ()
    block: int = 1

    @property
    def fixed(self) -> bool:
        return self.axis is None

    @property
    def n_channels(self) -> int:
        return sum(n for _, n in self.pieces)

    def offsets(self):
        """Yield ``(offset, element, n)`` for every piece."""
        off = 0
        for elem, n in self.pieces:
            yield off, elem, n
            off += n

    def with_axis(self, axis: int) -> Layout:
        return Layout(axis, self.pieces, self.block)

    def describe(self) -> str:
        if self.fixed:
            return "fixed"
        sizes = "+".join(str(n) for _, n in self.pieces)
        blk = f" x block {self.block}" if self.block != 1 else ""
        return f"axis {self.axis}: channels {sizes}{blk}"


FIXED_LAYOUT = Layout(None)


def slice_pieces(layout: Layout, start: int, stop: int) -> tuple | None:
    """Pieces covering channels ``[start, stop)``; None unless on piece boundaries."""
    bounds, out = {0}, []
    for off, elem, n in layout.offsets():
        bounds.add(off + n)
        if start <= off and off + n <= stop:
            out.append((elem, n))
    if start < stop and start in bounds and stop in bounds:
        return tuple(out)
    return None


def positions(dims, p: int, off: int, n: int, block: int, flat: bool = False) -> torch.Tensor:
    """Index ``(n, k)`` of channels ``off .. off+n`` of a parameter.

    ``dims`` is the parameter's shape from the slice axis on, with the
    feature dimension (``C_total * block`` entries) at position ``p``. When
    ``p == 0`` and ``block == 1`` the plain channel range is returned (the
    trailing dimensions, e.g. convolution kernels, travel along) unless
    ``flat``; otherwise positions count ``tensor.flatten(axis)``, as
    ParamSlice documents.
    """
    if p == 0 and block == 1 and not flat:
        return torch.arange(off, off + n)[:, None]
    dims = tuple(dims)
    pos = torch.arange(math.prod(dims)).reshape(dims).movedim(p, 0)
    pos = pos.reshape(dims[p] // block, block, -1)[off : off + n]
    return pos.reshape(n, -1)


def reshape_axis(in_shape, out_shape, axis: int, n_channels: int, block: int):
    """Follow a feature axis through a row-major reshape.

    Returns ``(new_axis, new_block)``; raises ValueError (with the reason)
    when the reshape mixes channels with other axes.
    """
    ins = [(i, s) for i, s in enumerate(in_shape) if s != 1]
    outs = [(j, s) for j, s in enumerate(out_shape) if s != 1]
    i = j = 0
    try:
        while i < len(ins):
            gi, prod_in = [i], ins[i][1]
            gj, prod_out = [j], outs[j][1]
            i, j = i + 1, j + 1
            while prod_in != prod_out:  # smallest groups of axes with equal sizes
                if prod_in < prod_out:
                    gi.append(i)
                    prod_in *= ins[i][1]
                    i += 1
                else:
                    gj.append(j)
                    prod_out *= outs[j][1]
                    j += 1
            if any(ins[g][0] == axis for g in gi):
                if ins[gi[0]][0] != axis:
                    raise ValueError("it merges the feature axis with the axes before it")
                # merged: channel c owns a contiguous run of positions, so the
                # first output axis of the group must hold whole channels
                size0 = outs[gj[0]][1]
                if size0 % n_channels:
                    raise ValueError("it splits the feature axis inside its channels")
                return outs[gj[0]][0], size0 // n_channels
    except IndexError:
        pass
    raise ValueError(f"cannot follow the reshape {tuple(in_shape)} -> {tuple(out_shape)}")


def probe_axis(fn, ndim: int, axis: int):
    """Where does ``axis`` go under a shape-only op ``fn``?

    ``fn`` is called on a meta tensor whose axes have distinct sizes; the
    output axis with the feature axis' size is its new place. Returns the new
    axis, or None when the axis was reduced away (or size 1 with keepdim).
    The output may be a tuple (``torch.max(x, dim)``): its first tensor counts.
    """
    sizes = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37][:ndim]
    if len(sizes) < ndim:
        raise ValueError("tensors with more than 12 axes are not supported")
    out = fn(torch.empty(sizes, device="meta"))
    if isinstance(out, (tuple, list)):
        out = out[0]
    shape = list(out.shape)
    return shape.index(sizes[axis]) if sizes[axis] in shape else None
