"""Optimal-transport alignment (OT fusion, Singh & Jaggi, NeurIPS 2020)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment, linprog
from scipy.sparse import csr_matrix, identity, kron, vstack
from sklearn.exceptions import ConvergenceWarning

from skmerge._validation import check_nonnegative_real, check_positive_int
from skmerge.aligners._base import BaseAligner, _correlation_scale
from skmerge.stats import CrossCovariance

__all__ = ["OptimalTransportAligner"]


def _check_reg(value: Any) -> float:
    """``reg`` as a float; ``"exact"`` is 0.0."""
    if isinstance(value, str):
        if value == "exact":
            return 0.0
        raise ValueError(f'reg must be a finite float >= 0 or "exact", got {value!r}.')
    try:
        return check_nonnegative_real(value, "reg")
    except ValueError:
        raise ValueError(f'reg must be a finite float >= 0 or "exact", got {value!r}.') from None


def _correlation_cost(stats: CrossCovariance) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson correlations ``(p, q)`` of X's with y's features, and ``1 - corr``.

    A feature that is constant on the data (a dead unit) has correlation 0
    with everything, hence cost 1 (never NaN).
    """
    eps = float(torch.finfo(torch.float64).eps)
    scale_x = _correlation_scale(stats.covariance_xx(ddof=0).diagonal(), stats.mean_x_, eps)
    scale_y = _correlation_scale(stats.covariance_yy(ddof=0).diagonal(), stats.mean_y_, eps)
    correlation = stats.covariance_xy(ddof=0) * scale_x[:, None] * scale_y[None, :]
    correlation = correlation.clamp(-1.0, 1.0)  # rounding can leave |corr| a hair above 1
    return correlation, 1.0 - correlation


def _sinkhorn_log(
    cost: torch.Tensor, epsilon: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, int, float]:
    """Entropic OT with uniform marginals by log-domain Sinkhorn iterations.

    Solves ``min_T <T, C> - epsilon * H(T)`` subject to ``T 1 = 1/p`` and
    ``T^T 1 = 1/q`` by alternating exact updates of the dual potentials
    ``f`` (p,) and ``g`` (q,), kept divided by ``epsilon``::

        f_i = log a_i - logsumexp_j(-C_ij / epsilon + g_j)
        g_j = log b_j - logsumexp_i(-C_ij / epsilon + f_i)
        T_ij = exp(-C_ij / epsilon + f_i + g_j)

    Working with logarithms never forms ``exp(-C / epsilon)``, so a small
    ``epsilon`` cannot underflow to a zero kernel. After each ``g`` update
    the column marginals are exact; the iteration stops when every row
    marginal is within a relative ``tol`` of ``1/p``.

    Returns
    -------
    plan : torch.Tensor of shape (p, q)
    n_iter : int
    error : float
        Final ``max_i |p * (T 1)_i - 1|``.
    """
    p, q = cost.shape
    log_a, log_b = -math.log(p), -math.log(q)
    kernel = cost / -epsilon
    g = torch.zeros(q, dtype=cost.dtype, device=cost.device)
    row_lse = torch.logsumexp(kernel, dim=1)
    error, n_iter = math.inf, 0
    for n_iter in range(1, max_iter + 1):
        f = log_a - row_lse
        g = log_b - torch.logsumexp(kernel + f[:, None], dim=0)
        row_lse = torch.logsumexp(kernel + g[None, :], dim=1)
        # log of the row marginals divided by a: f + row_lse - log_a
        error = float(torch.expm1(f + row_lse - log_a).abs().max())
        if error <= tol:
            break
    return torch.exp(kernel + f[:, None] + g[None, :]), n_iter, error


