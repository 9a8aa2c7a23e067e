"""The CCA of the CCA Merge reference code, as a formula, inside skmerge's pipeline.

The reference implementation (Horoi et al.'s align-n-merge) regularizes both
covariances with an absolute ridge, ``S + gamma I``, one ``gamma`` for every
layer, picked from the decades ``1e-6 ... 1e7`` on held-out data. skmerge's
:class:`~skmerge.CCAAligner` shrinks instead (``(1 - r) S + r (tr S / d) I``,
scale-free). This aligner is the ridge form with the same mapping
``S_xx^-1/2 U Vt S_yy^1/2``, so the benchmarks can compare the two
regularizations on the same statistics, taps and merge (it is not the
reference code: its hand-written graphs, hooks and merge are not run here).
"""

from __future__ import annotations

import torch

from skmerge.aligners import BaseAligner
from skmerge.aligners._cca import _sqrt_and_inv_sqrt

#: The reference code's search grid of gamma (its ``cca_hparam_search``).
GAMMAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7)


class RidgeCCAAligner(BaseAligner):
    """CCA with the absolute ridge ``S + gamma I`` on both covariances (float64).

    Parameters
    ----------
    gamma : float, default=0.1
        The ridge, in the units of the activations' variance (the reference
        code's default is 0.1).
    """

    def __init__(self, gamma: float = 0.1) -> None:
        self.gamma = gamma

    def _check_params(self) -> None:
        if not float(self.gamma) >= 0.0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma!r}.")

    def _solve(self, stats) -> dict:
        gamma = float(self.gamma)

        def ridge(cov: torch.Tensor) -> torch.Tensor:
            return cov + gamma * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)

        root_x, inv_root_x = _sqrt_and_inv_sqrt(ridge(stats.covariance_xx()))
        root_y, inv_root_y = _sqrt_and_inv_sqrt(ridge(stats.covariance_yy()))
        u, _, vh = torch.linalg.svd(inv_root_x @ stats.covariance_xy() @ inv_root_y, full_matrices=False)
        rotation = u @ vh
        return {"mapping_": inv_root_x @ rotation @ root_y,
                "inverse_mapping_": inv_root_y @ rotation.T @ root_x,
                "regularization_": (gamma, gamma)}
