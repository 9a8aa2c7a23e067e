"""Reference-free merging: align every model to a barycenter of all of them.

All-to-one merging (:class:`~skmerge.ModelMerger`) expresses every model in
the feature basis of one reference model, so the merged model depends on
which model that is. :class:`ReferenceFreeMerger` defines the common basis by
all models at once, by *alternating alignment* (generalized Procrustes
analysis; the "MergeMany" algorithm of Ainsworth, Hayase and Srinivasa,
"Git Re-Basin", ICLR 2023, with activations instead of weights, and with any
skmerge aligner): each model is aligned in turn to the weighted average of the
*other* models' aligned features, until the mappings stop changing. The
models are then averaged in that common basis; no model keeps its own.

Every target is a linear function of the models' activations, so its
statistics are linear in the pairwise statistics of the models: with
``C_ij`` the cross-covariance of models ``i`` and ``j`` and ``M_j`` the
current mapping of model ``j``, the target of model ``k`` is
``Y = sum_{j != k} a_j (X_j - mu_j) M_j`` (``a`` the averaging weights of the
other models, renormalized) and

.. math::

    \\operatorname{cov}(X_k, Y) = \\sum_{j \\ne k} a_j C_{kj} M_j, \\qquad
    \\operatorname{cov}(Y, Y) = \\sum_{i, j \\ne k} a_i a_j M_i^\\top C_{ij} M_j .

One pass over the data accumulates all ``C_ij`` (:class:`JointCovariance`);
the iterations need no further forward pass. Each target is rescaled to the
other models' average total variance (averaging shrinks it), and an aligner
other than a permutation starts from the permutation barycenter, whose basis
carries little of the reference; see :class:`ReferenceFreeMerger`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import clone
from tqdm.auto import tqdm

from ._memory import available_bytes
from ._validation import check_nonnegative_real, check_positive_int
from .aligners import CCAAligner, PermutationAligner
from .graph import Space
from .graph._walk import DEFAULT_TAPS
from ._blocks import BlockAligner as _BlockAligner, match_heads
from .merge import ModelMerger
from ._space_aligners import aligner_for, check_space_aligners
from .stats import CrossCovariance, _MultiViewAccumulator

__all__ = ["ReferenceFreeMerger", "JointCovariance"]


# --------------------------------------------------------------------------
# Statistics of all pairs of views
# --------------------------------------------------------------------------
class JointCovariance(_MultiViewAccumulator):
    """Streaming means and cross-covariances of every pair of ``n_views`` views.

    The joint second moments of all views, kept as the ``n_views * (n_views + 1) / 2``
    blocks ``(i, j)`` with ``i <= j`` (the others are their transposes), with
    the same float64 streaming update (Chan, Golub and LeVeque), merging,
    device moves and pickling as :class:`~skmerge.stats.ReferenceCovariance`.

    Memory is ``n_views * (n_views + 1) / 2`` matrices of ``d * d`` float64
    values for views of ``d`` features, i.e. ``O(n_views^2 d^2)``, against the
    ``2 n_views - 1`` matrices (``O(n_views d^2)``) of the star-shaped
    :class:`~skmerge.stats.ReferenceCovariance`: 10 views of 512 features
    take 55 * 2 MiB = 110 MiB per feature space, 20 views 420 MiB. Each batch
    costs as many matrix products as there are blocks.

    Parameters
    ----------
    n_views : int
        Number of views (models). At least 1.
    reference : int, default=0
        The view that :meth:`pair` compares against by default (the
        diagnostics of :mod:`skmerge.diagnostics` show raw correlations
        against it); it plays no other role.
    precision : {"double", "single"}, default="double"
        Precision of each batch's centering and products (see
        :class:`~skmerge.stats.CrossCovariance`); the means and the
        accumulation across batches are float64 in both cases.

    Attributes
    ----------
    n_samples_ : int
        Total number of samples seen.
    means_ : list of torch.Tensor
        Per-view means, float64 (``None`` before the first update).
    n_features_ : list of int
        Feature count of every view (``None`` before the first update).

    See Also
    --------
    skmerge.stats.ReferenceCovariance : Every view against one reference only.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.reference_free import JointCovariance
    >>> rng = np.random.default_rng(0)
    >>> views = [rng.normal(size=(50, d)) for d in (4, 3, 5)]
    >>> stats = JointCovariance(n_views=3).update(views)
    >>> joint = np.cov(np.concatenate(views, axis=1).T)
    >>> np.allclose(stats.covariance(1, 2).numpy(), joint[4:7, 7:])
    True
    >>> tuple(stats.pair(2, 1).covariance_xy().shape)     # view 2 (X) against view 1 (Y)
    (5, 3)
    """

    def _kept_pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple((i, j) for i in range(self.n_views) for j in range(i, self.n_views))

    def __repr__(self) -> str:
        if self._means is None:
            return f"JointCovariance(n_views={self.n_views}, empty)"
        return (
            f"JointCovariance(n_views={self.n_views}, n_samples={self.n_samples_}, "
            f"n_features={self.n_features_}, device={self.device})"
        )

    def merge(self, other: "JointCovariance") -> "JointCovariance":
        """Combine with statistics of other samples; returns a new object.

        Parameters
        ----------
        other : JointCovariance
            Same ``n_views``, other samples.

        Returns
        -------
        merged : JointCovariance
        """
        if isinstance(other, JointCovariance) and other.n_views != self.n_views:
            raise ValueError(
                "Cannot merge JointCovariance objects with different n_views: "
                f"{self.n_views} and {other.n_views}."
            )
        return self._merged(other)

    def comoment(self, i: int, j: int) -> torch.Tensor:
        """Sum of centered products of view ``i`` with view ``j``, shape (d_i, d_j), float64.

        A stored tensor or the transpose of one (a view, no copy); do not
        modify it in place.
        """
        i, j = self._view_index(i), self._view_index(j)
        self._check_fitted()
        return self._moments[i, j] if i <= j else self._moments[j, i].T

    def covariance(self, i: int, j: int | None = None, ddof: int = 1) -> torch.Tensor:
        """Covariance of view ``i`` with view ``j`` (with itself when None), float64.

        Parameters
        ----------
        i, j : int
            View indices.
        ddof : int, default=1
            The divisor is ``n_samples_ - ddof``.

        Returns
        -------
        cov : torch.Tensor of shape (d_i, d_j)
        """
        i = self._view_index(i)
        j = i if j is None else self._view_index(j)
        return self._covariance(i, j, ddof)

    def pair(self, i: int, j: int | None = None) -> CrossCovariance:
        """Statistics of view ``i`` (as ``X``) against view ``j`` (as ``Y``).

        Parameters
        ----------
        i : int
            The view to align.
        j : int, optional
            The target view; ``reference`` when None.

        Returns
        -------
        stats : CrossCovariance
            Shares the tensors (no copy); a snapshot that later updates of
            ``self`` do not change.
        """
        i = self._view_index(i)
        j = self.reference if j is None else self._view_index(j)
        self._check_fitted()
        cross = CrossCovariance(precision=self.precision)
        cross.n_samples_ = self.n_samples_
        cross._means = [self._means[i], self._means[j]]
        cross._moments = {(0, 0): self.comoment(i, i), (1, 1): self.comoment(j, j),
                          (0, 1): self.comoment(i, j)}
        return cross


def _joint_bytes(n_models: int, dims: Sequence[int]) -> int:
    """Bytes of the float64 :class:`JointCovariance` of spaces of widths ``dims``."""
    blocks = n_models * (n_models + 1) // 2
    return int(sum(8 * (blocks * d * d + n_models * d) for d in dims))


def _solve_bytes(n_models: int, dims: Sequence[int]) -> int:
    """Bytes of float64 ``d x d`` matrices that the sweeps need on top of the statistics.

    Kept for every space: each model's fitted mapping and inverse (2 n).
    While one space is solved: the current mappings and the running sums of
    :class:`_LeaveOneOutTargets` (2 n), the start's aligners (2 n), and the
    target's and the aligner's temporaries (covariances, shrinkage, square
    roots, SVD factors and products: 24 at most, for CCA).
    """
    if not dims:
        return 0
    kept = sum(8 * 2 * n_models * d * d for d in dims)
    working = max(8 * (4 * n_models + 24) * d * d for d in dims)
    return kept + working


def _check_memory(n_models: int, dims: Sequence[int], device: torch.device) -> None:
    """Refuse, before any forward pass, statistics and a solve that cannot fit on ``device``."""
    statistics, solve = _joint_bytes(n_models, dims), _solve_bytes(n_models, dims)
    available = available_bytes(device)
    if available is not None and statistics + solve > available:
        raise MemoryError(
            f"ReferenceFreeMerger keeps the cross-covariances of all pairs of its {n_models} models: "
            f"{n_models * (n_models + 1) // 2} float64 matrices of d x d per feature space "
            f"(widths up to {max(dims)}), {statistics / 2**30:.2f} GiB, and its sweeps need "
            f"{solve / 2**30:.2f} GiB more, but only {available / 2**30:.2f} GiB are available "
            f"on {device} (free memory, ulimit -v and cgroup limits). Merge fewer models at once "
            "(e.g. hierarchically), or use ModelMerger, whose statistics grow linearly with the "
            "number of models.")


# --------------------------------------------------------------------------
# Leave-one-out targets
# --------------------------------------------------------------------------
class _LeaveOneOutTargets:
    """Statistics of every model's leave-one-out target in one space, as mappings change.

    The target of model ``k`` is ``Y_k = sum_{j != k} a_j X_j M_j`` with
    ``a_j = v_j / sum_{i != k} v_i``. Keeping ``T_i = sum_j v_j C_ij M_j``
    (``C`` the comoments) up to date costs ``n_models`` products per changed
    mapping, and gives

    * ``cov(X_k, Y_k) = (T_k - v_k C_kk M_k) / s_k``,
    * ``cov(Y_k, Y_k) = (Q - v_k (P + P^T) + v_k^2 M_k^T C_kk M_k) / s_k^2``

    with ``s_k = sum_{i != k} v_i``, ``Q = sum_i v_i M_i^T T_i`` and
    ``P = M_k^T T_k`` (all comoments: sums over samples, not yet divided).
    The target is then multiplied by ``c_k``, with ``c_k^2`` the ratio of
    ``sum_{j != k} a_j tr C_jj`` (the others' average total variance) to
    ``tr cov(Y_k, Y_k)``: the mean of imperfectly agreeing features has less
    variance than each of them, and without this every sweep would shrink the
    mappings further.
    """

    def __init__(self, stats: JointCovariance, mappings: Sequence[torch.Tensor], weights):
        self.stats = stats
        n = stats.n_views
        device = stats.device
        self.weights = [float(w) for w in weights]
        self.C = [[stats.comoment(i, j) for j in range(n)] for i in range(n)]
        self.M = [torch.as_tensor(m, dtype=torch.float64).to(device) for m in mappings]
        self.T = [sum(self.weights[j] * (self.C[i][j] @ self.M[j]) for j in range(n)) for i in range(n)]

    def set_mapping(self, k: int, mapping: torch.Tensor) -> None:
        mapping = torch.as_tensor(mapping, dtype=torch.float64).to(self.M[k].device)
        delta = self.weights[k] * (mapping - self.M[k])
        self.T = [t + self.C[i][k] @ delta for i, t in enumerate(self.T)]
        self.M[k] = mapping

    def target(self, k: int) -> CrossCovariance:
        n, v, C, M, T = len(self.M), self.weights, self.C, self.M, self.T
        s = sum(v[j] for j in range(n) if j != k)
        Q = sum(v[i] * (M[i].T @ T[i]) for i in range(n))
        P = M[k].T @ T[k]
        CM = C[k][k] @ M[k]
        cross = (T[k] - v[k] * CM) / s
        yy = (Q - v[k] * (P + P.T) + (v[k] ** 2) * (M[k].T @ CM)) / (s * s)
        yy = 0.5 * (yy + yy.T)
        means = self.stats._means
        mean_y = sum(v[j] * (means[j] @ M[j]) for j in range(n) if j != k) / s
        # Scale gauge: the target gets the average total variance of the others' features.
        raw = sum(v[j] * torch.trace(C[j][j]) for j in range(n) if j != k) / s
        total = torch.trace(yy)
        if float(total) > 0 and float(raw) > 0:
            c = (raw / total).sqrt()
            cross, yy, mean_y = cross * c, yy * (c * c), mean_y * c
        pair = CrossCovariance(precision=self.stats.precision)
        pair.n_samples_ = self.stats.n_samples_
        pair._means = [means[k], mean_y]
        pair._moments = {(0, 0): C[k][k], (1, 1): yy, (0, 1): cross}
        return pair


def _target_weights(weights: np.ndarray) -> np.ndarray:
    """Weights of the targets: the averaging weights, or uniform when one model holds them all."""
    weights = np.asarray(weights, dtype=float)
    others = weights.sum() - weights
    if np.all(others > 0):
        return weights / weights.sum()
    return np.full(len(weights), 1.0 / len(weights))


def _mapping_of(aligner, device) -> torch.Tensor:
    return torch.as_tensor(aligner.mapping_, dtype=torch.float64).to(device)


def _fitter(template, space: Space, orders):
    """A function ``fit(pair, k)`` fitting a clone of ``template`` for model ``k`` on a CrossCovariance.

    Blockwise when the space has blocks (GroupNorm groups, attention heads);
    ``orders[k]`` is the matching of model ``k``'s heads to the reference's
    (None: blocks stay in place, as GroupNorm groups and the reference's heads do).
    """
    def fit(pair: CrossCovariance, k: int):
        aligner = clone(template)
        if space.block_size != space.dim:
            aligner = _BlockAligner(aligner, space.block_size, orders[k])
        return aligner.fit_from_stats(pair)
    return fit


def _alternate(targets: _LeaveOneOutTargets, fit, max_iter: int, tol: float):
    """Gauss-Seidel sweeps: refit every model to its leave-one-out target in turn.

    Returns ``(aligners, sweeps, converged)``; converged when no mapping
    changed during a sweep by more than ``tol`` times its Frobenius norm.
    """
    device = targets.stats.device
    aligners = [None] * len(targets.M)
    for sweep in range(1, max_iter + 1):
        change = 0.0
        for k in range(len(targets.M)):
            aligners[k] = fit(targets.target(k), k)
            new, old = _mapping_of(aligners[k], device), targets.M[k]
            size = float(torch.linalg.matrix_norm(old))
            change = max(change, float(torch.linalg.matrix_norm(new - old)) / size if size > 0
                         else float(torch.linalg.matrix_norm(new)))
            targets.set_mapping(k, new)
        if change <= tol:
            return aligners, sweep, True
    return aligners, max_iter, False


# --------------------------------------------------------------------------
# The merger
# --------------------------------------------------------------------------
class ReferenceFreeMerger(ModelMerger):
    """Merge many models in a common feature basis defined by all of them.

    All-to-one merging (:class:`~skmerge.ModelMerger`) aligns every model to
    one reference and keeps the reference's basis, so the merged model depends
    on which model is the reference. This merger instead aligns the models to
    a *barycenter* of their features, found by alternating alignment
    (generalized Procrustes analysis; the "MergeMany" algorithm of Git
    Re-Basin, here on activations and with any skmerge aligner; with
    :class:`~skmerge.CCAAligner` it is a multi-view CCA-style merge). Per
    feature space:

    1. start: the all-to-one alignment to ``reference`` (the reference's
       mapping is the identity). With ``init="permutation"`` (the default) and
       an aligner that is not a :class:`~skmerge.PermutationAligner`, this is
       done with permutations and refined to the permutation barycenter
       (step 2 with :class:`~skmerge.PermutationAligner`, until no
       permutation changes) before ``aligner`` takes over;
    2. sweep over the models ``k = 0, 1, ...``: the target of model ``k`` is
       the weighted average of the *other* models' aligned features,
       ``Y = sum_{j != k} a_j (X_j - mu_j) M_j`` (``a``: the averaging weights
       of the others, renormalized), rescaled to the others' average total
       variance; a clone of ``aligner`` fitted on ``(X_k, Y)`` gives model
       ``k``'s new mapping ``M_k``, used at once for the next models
       (Gauss-Seidel);
    3. stop when a sweep changes no mapping by more than ``tol`` (relative
       Frobenius norm), or after ``max_iter`` sweeps.

    Then every model, the reference included, is transformed into the common
    basis and the models are averaged as :class:`~skmerge.ModelMerger` does;
    predict, score, ``merge_with_weights``, ``aligned_state_dicts`` (now in
    the common basis) and persistence are inherited.

    The target statistics are linear in the pairwise statistics of the
    models, so one pass over ``X`` accumulates the cross-covariances of all
    pairs of models per space (:class:`JointCovariance`) and the sweeps need
    no further forward pass.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Two or more models of the same architecture; never modified.
    aligner : estimator, default=CCAAligner()
        Any skmerge aligner (with ``fit_from_stats``); cloned for every fit.
        With :class:`~skmerge.PermutationAligner` every mapping is a
        permutation (applied by indexing). An aligner with
        ``regularization=0`` is refused (see Notes).
    space_aligners : list of (selector, aligner) pairs, optional
        Other aligners for the spaces a selector picks (a name pattern or a
        callable taking the Space), as in :class:`~skmerge.ModelMerger`; the
        same rules apply to them (``regularization=0`` refused).
    reference : int, default=0
        Only the starting point: the model whose basis the first, all-to-one
        alignment uses (the merged model also takes its integer buffers, such
        as ``num_batches_tracked``).
    weights : array-like of shape (n_models,), optional
        Non-negative averaging weights (normalized); uniform by default. The
        targets average the other models with the same weights; when one
        model holds all the weight, the targets use uniform weights.
    combine : {"uniform", "fisher", "regmean"} or instance, default="uniform"
        How the models are combined in the common basis, as in
        :class:`~skmerge.ModelMerger` (:mod:`skmerge.combine`).
    reset_bn : bool, default=True
        Re-estimate the merged model's BatchNorm statistics on ``X``.
    repair : bool, default=False
        Then apply REPAIR (:func:`skmerge.repair.repair_`), as in
        :class:`~skmerge.ModelMerger`, towards the models in the common basis.
    batch_size : int, default=128
        Batch size of the passes over array, tensor and Dataset inputs.
    device : {"auto"} or str or torch.device, default="auto"
        Where the forward passes, statistics and linear algebra run.
    spaces : list of skmerge.graph.Space, optional
        Feature spaces given by hand; found automatically when None.
    taps : {"formed", "consumers", "both", "pre_and_post_activation"}, default="both"
        Where the spaces found automatically are observed (see
        :class:`~skmerge.ModelMerger`).
    self_check : {"auto"} or bool, default="auto"
        Before merging, check that permuting every space at random (whole
        heads of an attention layer included) leaves the reference model's
        outputs on two example inputs unchanged: it catches a wrong space at
        the cost of one weight transform and two forward passes on two
        inputs. ``"auto"`` runs it whenever an input is available, True
        requires one, False skips it.
    precision : {"auto", "single", "double"}, default="auto"
        Precision of the per-batch products of the statistics, as in
        :class:`~skmerge.ModelMerger`; the accumulation is float64.
    verbose : bool, default=False
        Show progress bars.
    max_iter : int, default=10
        Largest number of sweeps over the models, per space, with
        ``aligner`` (the permutation start of ``init="permutation"`` may take
        as many again).
    tol : float, default=1e-6
        A space has converged when no mapping changed during a sweep by more
        than ``tol`` times its Frobenius norm. Permutations converge exactly,
        in a few sweeps; continuous aligners (CCA, Procrustes) converge
        linearly and usually use all ``max_iter`` sweeps (``converged_`` says
        so; no warning is given).
    init : {"permutation", "reference"}, default="permutation"
        Start of a non-permutation aligner: the permutation barycenter
        (``"permutation"``), or the all-to-one alignment to ``reference``
        with ``aligner`` itself (``"reference"``). The common basis of a
        continuous aligner is only defined up to a transform shared by all
        models, which the sweeps inherit from their start; a permutation
        barycenter is itself (nearly) reference-independent, so the default
        carries much less of the reference into the result. Irrelevant for
        :class:`~skmerge.PermutationAligner`.

    Attributes
    ----------
    merged_model_ : torch.nn.Module
        The merged network, in evaluation mode on ``device_``.
    spaces_ : list of skmerge.graph.Space
        The feature spaces that were aligned.
    aligners_ : list of list
        ``aligners_[i][k]``: the aligner fitted for space ``i`` and model
        ``k``, for *every* model (the reference included); ``None`` only in
        a space that is never observed (every model keeps its basis there).
    statistics_ : list of JointCovariance
        Per space, the means and cross-covariances of all pairs of models
        (``pair(k)`` compares model ``k`` with ``reference``, which keeps
        :func:`skmerge.diagnostics.correlation_matrix` working).
    n_iter_ : int
        Sweeps run with ``aligner`` (the largest number over the spaces).
    converged_ : bool
        Whether every space converged within ``max_iter`` sweeps.
    weights_ : numpy.ndarray of shape (n_models,)
        The normalized averaging weights.
    classes_ : numpy.ndarray
        ``arange(n_outputs)``.
    n_samples_seen_ : int
        Number of alignment inputs.
    n_features_in_ : int
        Number of input features, set when ``X`` is a 2-D array or tensor.
    device_ : torch.device
        Device used.
    timings_ : dict
        Seconds spent in ``"statistics"``, ``"solve"`` (all the sweeps),
        ``"transform"``, ``"reset_bn"`` and ``"total"``.

    Notes
    -----
    Memory: the statistics of all pairs take ``n_models * (n_models + 1) / 2``
    float64 matrices of ``d x d`` per space of width ``d``, i.e.
    ``O(n_models^2 d^2)`` (:class:`JointCovariance`), where
    :class:`~skmerge.ModelMerger` keeps ``2 n_models - 1``, ``O(n_models
    d^2)``; each batch costs as many matrix products. ``fit`` estimates this
    size first, with the working memory of the sweeps, and raises a
    ``MemoryError`` that says so when it exceeds the memory available on
    ``device`` (on the CPU the least of the free memory, ``ulimit -v`` and the
    process's cgroup limit). A sweep costs about ``2 n_models + 3``
    products of ``d x d`` matrices and one fit of the aligner per model.

    Scale: the average of several models' aligned features has less variance
    than each of them (their disagreements cancel), so every target is
    rescaled to the others' average total variance; without this, each sweep
    would shrink all mappings a little more. A positive factor shared by all
    features changes neither a permutation nor, through a ReLU, the merged
    function.

    Regularization: CCA without shrinkage maps a model onto the full
    covariance of its target, whatever part of it the model can actually
    predict, so the directions in which the models disagree lose variance at
    every sweep relative to the shared ones and the mappings collapse onto
    the shared subspace; shrinkage (``regularization > 0``) bounds this, and
    ``regularization=0`` is refused with a ``ValueError``.

    Under ``torch.distributed`` the statistics are all-reduced like
    :class:`~skmerge.ModelMerger`'s before the sweeps, which every rank then
    runs identically.

    Examples
    --------
    >>> import torch
    >>> from skmerge import PermutationAligner
    >>> from skmerge.graph import permute_model
    >>> from skmerge.reference_free import ReferenceFreeMerger
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                             torch.nn.Linear(16, 3))
    >>> x = torch.randn(256, 4)
    >>> copies = [model] + [permute_model(model, x[:2], seed=s)[0] for s in (1, 2)]
    >>> merger = ReferenceFreeMerger(copies, PermutationAligner(), device="cpu").fit(x)
    >>> torch.allclose(merger.merged_model_(x), model(x), atol=1e-6)
    True
    >>> merger.n_iter_, merger.converged_
    (1, True)
    """

    def __init__(
        self,
        models,
        aligner=CCAAligner(),
        space_aligners=None,
        reference: int = 0,
        weights=None,
        combine="uniform",
        reset_bn: bool = True,
        repair: bool = False,
        batch_size: int = 128,
        device="auto",
        spaces=None,
        taps: str = DEFAULT_TAPS,
        self_check: bool | str = "auto",
        precision: str = "auto",
        verbose: bool = False,
        max_iter: int = 10,
        tol: float = 1e-6,
        init: str = "permutation",
    ):
        super().__init__(
            models, aligner=aligner, space_aligners=space_aligners, reference=reference,
            weights=weights, combine=combine,
            reset_bn=reset_bn, repair=repair, batch_size=batch_size, device=device, spaces=spaces,
            taps=taps, self_check=self_check, precision=precision, verbose=verbose,
        )
        self.max_iter = max_iter
        self.tol = tol
        self.init = init

    def fit(self, X, y=None):
        """Align the models to their barycenter on ``X`` and build ``merged_model_``.

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
            Alignment inputs (first axis = samples), or a dataset/loader of
            ``x`` or ``(x, y)`` batches. Passed through every model once.
        y : ignored

        Returns
        -------
        self : ReferenceFreeMerger
        """
        return self._fit(X)

    def _check_method_params(self) -> None:
        super()._check_method_params()
        check_positive_int(self.max_iter, "max_iter")
        check_nonnegative_real(self.tol, "tol")
        if self.init not in ("permutation", "reference"):
            raise ValueError(f"init must be 'permutation' or 'reference', got {self.init!r}.")
        aligners = [self.aligner] + [a for _, a in check_space_aligners(self.space_aligners)]
        if any(_unregularized(aligner) for aligner in aligners):
            raise ValueError(
                "ReferenceFreeMerger needs a regularized aligner, got regularization=0: without "
                "shrinkage, alternating CCA collapses onto the few directions that all models "
                "share (the averaged targets lose variance in every other direction, sweep after "
                "sweep) and the merged model breaks down. Use regularization > 0 (the default 0.3) "
                'or "auto".')

    def _fit_aligners(self, models, reference, batches, dtype, runner, stream=None) -> list[list]:
        tick = time.perf_counter()
        self.statistics_, self.n_samples_seen_ = self._accumulate_joint(
            models, reference, batches, self.spaces_, dtype, runner, stream)
        self.timings_["statistics"] = time.perf_counter() - tick
        return self._resolve(len(models), reference)

    def _resolve(self, n_models: int, reference: int) -> list[list]:
        tick = time.perf_counter()
        weights = _target_weights(self.weights_)
        aligners, n_iter, converged = [], 0, True
        # The targets live in the reference's basis: the heads matched against the
        # reference hold through every sweep.
        orders = match_heads(self.spaces_, lambda i, k: self.statistics_[i].pair(k, reference),
                             n_models, reference)
        progress = tqdm(total=len(self.spaces_), desc="Barycenter",
                        disable=not self._show_progress(), leave=False)
        for space, stats in zip(self.spaces_, self.statistics_):
            order = [orders.get((space.block_family, k)) for k in range(n_models)]
            row, sweeps, done = self._solve_space(space, stats, reference, weights, order)
            aligners.append(row)
            n_iter, converged = max(n_iter, sweeps), converged and done
            progress.update()
        progress.close()
        self.n_iter_, self.converged_ = n_iter, converged
        self.timings_["solve"] = time.perf_counter() - tick
        return aligners

    def _solve_space(self, space: Space, stats: JointCovariance, reference: int, weights, orders):
        """Alternating alignment of one space: ``(aligners, sweeps, converged)``."""
        n_models = stats.n_views
        if not space.taps:
            warnings.warn(f"Space {space.name!r} is never observed; it keeps each model's basis.",
                          stacklevel=4)
            return [None] * n_models, 0, True
        chosen = aligner_for(space, self.space_aligners, self.aligner)
        fit = _fitter(self._small_sample_safe(clone(chosen), space, stats.n_samples_), space, orders)
        start = fit
        if self.init == "permutation" and not isinstance(chosen, PermutationAligner):
            start = _fitter(PermutationAligner(), space, orders)
        device = stats.device
        first = [None if k == reference else start(stats.pair(k, reference), k) for k in range(n_models)]
        identity = torch.eye(space.dim, dtype=torch.float64, device=device)
        targets = _LeaveOneOutTargets(
            stats, [identity if a is None else _mapping_of(a, device) for a in first], weights)
        if start is not fit:
            # The permutation barycenter (until no permutation changes), then the aligner.
            _alternate(targets, start, self.max_iter, 0.0)
        return _alternate(targets, fit, self.max_iter, self.tol)

    @torch.no_grad()
    def _accumulate_joint(self, models, reference, batches, spaces, dtype, runner, stream=None):
        """One pass over the data, accumulating the statistics of all pairs of models per space."""
        _check_memory(len(models), [space.dim for space in spaces if space.taps], self.device_)
        return self._accumulate(models, reference, batches, spaces, dtype, runner,
                                statistics_type=JointCovariance, stream=stream)


def _unregularized(aligner) -> bool:
    params = aligner.get_params(deep=False) if hasattr(aligner, "get_params") else {}
    return params.get("regularization", None) == 0