def _exact_plan(correlation: torch.Tensor, cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact OT plan with uniform marginals; the permutation too when ``p == q``.

    ``p == q``: by Birkhoff's theorem an optimal plan is a permutation matrix
    divided by ``p``, found by ``linear_sum_assignment`` (on the correlations,
    exactly as :class:`~skmerge.aligners.PermutationAligner` does, so both
    agree even on near-ties). ``p != q``: the transportation linear program,
    with integer marginals (rows sum to ``q``, columns to ``p``) so the
    simplex vertex is integral, then divided by ``p * q``.
    """
    p, q = cost.shape
    device = cost.device
    if p == q:
        rows, cols = linear_sum_assignment(correlation.cpu().numpy(), maximize=True)
        permutation = torch.empty(q, dtype=torch.int64, device=device)
        permutation[torch.as_tensor(cols, device=device)] = torch.as_tensor(rows, device=device)
        plan = torch.zeros((p, q), dtype=torch.float64, device=device)
        plan[permutation, torch.arange(q, device=device)] = 1.0  # divided by p by the caller
        return plan, permutation
    # variable T_ij at position i * q + j
    row_sums = kron(identity(p, format="csr"), csr_matrix(np.ones((1, q))))
    col_sums = kron(csr_matrix(np.ones((1, p))), identity(q, format="csr"))
    constraints = vstack([row_sums, col_sums]).tocsr()
    targets = np.concatenate([np.full(p, float(q)), np.full(q, float(p))])
    result = linprog(
        cost.cpu().numpy().ravel(), A_eq=constraints, b_eq=targets, bounds=(0, None),
        method="highs-ds",
    )
    if result.status != 0:  # pragma: no cover - the transportation LP is always feasible
        raise RuntimeError(f"Exact optimal transport failed: {result.message}")
    plan = torch.as_tensor(result.x.reshape(p, q) / (p * q), dtype=torch.float64, device=device)
    return plan.clamp_min(0.0), None


class OptimalTransportAligner(BaseAligner):
    """Soft feature matching by optimal transport (OT fusion, activation-based).

    The activation-based variant of "Model Fusion via Optimal Transport"
    (Singh & Jaggi, NeurIPS 2020): transport the features of ``X`` onto the
    features of ``y`` at minimal total cost, where moving feature ``i`` of
    ``X`` onto feature ``j`` of ``y`` costs ``C_ij = 1 - corr(X_i, y_j)``
    (Pearson correlation over the alignment data, from the streaming
    statistics; a constant feature has correlation 0, cost 1). Both sides
    carry uniform mass (``1/p`` per feature of ``X``, ``1/q`` per feature of
    ``y``). With entropic regularization::

        T = argmin_T <T, C> - epsilon * H(T)   s.t.  T 1 = 1/p,  T^T 1 = 1/q
        epsilon = reg * max(C)

    solved by log-domain Sinkhorn iterations in torch on the statistics'
    device. ``reg=0`` (or ``"exact"``) solves the unregularized problem: for
    ``p == q`` an optimal plan is a permutation (the same one
    :class:`~skmerge.aligners.PermutationAligner` finds), for ``p != q`` the
    transportation linear program is solved with ``scipy.optimize.linprog``.

    The transport plan ``T`` (p, q) becomes the mapping by *barycentric
    projection*, as OT fusion averages matched neurons::

        mapping_[:, j]         = T[:, j] / sum_i T[i, j]    # columns sum to 1
        inverse_mapping_[:, i] = T[i, :] / sum_j T[i, j]    # columns sum to 1

    Each reference feature is a convex combination of ``X``'s features
    (``transform``), and each feature of ``X`` a convex combination of the
    reference's (``inverse_transform``). The mapping is a *soft permutation*:
    as ``reg -> 0`` on a permuted copy (``p == q``) both become the
    permutation matrix and its transpose, and the merge is exact. For
    ``p == q``, ``mapping_`` is doubly stochastic up to the Sinkhorn tolerance
    and ``inverse_mapping_`` is its transpose, which is OT fusion's rule for
    the next layer's incoming weights (Singh & Jaggi use ``T diag(1/beta)``
    for both). For ``p != q`` OT fusion's rule would scale the next layer's
    input by ``q / p``; normalizing the rows of ``T`` instead keeps a feature
    of ``X`` that is split over several reference features (or several
    copies merged into one) at its full weight. Soft maps are not
    invertible: ``mapping_ @ inverse_mapping_`` is an averaging operator
    (non-negative, columns summing to 1), the identity only for a permutation.

    Averaging features that are not perfectly correlated shrinks their
    variance, layer after layer. BatchNorm's statistics, re-estimated after
    the merge, undo that; on a network without BatchNorm, merge with
    ``ModelMerger(..., repair=True)`` (REPAIR renormalizes every merged
    channel), or a soft plan can merge to near chance (the converged
    benchmark of the docs measures both).

    Parameters
    ----------
    reg : float >= 0 or "exact", default=0.05
        Entropic regularization relative to the largest cost (so the same
        value means the same softness whatever the cost range). Larger values
        spread each reference feature over more features of ``X`` and
        converge faster; ``0`` or ``"exact"`` gives the exact (hard, for
        ``p == q``) plan. Tune it on held-out data (``GridSearchCV`` over
        ``aligner__reg`` of a ``ModelMerger``, or ``ModelMerger.refit``): in
        the converged benchmark of the docs two models merge best at 0.1 to
        0.5 and five at 0.05 or less, where softer plans collapse.
    max_iter : int, default=1000
        Maximum number of Sinkhorn iterations (each is two log-sum-exp passes
        over the ``(p, q)`` cost matrix).
    tol : float >= 0, default=1e-4
        Stop when every row marginal of ``T`` is within this relative error
        of ``1/p`` (column marginals are exact after each iteration).

    Attributes
    ----------
    mapping_ : ndarray or torch.Tensor of shape (p, q)
        ``T`` with columns normalized to sum to 1.
    inverse_mapping_ : ndarray or torch.Tensor of shape (q, p)
        ``T.T`` with columns normalized to sum to 1 (rows of ``T`` normalized).
    transport_plan_ : ndarray or torch.Tensor of shape (p, q)
        The transport plan ``T`` (non-negative, sums to 1).
    permutation_ : ndarray or torch.Tensor of shape (q,), int64, or None
        With ``reg=0`` and ``p == q``: ``transform(X)[:, j] ==
        X[:, permutation_[j]]`` (the merger then applies it by indexing).
        ``None`` otherwise.
    epsilon_ : float
        Absolute entropic regularization ``reg * max(C)`` (0 when exact).
    n_iter_ : int
        Sinkhorn iterations run (1 for the exact, non-iterative solver).
    n_features_in_ : int
        Number of features ``p`` of ``X``.
    feature_names_in_ : ndarray of shape (p,)
        Defined only when ``X`` has string feature names.
    stats_ : CrossCovariance
        The statistics the aligner was fitted from.

    Warns
    -----
    sklearn.exceptions.ConvergenceWarning
        When Sinkhorn stops at ``max_iter`` with a row-marginal error above
        ``tol``. The result is still usable (its columns are exact); increase
        ``max_iter`` or ``reg`` to silence it.

    See Also
    --------
    PermutationAligner : The hard one-to-one matching (``reg=0``, ``p == q``).
    CCAAligner : Align subspaces instead of transporting single features.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.aligners import OptimalTransportAligner
    >>> rng = np.random.default_rng(0)
    >>> y = rng.normal(size=(200, 4))
    >>> X = y[:, [2, 0, 3, 1]] + 0.1 * rng.normal(size=(200, 4))
    >>> ot = OptimalTransportAligner(reg=0.01).fit(X, y)
    >>> ot.mapping_.round(3) + 0.0
    array([[0., 0., 1., 0.],
           [1., 0., 0., 0.],
           [0., 0., 0., 1.],
           [0., 1., 0., 0.]])
    >>> round(float(ot.transport_plan_.sum()), 12), ot.n_iter_ > 0
    (1.0, True)
    """

    def __init__(self, reg: float | str = 0.05, max_iter: int = 1000, tol: float = 1e-4) -> None:
        self.reg = reg
        self.max_iter = max_iter
        self.tol = tol

    def _check_params(self) -> None:
        _check_reg(self.reg)
        check_positive_int(self.max_iter, "max_iter")
        check_nonnegative_real(self.tol, "tol")

    def _solve(self, stats: CrossCovariance) -> dict[str, Any]:
        reg = _check_reg(self.reg)
        correlation, cost = _correlation_cost(stats)
        # n_iter_ is 1 for the exact solver (one direct solve; scikit-learn's
        # convention for estimators with max_iter is n_iter_ >= 1).
        permutation, n_iter, epsilon = None, 1, 0.0
        if reg == 0.0:
            plan, permutation = _exact_plan(correlation, cost)
            if permutation is not None:
                mapping = plan  # the 0/1 permutation matrix, exactly
                plan = mapping / mapping.shape[0]
        else:
            cost_scale = float(cost.max())
            epsilon = reg * (cost_scale if cost_scale > 0 else 1.0)
            max_iter = check_positive_int(self.max_iter, "max_iter")
            tol = check_nonnegative_real(self.tol, "tol")
            plan, n_iter, error = _sinkhorn_log(cost, epsilon, max_iter, tol)
            if error > tol:
                warnings.warn(
                    f"OptimalTransportAligner: Sinkhorn did not converge in max_iter={max_iter} "
                    f"iterations (row-marginal error {error:.2e} > tol={tol:g}). Increase "
                    "max_iter or reg, or use reg=0 for the exact plan.",
                    ConvergenceWarning,
                    stacklevel=4,
                )
        tiny = torch.finfo(torch.float64).tiny
        if permutation is not None:
            inverse = mapping.T.clone()
        else:
            mapping = plan / plan.sum(dim=0, keepdim=True).clamp_min(tiny)
            inverse = (plan / plan.sum(dim=1, keepdim=True).clamp_min(tiny)).T.contiguous()
        return {
            "mapping_": mapping,
            "inverse_mapping_": inverse,
            "transport_plan_": plan,
            "permutation_": permutation,
            "epsilon_": float(epsilon),
            "n_iter_": int(n_iter),
        }
