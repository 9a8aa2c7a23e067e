"""CCA alignment (CCA Merge, Horoi et al., ICML 2024)."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import numpy as np
import torch

from skmerge._linalg import svd, triangular_multiply, triangular_solve
from skmerge.aligners._base import BaseAligner, SmallSampleWarning, _to_numpy, check_regularization
from skmerge.stats import CrossCovariance

__all__ = ["CCAAligner"]


def _shrink(cov: torch.Tensor, r: float) -> torch.Tensor:
    """Scale-free shrinkage ``(1 - r) S + r (tr S / d) I``."""
    if r == 0.0:
        return cov
    d = cov.shape[0]
    target = torch.trace(cov) / d
    return (1.0 - r) * cov + (r * target) * torch.eye(d, dtype=cov.dtype, device=cov.device)


def _oas_shrinkage(cov: torch.Tensor, n_samples: int) -> float:
    """Oracle Approximating Shrinkage intensity (Chen et al. 2010).

    Same formula as ``sklearn.covariance.OAS``, computed from the covariance
    alone (the intensity is invariant to its scale, so ``ddof`` does not
    matter), which is what streaming statistics allow; Ledoit-Wolf would need
    fourth moments of the raw samples.
    """
    d = cov.shape[0]
    if d == 1:
        return 0.0  # one feature: shrinking towards its own variance is a no-op
    mu = float(torch.trace(cov)) / d
    alpha = float((cov * cov).mean())
    numerator = alpha + mu * mu
    denominator = (n_samples + 1) * (alpha - mu * mu / d)
    return 1.0 if denominator <= 0 else min(numerator / denominator, 1.0)


def _sqrt_and_inv_sqrt(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``S^1/2`` and the pseudo-inverse ``S^-1/2`` of a symmetric PSD matrix.

    Eigenvalues below ``d * eps * lambda_max`` (numerical rank, as in
    ``scipy.linalg.pinvh``) count as zero: their inverse square root is 0, not
    a huge number. Zero-variance directions (dead units, n < d) are therefore
    mapped to zero instead of being amplified by ~1e7, and everything stays
    finite.
    """
    evals, evecs = torch.linalg.eigh(cov)
    d = cov.shape[0]
    floor = d * torch.finfo(cov.dtype).eps * evals.max().clamp_min(0.0)
    keep = evals > floor
    safe = torch.where(keep, evals, torch.ones_like(evals))
    root = torch.where(keep, safe.sqrt(), torch.zeros_like(evals))
    inv_root = torch.where(keep, safe.rsqrt(), torch.zeros_like(evals))
    return (evecs * root) @ evecs.T, (evecs * inv_root) @ evecs.T


class _Whitener:
    """A whitening ``W`` (``W^T S W = I``) of a shrunk covariance ``S`` and its inverse ``K = W^-1``.

    CCA's mapping ``W_x U Vt K_y`` does not depend on which whitening is used:
    any other is ``W Q`` with ``Q`` orthogonal, which rotates the singular
    vectors of ``W_x^T S_xy W_y`` by the same ``Q`` and leaves the mapping
    unchanged. Shrinkage ``r`` keeps every eigenvalue above ``r tr(S) / d``;
    when that is far above the numerical-rank floor of
    :func:`_sqrt_and_inv_sqrt` (``d eps lambda_max <= d eps tr(S)``), no
    direction would be dropped and a Cholesky factor ``S = L L^T`` gives the
    same mapping (``W = L^-T``, ``K = L^T``), applied with triangular solves,
    never inverted. Otherwise (``r`` zero or tiny, a zero matrix) the symmetric
    pseudo-inverse square root handles rank deficiency.
    """

    def __init__(self, cov: torch.Tensor, r: float, dtype: torch.dtype = torch.float64):
        d = cov.shape[0]
        self.factor = None
        if r > 1e3 * d * d * torch.finfo(torch.float64).eps and float(torch.trace(cov)) > 0:
            factor, info = torch.linalg.cholesky_ex(_shrink(cov.to(dtype), r))
            if int(info) == 0:
                self.factor = factor
                return
        root, inv_root = _sqrt_and_inv_sqrt(_shrink(cov, r))
        self.root, self.inv_root = root.to(dtype), inv_root.to(dtype)

    @property
    def cholesky(self) -> bool:
        return self.factor is not None

    def left(self, a: torch.Tensor) -> torch.Tensor:
        """``W^T a``."""
        if self.cholesky:
            return triangular_solve(self.factor, a)
        return self.inv_root @ a

    def right(self, a: torch.Tensor) -> torch.Tensor:
        """``a W``."""
        if self.cholesky:
            return triangular_solve(self.factor, a, left=False, transpose=True)
        return a @ self.inv_root

    def times(self, a: torch.Tensor) -> torch.Tensor:
        """``W a``."""
        if self.cholesky:
            return triangular_solve(self.factor, a, transpose=True)
        return self.inv_root @ a

    def inverse_right(self, a: torch.Tensor) -> torch.Tensor:
        """``a K``."""
        if self.cholesky:
            return triangular_multiply(self.factor, a, left=False, transpose=True)
        return a @ self.root


