"""Permutation alignment: one-to-one feature matching by correlation."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from skmerge.aligners._base import BaseAligner, _correlation_scale
from skmerge.stats import CrossCovariance

__all__ = ["PermutationAligner"]


class PermutationAligner(BaseAligner):
    """Match each reference feature with one feature of ``X`` (activation matching).

    Solves the linear assignment problem (``scipy.optimize.linear_sum_assignment``)
    that maximizes the summed Pearson correlation between matched features of
    ``X`` and ``y`` (Li et al. 2016; Ainsworth et al. 2023, "Git Re-Basin",
    activation matching). A feature with zero variance on the alignment data
    (a dead unit) has correlation 0 with everything, never NaN.

    For ``p != q`` the assignment is partial: with ``p > q`` the unmatched
    features of ``X`` are dropped, with ``p < q`` the unmatched reference
    features get ``permutation_[j] == -1`` and a zero column in ``mapping_``.

    Attributes
    ----------
    permutation_ : ndarray or torch.Tensor of shape (q,), int64
        ``transform(X)[:, j] == X[:, permutation_[j]]`` (``-1``: unmatched).
    mapping_ : ndarray or torch.Tensor of shape (p, q)
        The 0/1 matrix with ``mapping_[permutation_[j], j] == 1``.
    inverse_mapping_ : ndarray or torch.Tensor of shape (q, p)
        ``mapping_.T`` (the inverse of a permutation is its transpose).
    n_features_in_ : int
        Number of features ``p`` of ``X``.
    feature_names_in_ : ndarray of shape (p,)
        Defined only when ``X`` has string feature names.
    stats_ : CrossCovariance
        The statistics the aligner was fitted from.

    See Also
    --------
    CCAAligner : Align whole subspaces instead of single features.
    IdentityAligner : No alignment (plain averaging).

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.aligners import PermutationAligner
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(size=(50, 4))
    >>> X = y[:, [2, 0, 3, 1]] * 3.0          # X's features are y's, shuffled
    >>> PermutationAligner().fit(X, y).permutation_
    array([1, 3, 0, 2])
    """

    def _solve(self, stats: CrossCovariance) -> dict[str, torch.Tensor]:
        eps = float(torch.finfo(torch.float64).eps)
        scale_x = _correlation_scale(stats.covariance_xx(ddof=0).diagonal(), stats.mean_x_, eps)
        scale_y = _correlation_scale(stats.covariance_yy(ddof=0).diagonal(), stats.mean_y_, eps)
        correlation = stats.covariance_xy(ddof=0) * scale_x[:, None] * scale_y[None, :]
        # The assignment itself is a small combinatorial problem: solve it on
        # the CPU with scipy, keep the results on the statistics' device.
        rows, cols = linear_sum_assignment(correlation.cpu().numpy(), maximize=True)
        device = stats.device
        rows = torch.as_tensor(rows, dtype=torch.int64, device=device)
        cols = torch.as_tensor(cols, dtype=torch.int64, device=device)
        p, q = correlation.shape
        permutation = torch.full((q,), -1, dtype=torch.int64, device=device)
        permutation[cols] = rows
        mapping = torch.zeros((p, q), dtype=torch.float64, device=device)
        mapping[rows, cols] = 1.0
        return {
            "mapping_": mapping,
            "inverse_mapping_": mapping.T.clone(),
            "permutation_": permutation,
        }
