"""Weight matching: data-free permutation alignment (Git Re-Basin).

Ainsworth, Hayase and Srinivasa, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023, section 3.2. Each model is permuted,
space by space, so that its parameters are as close as possible to the
reference's (the largest sum of inner products), by coordinate descent over
the feature spaces; the permuted models are then averaged by
:class:`~skmerge.ModelMerger`'s machinery.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from torch import nn
from tqdm.auto import tqdm

from ._validation import check_positive_int
from .graph._apply import gather_slice, permute_space_
from .merge import ModelMerger

__all__ = ["WeightMatchingMerger", "MatchedPermutation", "weight_matching"]


class MatchedPermutation:
    """The permutation of one feature space found by weight matching.

    It plays the role of a fitted aligner in ``WeightMatchingMerger.aligners_``
    and follows the aligners' convention (``transform(X) == X @ mapping_``,
    features of the aligned model expressed in the reference's basis).

    Parameters
    ----------
    permutation : array-like of int of shape (d,)
        New channel ``j`` (reference channel ``j``) is the model's channel
        ``permutation[j]``.

    Attributes
    ----------
    permutation_ : numpy.ndarray of shape (d,), int64
        ``transform(X)[:, j] == X[:, permutation_[j]]``.
    mapping_ : numpy.ndarray of shape (d, d)
        The 0/1 matrix with ``mapping_[permutation_[j], j] == 1``.
    inverse_mapping_ : numpy.ndarray of shape (d, d)
        ``mapping_.T``.
    n_features_in_ : int
        ``d``.
    """

    def __init__(self, permutation):
        self.permutation_ = np.asarray(permutation, dtype=np.int64).copy()
        self.n_features_in_ = len(self.permutation_)

    @property
    def mapping_(self) -> np.ndarray:
        d = self.n_features_in_
        mapping = np.zeros((d, d))
        mapping[self.permutation_, np.arange(d)] = 1.0
        return mapping

    @property
    def inverse_mapping_(self) -> np.ndarray:
        return self.mapping_.T

    def transform(self, X):
        """Express features of the aligned model in the reference's basis: ``X[..., permutation_]``."""
        return X[..., _index_for(X, self.permutation_)]

    def inverse_transform(self, Z):
        """Undo :meth:`transform`."""
        return Z[..., _index_for(Z, np.argsort(self.permutation_))]

    def __repr__(self):
        return f"MatchedPermutation(d={self.n_features_in_})"


def _index_for(data, index: np.ndarray):
    """``index`` as a tensor on ``data``'s device for tensors, as it is for arrays."""
    return torch.as_tensor(index, device=data.device) if isinstance(data, torch.Tensor) else index


def _solve_blocks(similarity: np.ndarray, block_size: int) -> np.ndarray:
    """Best permutation (``perm[i]``: the model channel matched to reference channel ``i``), blockwise."""
    d = similarity.shape[0]
    perm = np.empty(d, dtype=np.int64)
    for start in range(0, d, block_size):
        part = slice(start, start + block_size)
        rows, cols = linear_sum_assignment(similarity[part, part], maximize=True)
        perm[start + rows] = start + cols
    return perm


@torch.no_grad()
def weight_matching(reference_state: dict, state: dict, spaces, max_iter: int = 100,
                    random_state=None, device=None):
    """Permutations that bring ``state``'s parameters closest to ``reference_state``'s.

    Coordinate descent: for each space ``s`` in a random order, with the other
    spaces' current permutations applied to ``state``, the similarity
    ``C[i, j]`` is the sum, over every producer and consumer slice of ``s``,
    of the inner product of the reference's entries for channel ``i`` with
    the model's entries for channel ``j``; the permutation of ``s`` becomes the
    solution of ``linear_sum_assignment(C, maximize=True)`` (blockwise under
    ``block_size``) when it increases the total similarity. A sweep over all
    spaces that changes nothing ends the descent.

    Parameters
    ----------
    reference_state, state : dict of str to torch.Tensor
        ``state_dict`` of the reference and of the model to permute (not
        modified).
    spaces : sequence of Space
    max_iter : int, default=100
        Largest number of sweeps over the spaces.
    random_state : int, RandomState instance or None, default=None
        Order of the spaces in each sweep.
    device : torch.device, optional
        Where the products run (float64); the tensors' own device when None.

    Returns
    -------
    perms : list of numpy.ndarray
        ``perms[i]`` for ``spaces[i]``: new channel ``j`` is the model's
        channel ``perms[i][j]`` (as in :func:`skmerge.graph.apply_transforms`).
    n_iter : int
        Number of sweeps run.
    converged : bool
        Whether the last sweep changed nothing.
    """
    spaces = list(spaces)
    rng = check_random_state(random_state)
    names = {sl.name for space in spaces for sl in space.producers + space.consumers}

    def working(src: dict, name: str) -> torch.Tensor:
        tensor = src[name].detach()
        target = device if device is not None else tensor.device
        if torch.device(target).type == "mps":  # no float64 on MPS
            target = torch.device("cpu")
        return tensor.to(device=target, dtype=torch.float64, copy=True).contiguous()

    ref = {name: working(reference_state, name) for name in names}
    work = {name: working(state, name) for name in names}  # permuted as we go
    perms = [np.arange(space.dim) for space in spaces]
    slices = [space.producers + space.consumers for space in spaces]

    n_iter, converged = 0, False
    while n_iter < max_iter and not converged:
        n_iter += 1
        converged = True
        for s in rng.permutation(len(spaces)):
            space = spaces[s]
            if not slices[s] or space.dim < 2:
                continue
            d = space.dim
            current = torch.zeros((d, d), dtype=torch.float64, device=next(iter(ref.values())).device)
            for sl in slices[s]:
                a = gather_slice(ref[sl.name], sl).reshape(d, -1)
                b = gather_slice(work[sl.name], sl).reshape(d, -1)
                current += a @ b.T
            # columns of `current` follow the current order; back to the original one
            similarity = np.empty((d, d))
            similarity[:, perms[s]] = current.cpu().numpy()
            new = _solve_blocks(similarity, space.block_size)
            rows = np.arange(d)
            old_value, new_value = similarity[rows, perms[s]].sum(), similarity[rows, new].sum()
            # strict increase only: ties never make the descent cycle
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                relative = np.argsort(perms[s])[new]  # new order in terms of the current one
                permute_space_(work, space, relative)
                perms[s] = new
                converged = False
    return perms, n_iter, converged