def _whitening(cov: torch.Tensor, r: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, W)`` as dense matrices (for tests and small spaces; the solve uses :class:`_Whitener`)."""
    w = _Whitener(cov, r)
    d = cov.shape[0]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    if w.cholesky:
        return w.factor.T, w.times(eye)
    return w.root, w.inv_root


# The merger fits one aligner per model against the same reference statistics
# (ReferenceCovariance.pair shares the reference's comoment tensor), so the
# reference's whitening is computed once per space instead of once per model.
# Keyed by the identity of that comoment tensor (statistics only ever rebind new
# tensors, never update one in place); an entry dies with its tensor.
_REFERENCE_ROOTS: dict[int, tuple[weakref.ref, dict]] = {}


def _reference_roots(stats: CrossCovariance, s_yy, r_y: float, dtype=torch.float64):
    """The reference's whitening; ``s_yy`` (or a function giving it) is only used on a miss."""
    comoment = stats._moments[1, 1]
    key = id(comoment)
    entry = _REFERENCE_ROOTS.get(key)
    if entry is None or entry[0]() is not comoment:
        entry = (weakref.ref(comoment, lambda _, key=key: _REFERENCE_ROOTS.pop(key, None)), {})
        _REFERENCE_ROOTS[key] = entry
    roots = entry[1]
    setting = (stats.n_samples_, float(r_y), dtype)
    if setting not in roots:
        roots[setting] = _Whitener(s_yy() if callable(s_yy) else s_yy, r_y, dtype)
    return roots[setting]


#: spaces at least this wide are solved in float32 on CPUs by ``solver="auto"``
SINGLE_PRECISION_WIDTH = 1024


def _solve_dtype(solver: str, p: int, q: int, r_x: float, r_y: float, device: torch.device) -> torch.dtype:
    if solver == "double":
        return torch.float64
    if solver == "single":
        return torch.float32
    # auto: float32 halves the SVD and the products of wide, well-conditioned
    # (shrunk) spaces on CPUs, within 1e-5 of the float64 mapping (benchmarked)
    wide = max(p, q) >= SINGLE_PRECISION_WIDTH
    conditioned = min(r_x, r_y) >= 1e-2
    return torch.float32 if wide and conditioned and device.type == "cpu" else torch.float64


