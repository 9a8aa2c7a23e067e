"""Identity alignment: the baseline of plain weight averaging."""

from __future__ import annotations

import torch

from skmerge.aligners._base import BaseAligner
from skmerge.stats import CrossCovariance

__all__ = ["IdentityAligner"]


class IdentityAligner(BaseAligner):
    """Leave features where they are: ``mapping_`` is the (rectangular) identity.

    Merging with this aligner is plain parameter averaging ("vanilla"
    averaging), the baseline every other aligner is compared against. Feature
    ``i`` of ``X`` is matched with feature ``i`` of ``y``; for ``p != q`` the
    extra features are dropped (``p > q``) or left at zero (``p < q``).

    It still accumulates ``stats_`` so that all aligners behave alike (e.g.
    ``partial_fit`` then switching aligners with ``fit_from_stats``).

    Attributes
    ----------
    mapping_ : ndarray or torch.Tensor of shape (p, q)
        ``eye(p, q)``.
    inverse_mapping_ : ndarray or torch.Tensor of shape (q, p)
        ``eye(q, p)``.
    n_features_in_ : int
        Number of features ``p`` of ``X``.
    feature_names_in_ : ndarray of shape (p,)
        Defined only when ``X`` has string feature names.
    stats_ : CrossCovariance
        The statistics the aligner was fitted from.

    See Also
    --------
    PermutationAligner : Match features one-to-one by correlation.
    CCAAligner : Match feature subspaces with canonical correlation analysis.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.aligners import IdentityAligner
    >>> X = np.arange(12.0).reshape(4, 3)
    >>> IdentityAligner().fit(X, X[:, :2]).transform(X).shape
    (4, 2)
    """

    def _solve(self, stats: CrossCovariance) -> dict[str, torch.Tensor]:
        p, q = stats.n_features_x, stats.n_features_y
        eye = torch.eye(p, q, dtype=torch.float64, device=stats.device)
        return {"mapping_": eye, "inverse_mapping_": eye.T.clone()}