class WeightMatchingMerger(ModelMerger):
    """Merge models after permuting them by weight matching, without alignment data.

    Weight matching (Ainsworth et al., "Git Re-Basin", ICLR 2023) aligns each
    model to the reference from the *parameters* alone: for every feature
    space (found with :func:`skmerge.graph.find_spaces`, so residual streams,
    flattened convolutions, normalization layers and GroupNorm blocks are all
    handled) it looks for the permutation of the model's channels that
    maximizes the sum of inner products between the model's and the
    reference's parameters, by coordinate descent over the spaces (see
    :func:`weight_matching`). The permuted models are averaged exactly as
    :class:`~skmerge.ModelMerger` does; predict, score, ``merge_with_weights``,
    ``aligned_state_dicts`` and persistence are inherited.

    ``fit()`` needs no data. The spaces are found by tracing the model on
    ``example_input`` (or on the first batch of ``X`` when ``fit(X)`` is given
    data); with ``spaces=`` given by hand no input at all is needed. ``X``, if
    given, is used only for that and for re-estimating the BatchNorm
    statistics of the merged model.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Two or more models of the same architecture; never modified.
    reference : int, default=0
        Index of the model whose channel order the others are matched to.
    weights : array-like of shape (n_models,), optional
        Non-negative averaging weights (normalized); uniform by default.
    reset_bn : bool, default=True
        Re-estimate the merged model's BatchNorm statistics on ``X``. Without
        ``X`` this is impossible: the merged model keeps the averaged (permuted)
        running statistics and a ``UserWarning`` says so (pass
        ``reset_bn=False`` to silence it, or call ``fit(X)`` or
        :func:`skmerge.batchnorm.reset_bn_stats` later).
    repair : bool, default=False
        Apply REPAIR after averaging (see :class:`~skmerge.ModelMerger` and
        :func:`skmerge.repair.repair_`): renormalize the merged model's hidden
        channels to the interpolated statistics of the permuted models. It
        needs ``X``: ``fit()`` without data raises a ``ValueError``.
    batch_size : int, default=128
        Batch size of the BatchNorm and REPAIR passes over ``X``.
    device : {"auto"} or str or torch.device, default="auto"
        Where the matching (float64 products) and averaging run.
    spaces : list of skmerge.graph.Space, optional
        Feature spaces given by hand; found automatically when None.
    example_input : torch.Tensor or array-like, optional
        A small batch the models accept, used to find the spaces when ``fit``
        gets no ``X``.
    max_iter : int, default=100
        Largest number of sweeps over the spaces per model.
    random_state : int, RandomState instance or None, default=None
        Order of the spaces in each sweep.
    self_check : {"auto"} or bool, default="auto"
        Before merging, check that permuting every space at random (whole
        heads of an attention layer included) leaves the reference model's
        outputs on two example inputs unchanged: it catches a wrong space at
        the cost of one weight transform and two forward passes on two
        inputs. ``"auto"`` runs it whenever an input is available, True
        requires one, False skips it.
    verbose : bool, default=False
        Show progress bars.

    Attributes
    ----------
    merged_model_ : torch.nn.Module
        The merged network, in evaluation mode on ``device_``.
    spaces_ : list of skmerge.graph.Space
        The feature spaces that were matched.
    aligners_ : list of list of MatchedPermutation or None
        ``aligners_[i][k]`` is the permutation of space ``i`` found for model
        ``k`` (``None`` for the reference).
    n_iter_ : numpy.ndarray of shape (n_models,)
        Sweeps run for each model (0 for the reference).
    weights_ : numpy.ndarray of shape (n_models,)
        The normalized averaging weights.
    classes_ : numpy.ndarray
        ``arange(n_outputs)`` (set when an input was available, else at the
        first prediction).
    n_samples_seen_ : int
        Always 0: no alignment statistics are collected.
    n_features_in_ : int
        Number of input features, when ``X`` or ``example_input`` is 2-D.
    device_ : torch.device
        Device used.
    timings_ : dict
        Seconds spent in ``"solve"`` (the matching), ``"transform"``,
        ``"reset_bn"``, ``"repair"`` (only with ``repair=True``) and ``"total"``
        (``"statistics"`` is 0).

    Notes
    -----
    Unlike :class:`~skmerge.ModelMerger` this merger has no ``statistics_``,
    so the activation diagnostics of :mod:`skmerge.diagnostics` that read
    them do not apply. Each model is matched to the reference on its own
    (all-to-one), not jointly.

    Examples
    --------
    >>> import torch
    >>> from skmerge.graph import permute_model
    >>> from skmerge.weight_matching import WeightMatchingMerger
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> x = torch.randn(8, 4)
    >>> permuted, _ = permute_model(model, x[:2], seed=0)
    >>> merger = WeightMatchingMerger([model, permuted], example_input=x[:2]).fit()
    >>> torch.allclose(merger.merged_model_(x), model(x), atol=1e-6)
    True
    """

    def __init__(
        self,
        models,
        reference: int = 0,
        weights=None,
        reset_bn: bool = True,
        repair: bool = False,
        batch_size: int = 128,
        device="auto",
        spaces=None,
        example_input=None,
        max_iter: int = 100,
        random_state=None,
        self_check: bool | str = "auto",
        verbose: bool = False,
    ):
        self.models = models
        self.reference = reference
        self.weights = weights
        self.reset_bn = reset_bn
        self.repair = repair
        self.batch_size = batch_size
        self.device = device
        self.spaces = spaces
        self.example_input = example_input
        self.max_iter = max_iter
        self.random_state = random_state
        self.self_check = self_check
        self.verbose = verbose

    def fit(self, X=None, y=None):
        """Match every model to the reference by its weights and build ``merged_model_``.

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader, optional
            Not needed for the matching. When given, its first batch serves
            to find the spaces (if ``example_input`` is None) and the whole of
            it to re-estimate the BatchNorm statistics (``reset_bn``) and for
            REPAIR (``repair``).
        y : ignored

        Returns
        -------
        self : WeightMatchingMerger
        """
        return self._fit(X)

    def _check_method_params(self) -> None:
        check_positive_int(self.max_iter, "max_iter")

    def _fit_aligners(self, models, reference, batches, dtype, runner, stream=None) -> list[list]:
        self.timings_["statistics"] = 0.0
        self.n_samples_seen_ = 0
        tick = time.perf_counter()
        aligners, self.n_iter_ = self._match(models, reference, self.spaces_,
                                             check_random_state(self.random_state))
        self.timings_["solve"] = time.perf_counter() - tick
        return aligners

    def refit(self, X=None, **params):
        """Not available: weight matching has no statistics to solve again; call ``fit``."""
        raise TypeError("WeightMatchingMerger matches weights, not statistics: there is nothing to "
                        "solve again; call fit with the new parameters.")

    def _example_and_batches(self, loader, dtype):
        """No statistics pass; the example is ``example_input``, else X's first batch."""
        if self.example_input is not None:
            example = self.example_input
            if not isinstance(example, torch.Tensor):
                example = torch.as_tensor(np.asarray(example))
            if example.ndim == 0 or len(example) == 0:
                raise ValueError("example_input must be a non-empty batch (first axis = samples).")
            example = example.to(self.device_, dtype) if example.is_floating_point() else example.to(self.device_)
            return None, example
        if loader is not None:
            return super()._example_and_batches(loader, dtype)
        if self.spaces is None:
            raise ValueError(
                "WeightMatchingMerger needs an input to find the feature spaces: pass "
                "example_input= (a small batch the models accept), call fit(X) with data, "
                "or give spaces= by hand.")
        return None, None

    def _spaces(self, reference_model: nn.Module, example):
        if example is None and self.self_check is True:
            raise ValueError("self_check=True needs an input: pass example_input= or fit(X).")
        return super()._spaces(reference_model, example)

    def _match(self, models, reference, spaces, random_state):
        states = [model.state_dict() for model in models]
        rows = [[None] * len(models) for _ in spaces]
        n_iter = np.zeros(len(models), dtype=np.int64)
        progress = tqdm(total=len(models) - 1, desc="Weight matching",
                        disable=not self._show_progress(), leave=False)
        for k, state in enumerate(states):
            if k == reference:
                continue
            perms, n_iter[k], converged = weight_matching(
                states[reference], state, spaces, self.max_iter, random_state, self.device_)
            if not converged:
                warnings.warn(f"Weight matching of model {k} did not converge in max_iter="
                              f"{self.max_iter} sweeps; increase max_iter.", ConvergenceWarning,
                              stacklevel=3)
            for i, perm in enumerate(perms):
                rows[i][k] = MatchedPermutation(perm)
            progress.update()
        progress.close()
        return rows, n_iter