class CCAAligner(BaseAligner):
    """Align ``X``'s features to ``y``'s with canonical correlation analysis.

    The mapping of CCA Merge (Horoi et al., "Harmony in Diversity: Merging
    Neural Networks with Canonical Correlation Analysis", ICML 2024): find the
    directions of maximal correlation between the two feature spaces and map
    ``X``'s onto ``y``'s. With centered covariances ``S_xx``, ``S_yy``,
    ``S_xy``, shrunk as ``S <- (1 - r) S + r (tr S / d) I`` on both sides::

        U, s, Vt = svd(S_xx^-1/2 S_xy S_yy^-1/2)
        mapping_         = S_xx^-1/2 U Vt S_yy^1/2      # (p, q)
        inverse_mapping_ = S_yy^-1/2 V Ut S_xx^1/2      # (q, p)

    ``r = 0`` is plain CCA; it recovers ``A`` exactly when ``y = X A`` with
    ``A`` invertible. ``r = 1`` is the orthogonal Procrustes rotation ``U Vt``
    of ``S_xy`` scaled by ``sqrt((tr S_yy / q) / (tr S_xx / p))`` (the ratio of
    mean variances; ``sqrt(tr S_yy / tr S_xx)`` when ``p == q``). Inverse
    square roots are pseudo-inverses, so rank-deficient covariances (dead
    units, fewer samples than features) give finite mappings.

    Parameters
    ----------
    regularization : float in [0, 1] or "auto", default=0.3
        Shrinkage ``r`` of both covariances towards a multiple of the
        identity. Scale-free: the same value means the same amount of
        shrinkage whatever the activations' magnitude. ``"auto"`` picks one
        intensity per side with the Oracle Approximating Shrinkage formula
        (Chen et al. 2010), computed from the streaming statistics. Tune it
        with ``GridSearchCV`` (the ``score`` method is a held-out measure).
    solver : {"auto", "double", "single"}, default="auto"
        Precision of the solve (whitening, SVD, products). ``"auto"`` solves
        spaces of at least 1024 features in float32 on CPUs when both sides
        are shrunk (``regularization >= 0.01``): about half the time of
        float64, with mappings within 1e-5 (relative) of the float64 ones when
        the canonical correlations are not tiny — float32 resolves them down
        to about 1e-4 of the largest and maps weaker directions to zero, as it
        maps uncorrelated directions to zero in float64. Everything else is
        solved in float64; ``mapping_`` and ``inverse_mapping_`` are in the
        precision of the solve. On CPUs the SVD, triangular solves and
        triangular products come from SciPy's LAPACK and BLAS (faster there
        than ``torch.linalg``), run with ``torch.get_num_threads()`` threads;
        on other devices from ``torch.linalg``.

    Attributes
    ----------
    mapping_ : ndarray or torch.Tensor of shape (p, q)
        ``transform(X) == X @ mapping_``.
    inverse_mapping_ : ndarray or torch.Tensor of shape (q, p)
        ``inverse_transform(Z) == Z @ inverse_mapping_``; the inverse of
        ``mapping_`` when ``p == q`` and both covariances have full rank,
        otherwise the rank-``min(p, q)`` pseudo-inverse ``P_y P_x^+``.
    canonical_correlations_ : ndarray or torch.Tensor of shape (min(p, q),)
        Correlation on the fitted data of each pair of canonical variates,
        ``corr(X P_x[:, k], y P_y[:, k])`` with ``P_x = S_xx^-1/2 U`` and
        ``P_y = S_yy^-1/2 V`` (shrunk covariances), computed from the
        statistics, in [0, 1]. Without regularization these are the singular
        values ``s``, descending. With regularization they are in the order
        of the regularized directions (decreasing ``s``), not necessarily
        descending; ``s`` itself then measures the shrunk problem and can
        exceed 1.
    regularization_ : tuple of float
        Shrinkage actually used on the ``X`` side and on the ``y`` side.
    n_features_in_ : int
        Number of features ``p`` of ``X``.
    feature_names_in_ : ndarray of shape (p,)
        Defined only when ``X`` has string feature names.
    stats_ : CrossCovariance
        The statistics the aligner was fitted from.

    Warns
    -----
    SmallSampleWarning
        When ``regularization=0`` and ``n_samples < 2 * max(p, q)``.

    See Also
    --------
    PermutationAligner : One-to-one feature matching.
    skmerge.stats.CrossCovariance : Streaming statistics for ``fit_from_stats``.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.aligners import CCAAligner
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(200, 3))
    >>> A = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 3.0]])
    >>> aligner = CCAAligner(regularization=0).fit(X, X @ A)
    >>> np.allclose(aligner.mapping_, A)
    True
    >>> np.round(aligner.canonical_correlations_, 6)
    array([1., 1., 1.])
    """

    def __init__(self, regularization: float | str = 0.3, solver: str = "auto") -> None:
        self.regularization = regularization
        self.solver = solver

    def _check_params(self) -> None:
        check_regularization(self.regularization)
        if getattr(self, "solver", "auto") not in ("auto", "double", "single"):
            raise ValueError(f'solver must be "auto", "double" or "single", got {self.solver!r}.')

    def _solve(self, stats: CrossCovariance) -> dict[str, Any]:
        regularization = check_regularization(self.regularization)
        n, p, q = stats.n_samples_, stats.n_features_x, stats.n_features_y
        if regularization == "auto":
            r_x, r_y = _oas_shrinkage(stats.covariance_xx(), n), _oas_shrinkage(stats.covariance_yy(), n)
        else:
            r_x = r_y = regularization
            if regularization == 0.0 and n < 2 * max(p, q):
                warnings.warn(
                    f"CCAAligner fitted on n_samples={n} for {p} and {q} features with "
                    "regularization=0: the covariances are (nearly) singular and the "
                    'mapping overfits. Use regularization="auto" or a value in (0, 1], '
                    "or more alignment data.",
                    SmallSampleWarning,
                    stacklevel=4,
                )
        dtype = _solve_dtype(getattr(self, "solver", "auto"), p, q, r_x, r_y, stats.device)
        # the covariances only in the solve's precision: no float64 copy of a wide space
        wx = _Whitener(stats.covariance_xx(dtype=dtype), r_x, dtype)
        wy = _reference_roots(stats, lambda: stats.covariance_yy(dtype=dtype), r_y, dtype)
        u, s, vh = svd(wy.right(wx.left(stats.covariance_xy(dtype=dtype))))
        # Polar factor over the canonical directions that carry correlation.
        # Directions with (numerically) zero correlation, e.g. units that are
        # dead on the data, have arbitrary singular vectors: mixing them would
        # turn dead units into live ones, so they are mapped to zero instead.
        tolerance = max(p, q) * torch.finfo(s.dtype).eps * (s.max() if s.numel() else 0.0)
        keep = s > tolerance
        rotation = u @ vh if bool(keep.all()) else u[:, keep] @ vh[keep]
        del u, vh
        self._canonical = None  # computed when asked for (it costs two more triangular solves)
        mapping = wx.times(wy.inverse_right(rotation))
        return {  # in the solve's precision: float32 maps of wide spaces take half the memory
            "mapping_": mapping,
            "inverse_mapping_": wy.times(wx.inverse_right(rotation.T)),
            "regularization_": (float(r_x), float(r_y)),
        }

    @property
    def canonical_correlations_(self):
        """``corr(X P_x[:, k], y P_y[:, k])`` on the fitted data (see the class docstring)."""
        if "mapping_" not in self.__dict__:
            raise AttributeError("canonical_correlations_")
        if getattr(self, "_canonical", None) is None:
            self._canonical = self._variates()
        value = self._canonical
        return _to_numpy(value) if isinstance(self.mapping_, np.ndarray) else value

    def _variates(self) -> torch.Tensor:
        stats = self.stats_
        r_x, r_y = self.regularization_
        s_xx, s_yy, s_xy = stats.covariance_xx(), stats.covariance_yy(), stats.covariance_xy()
        wx, wy = _Whitener(s_xx, r_x), _Whitener(s_yy, r_y)
        u, s, vh = svd(wy.right(wx.left(s_xy)))
        return _variate_correlations(wx.times(u), wy.times(vh.T), s, s_xx, s_yy)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if isinstance(state.get("_canonical"), torch.Tensor):
            state["_canonical"] = state["_canonical"].cpu()
        return state


def _variate_correlations(p_x: torch.Tensor, p_y: torch.Tensor, s: torch.Tensor,
                          s_xx: torch.Tensor, s_yy: torch.Tensor) -> torch.Tensor:
    """``corr(X P_x[:, k], y P_y[:, k])`` on the fitted data, from the (unshrunk) covariances.

    The covariance of the two variates is ``s[k]`` (the SVD of the whitened
    cross-covariance); their variances are 1 without shrinkage, so the
    correlations are then the singular values. With shrinkage the singular
    values can exceed 1 and say little; these stay in [0, 1]. A variate of
    zero variance (a dead direction) has correlation 0.
    """
    var_x = ((s_xx @ p_x) * p_x).sum(0)
    var_y = ((s_yy @ p_y) * p_y).sum(0)
    scale = (var_x * var_y).sqrt()
    tiny = torch.finfo(s.dtype).tiny
    correlations = torch.where(scale > tiny, s / scale.clamp_min(tiny), torch.zeros_like(s))
    return correlations.clamp(0.0, 1.0)  # rounding can push a perfect correlation a hair above 1
