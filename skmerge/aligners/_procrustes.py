"""Orthogonal Procrustes alignment: the closest (scaled) rotation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from skmerge._linalg import svd
from skmerge.aligners._base import BaseAligner
from skmerge.aligners._cca import _solve_dtype
from skmerge.stats import CrossCovariance

__all__ = ["ProcrustesAligner"]


class ProcrustesAligner(BaseAligner):
    """Align ``X``'s features to ``y``'s with an orthogonal (Procrustes) map.

    The rotation that best superimposes the centered activations: with the
    centered cross-covariance ``S_xy`` (p, q)::

        U, s, Vt = svd(S_xy)                     # thin SVD
        R = U Vt                                 # maximizes tr(R^T S_xy) over
                                                 # (semi-)orthogonal R
        c = sqrt((tr S_yy / q) / (tr S_xx / p))  # if scale, else 1
        mapping_         = c R                   # (p, q)
        inverse_mapping_ = R^T / c               # (q, p)

    ``R`` minimizes ``||X_c R - y_c||_F`` over orthogonal matrices (Schönemann
    1966); ``c`` matches the mean variance per feature of ``transform(X)``
    to ``y``'s (``sqrt(tr S_yy / tr S_xx)`` when ``p == q``). This is the
    large-regularization limit of CCA: it equals
    ``CCAAligner(regularization=1)`` exactly (with ``scale=True``), for any
    ``p`` and ``q``. With ``p != q``, ``R`` is semi-orthogonal (orthonormal
    columns if ``p > q``, orthonormal rows if ``p < q``) and
    ``inverse_mapping_`` is the pseudo-inverse of ``mapping_``.

    Directions in which ``S_xy`` is (numerically) zero -- units that are dead
    or constant on the alignment data, or more features than samples -- have
    arbitrary singular vectors; as in :class:`~skmerge.aligners.CCAAligner`
    they are left out of ``R`` (mapped to zero, so a dead unit is never turned
    into a live one). ``R`` is then a partial isometry and
    ``inverse_mapping_`` still its pseudo-inverse.

    Compared with CCA, Procrustes ignores the within-model covariances: it
    never inverts them, so it is stable with few samples per feature and
    never amplifies low-variance directions, but it cannot undo a non-
    orthogonal change of basis (different per-unit scales, mixing with
    unequal gains). For a permuted copy with full-rank covariances the polar
    factor of ``S_xy`` *is* the permutation.

    Parameters
    ----------
    scale : bool, default=True
        Multiply the rotation by ``c = sqrt((tr S_yy / q) / (tr S_xx / p))``
        so that the aligned features have the reference's overall magnitude.
        ``False`` gives the pure rotation (``mapping_.T @ mapping_ == I``
        when ``p == q``) and leaves magnitude differences between the models
        to the averaging. Either way the aligned model computes the same
        function when ``R`` is a permutation (or the layer after it is
        linear), since ``inverse_mapping_`` undoes ``mapping_``.

    solver : {"auto", "double", "single"}, default="auto"
        Precision of the SVD: ``"auto"`` uses float32 for spaces of at least
        1024 features on CPUs (as :class:`~skmerge.aligners.CCAAligner`),
        float64 otherwise.

    Attributes
    ----------
    mapping_ : ndarray or torch.Tensor of shape (p, q)
        ``transform(X) == X @ mapping_``; ``scale_ * R``.
    inverse_mapping_ : ndarray or torch.Tensor of shape (q, p)
        ``R.T / scale_``: the inverse of ``mapping_`` when ``p == q`` and
        ``S_xy`` has full rank, otherwise its pseudo-inverse.
    scale_ : float
        The factor ``c`` used (1.0 when ``scale=False``; 0.0 when either side
        has no variance at all, in which case ``mapping_`` is zero).
    singular_values_ : ndarray or torch.Tensor of shape (min(p, q),)
        Singular values of ``S_xy``, descending (the cross-covariance the
        rotation captures; their sum is ``tr(R^T S_xy)``).
    n_features_in_ : int
        Number of features ``p`` of ``X``.
    feature_names_in_ : ndarray of shape (p,)
        Defined only when ``X`` has string feature names.
    stats_ : CrossCovariance
        The statistics the aligner was fitted from.

    See Also
    --------
    CCAAligner : Interpolates between CCA and this map with ``regularization``.
    PermutationAligner : The special case of a 0/1 orthogonal matrix.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.aligners import ProcrustesAligner
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(300, 3)) @ np.diag([3.0, 2.0, 1.0])
    >>> Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))   # a random rotation
    >>> aligner = ProcrustesAligner().fit(X, X @ Q)
    >>> np.allclose(aligner.mapping_, Q), aligner.scale_
    (True, 1.0)
    """

    def __init__(self, scale: bool = True, solver: str = "auto") -> None:
        self.scale = scale
        self.solver = solver

    def _check_params(self) -> None:
        if not isinstance(self.scale, (bool, np.bool_)):
            raise ValueError(f"scale must be True or False, got {self.scale!r}.")
        if getattr(self, "solver", "auto") not in ("auto", "double", "single"):
            raise ValueError(f'solver must be "auto", "double" or "single", got {self.solver!r}.')

    def _solve(self, stats: CrossCovariance) -> dict[str, Any]:
        p, q = stats.n_features_x, stats.n_features_y
        s_xy = stats.covariance_xy()
        dtype = _solve_dtype(getattr(self, "solver", "auto"), p, q, 1.0, 1.0, s_xy.device)
        u, s, vh = svd(s_xy.to(dtype))
        # Same numerical-rank rule as CCAAligner (so regularization=1 agrees).
        tolerance = max(p, q) * torch.finfo(s.dtype).eps * (s.max() if s.numel() else 0.0)
        keep = s > tolerance
        rotation = u[:, keep] @ vh[keep]
        factor = 1.0
        if self.scale:
            var_x = float(torch.trace(stats.covariance_xx())) / p
            var_y = float(torch.trace(stats.covariance_yy())) / q
            factor = math.sqrt(var_y / var_x) if var_x > 0 and var_y > 0 else 0.0
        if factor == 0.0:  # one side has no variance: S_xy == 0, nothing to map
            zeros = torch.zeros_like(rotation)
            return {
                "mapping_": zeros,
                "inverse_mapping_": zeros.T.clone(),
                "scale_": 0.0,
                "singular_values_": s,
            }
        return {
            "mapping_": factor * rotation,
            "inverse_mapping_": rotation.T / factor,
            "scale_": float(factor),
            "singular_values_": s,
        }
