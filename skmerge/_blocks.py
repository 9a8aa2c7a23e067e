"""Aligning block-diagonal spaces: groups, heads matched as wholes, tied (orthogonal) spaces.

A space with ``block_size < dim`` (GroupNorm groups, a grouped convolution,
attention heads) is aligned block by block. Attention heads of two models do
not line up by index: the heads of one layer (its query-key and value-output
spaces, one ``block_family``) are first matched as wholes, by a linear
assignment maximizing the summed squared correlations between a head of the
model and a head of the reference over all spaces of the family, and every
block is then aligned to the reference block it was matched with. The same
permutation of heads moves the queries, keys and values, so the attention is
unchanged by it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.base import clone

from .stats import CrossCovariance

__all__ = ["BlockAligner", "block_families", "match_blocks", "match_heads", "orthogonal_aligner"]


def block_families(spaces) -> dict:
    """``{family: [space indices]}`` for the spaces whose blocks permute together."""
    families: dict = {}
    for i, space in enumerate(spaces):
        if space.block_family is not None and space.block_size < space.dim:
            families.setdefault(space.block_family, []).append(i)
    return families


def match_heads(spaces, pair_with_reference, n_models: int, reference: int) -> dict:
    """``{(family, k): order}``: model ``k``'s blocks matched to the reference's, once per family.

    The heads of one attention layer move as wholes in all its spaces, so
    they are matched on the pooled similarity of those spaces.
    ``pair_with_reference(i, k)`` is the CrossCovariance of model ``k``
    against the reference in space ``i``.
    """
    orders = {}
    for family, members in block_families(spaces).items():
        for k in range(n_models):
            if k != reference:
                pairs = [pair_with_reference(i, k) for i in members]
                orders[family, k] = match_blocks(pairs, spaces[members[0]].block_size)
    return orders


def _correlation(pair: CrossCovariance) -> torch.Tensor:
    cov = pair.covariance_xy()
    sx = pair.covariance_xx().diagonal().clamp_min(0).sqrt()
    sy = pair.covariance_yy().diagonal().clamp_min(0).sqrt()
    scale = torch.outer(sx, sy)
    return torch.where(scale > 0, cov / scale.clamp_min(1e-300), torch.zeros_like(cov))


def block_similarity(pairs, block_size: int) -> np.ndarray:
    """``S[h, g]``: summed squared correlations between block ``h`` of the model and ``g`` of the reference."""
    total = None
    for pair in pairs:
        corr = _correlation(pair)
        n = corr.shape[0] // block_size
        blocks = corr.reshape(n, block_size, n, block_size).square().sum((1, 3))
        total = blocks if total is None else total + blocks
    return total.cpu().numpy()


def match_blocks(pairs, block_size: int) -> np.ndarray:
    """``order[h]``: the reference block that block ``h`` of the model is aligned to."""
    similarity = block_similarity(pairs, block_size)
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    order = np.empty(len(rows), dtype=np.int64)
    order[rows] = cols
    return order


class BlockAligner:
    """One aligner per diagonal block; block ``h`` of the model aligned to block ``order[h]`` of the reference.

    Parameters
    ----------
    aligner : estimator
        Cloned for every block.
    block_size : int
    order : array-like of int, optional
        The matching of the blocks (identity by default: GroupNorm groups and
        the groups of a grouped convolution stay in place).
    """

    def __init__(self, aligner, block_size: int, order=None):
        self.aligner = aligner
        self.block_size = block_size
        self.order = order

    def fit_from_stats(self, pair: CrossCovariance):
        d = pair.n_features_x
        b = self.block_size
        n = d // b
        self.order_ = np.arange(n) if self.order is None else np.asarray(self.order, dtype=np.int64)
        self.blocks_ = [
            clone(self.aligner).fit_from_stats(pair.select(slice(h * b, (h + 1) * b),
                                                           slice(g * b, (g + 1) * b)))
            for h, g in enumerate(self.order_)
        ]
        return self

    def _assemble(self, attribute: str, transposed: bool) -> torch.Tensor:
        b = self.block_size
        mats = [torch.as_tensor(getattr(block, attribute)) for block in self.blocks_]
        n = len(mats)
        out = torch.zeros(n * b, n * b, dtype=mats[0].dtype, device=mats[0].device)
        for h, (g, mat) in enumerate(zip(self.order_, mats)):
            rows, cols = (g, h) if transposed else (h, g)
            out[rows * b:(rows + 1) * b, cols * b:(cols + 1) * b] = mat
        return out

    # Derived from the blocks (which pickle their tensors to the CPU themselves).
    @property
    def mapping_(self) -> torch.Tensor:
        """``(d, d)``: block ``h`` of the model to block ``order_[h]`` of the reference."""
        return self._assemble("mapping_", transposed=False)

    @property
    def inverse_mapping_(self) -> torch.Tensor:
        return self._assemble("inverse_mapping_", transposed=True)

    @property
    def permutation_(self) -> torch.Tensor | None:
        """New channel ``g*b + j`` is old channel ``h*b + p_h[j]`` when every block is a permutation."""
        permutations = [getattr(b, "permutation_", None) for b in self.blocks_]
        if any(p is None for p in permutations):
            return None
        b = self.block_size
        out = torch.empty(len(permutations) * b, dtype=torch.long)
        for h, (g, p) in enumerate(zip(self.order_, permutations)):
            out[int(g) * b:(int(g) + 1) * b] = torch.as_tensor(p).long().cpu() + h * b
        return out

    def __repr__(self):
        matched = "" if self.order is None else ", heads matched"
        return f"BlockAligner({self.aligner!r}, block_size={self.block_size}{matched})"


def orthogonal_aligner(aligner, space):
    """The aligner for a tied space: itself if it yields permutations, else orthogonal Procrustes.

    A weight that is both producer and consumer of a space (an embedding tied
    to the output layer) transforms with the map and with its inverse
    transpose at once; only orthogonal maps satisfy both.
    """
    from .aligners import PermutationAligner, ProcrustesAligner

    if isinstance(aligner, PermutationAligner) or type(aligner).__name__ == "MatchedPermutation":
        return aligner
    if isinstance(aligner, ProcrustesAligner) and not aligner.scale:
        return aligner
    warnings.warn(
        f"Space {space.name!r} has weights that both create and read it (tied weights): only "
        f"orthogonal maps keep the model's function, so it is aligned with "
        f"ProcrustesAligner(scale=False) instead of {type(aligner).__name__}.", UserWarning, stacklevel=4)
    return ProcrustesAligner(scale=False)
