"""ZipIt!: merge features across and within models, optionally only up to a layer.

:class:`ZipItMerger` implements ZipIt! (Stoica, Bolya, Bjorner, Ramesh,
Hearn and Hoffman, "ZipIt! Merging Models from Different Tasks without
Training", ICLR 2024) on skmerge's feature spaces. Per space, the features of
*all* models are pooled and the most correlated pairs are merged greedily,
across models and within a model, until the space has its original width;
a merged feature is the mean of its members, and every member reads it back.
In merge/unmerge form (:class:`MergeUnmerge`: per space and model, a merge
matrix into the merged features and an unmerge matrix back), all-to-one
merging is the special case of merge matrices ``[w_0 I, w_1 T_1, ...]``
(``T_k`` the aligners' mappings) and unmerge matrices ``T_k^-1``.
``stop_at`` zips only the first spaces and keeps the rest of every model, which gives a model with one head per source model
(:class:`MultiHeadModel`).

The merge/unmerge form is public: :class:`MergeUnmerge` holds one model's
part in one space, :func:`from_aligners` writes a fitted all-to-one alignment
in that form and :func:`combine_states` builds the merged ``state_dict`` of
any set of parts.
"""

from __future__ import annotations

import numbers
import time
import warnings

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn
from tqdm.auto import tqdm

from ._blocks import BlockAligner, block_families, match_blocks
from ._memory import available_bytes
from ._merge_unmerge import MergeUnmerge, combine_states, from_aligners, from_labels, producer_values
from ._multihead import MultiHeadModel, share_tensors
from ._zip_match import joint_correlation, zip_match
from .aligners import PermutationAligner
from .batchnorm import has_batchnorm, reset_bn_stats
from .graph import Space, apply_transforms
from .graph._walk import DEFAULT_TAPS
from .merge import ModelMerger, _module_with_state, _normalized_weights
from .reference_free import JointCovariance, _joint_bytes

__all__ = ["MergeUnmerge", "MultiHeadModel", "ZipItMerger", "combine_states", "from_aligners"]


class ZipItMerger(ModelMerger):
    """Merge models by zipping their features, across and within models (ZipIt!).

    Per feature space (:doc:`/user_guide/spaces`), the features of all ``n``
    models (``n * d`` of them) are pooled, their correlations computed on
    ``X``, and the most correlated pair of features (or groups of features)
    is merged, again and again, until ``d`` groups are left. Pairs within one
    model are candidates too: a model's redundant features are merged with
    each other, which frees merged features for what the other models do not
    share (models trained on different tasks). A merged feature is the mean of
    its members (weighted by the models' ``weights``), and every member reads
    it back; a layer's merged weights are therefore ``sum_k M_k W_k U_k`` with
    the merge matrices ``M_k`` (averaging) and unmerge matrices ``U_k``
    (membership) of its output and input spaces. All-to-one averaging is the
    special case of merge matrices ``[I, T_1, ..., T_n] / n``.

    With ``stop_at``, only the spaces up to that one are zipped and every
    model keeps the rest of its own layers, reading the zipped trunk's
    features through its unmerge matrix: the result is a
    :class:`~skmerge.zipit.MultiHeadModel` whose output is the weighted mean
    of the heads' outputs.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Two or more models of the same architecture; never modified.
    alpha : float in [0, 1], default=0.3
        After a merge, the new group's correlations with the others are the
        smaller of its two parts' times ``alpha``: a group takes a further
        feature only when that feature is much better matched than the
        remaining pairs. ``alpha = 0`` keeps the correlations but forbids a
        group formed by a merge to take a further feature of a model it
        already holds (with many models, groups then take one feature per
        model).
    beta : float in [0, 1], default=1.0
        Budget of merges within a model: a merge that puts two features of
        one model into one merged feature is allowed while that model has
        budget left, ``floor(beta * (n - 1) * d / n)`` such merges per model
        (a fraction ``beta`` of its share of the merges). ``beta = 0``: every
        merged feature holds at most one feature of each model; ``1`` leaves
        the greedy matching free. The default was chosen on digits MLPs
        trained on disjoint classes (where 1 beat 0.125, the reference
        implementation's default, by 10 points of joint accuracy and did not
        hurt models trained on the same data); see :doc:`/user_guide/zipit`.
    stop_at : int or str, optional
        Partial zipping. None zips every space and merges every layer (one
        model of the source architecture). An int (a negative one counts from
        the end) or a space name selects a space of ``spaces_`` (graph order,
        the order their first layer is called): it and the spaces before it
        are zipped, together with every space that a layer producing one of
        them reads (so that the zipped trunk is a function of the input: a
        residual stream brings in all the blocks that write to it; the
        query-key and value-output spaces of an attention layer go together).
        All other
        parameters (the layers producing the other spaces, and those
        producing no feature space, such as the output layer) are kept per
        model. ``stop_at=-1`` zips every space and keeps only the output
        layers per model.
    reference : int, default=0
        The model the spaces are found on, whose integer buffers (such as
        ``num_batches_tracked``) the merged model takes, whose features come
        first in the order of the merged features, and to which tied spaces
        and attention heads are matched (see Notes).
    weights : array-like of shape (n_models,), optional
        Non-negative weights (normalized); uniform by default. A merged
        feature is the weighted mean of its members, the entries that produce
        no feature space are averaged with them, and a partial model weighs
        its heads' outputs with them.
    reset_bn : bool or "exact", default=True
        Re-estimate the BatchNorm statistics of the merged model on ``X``, as
        :class:`~skmerge.ModelMerger` does (the ZipIt! paper does too).
    batch_size : int, default=128
        Batch size of the passes over array, tensor and Dataset inputs.
    device : {"auto"} or str or torch.device, default="auto"
        Where the forward passes, statistics and matching run.
    spaces : list of skmerge.graph.Space, optional
        Feature spaces given by hand; found automatically when None.
    taps : {"formed", "consumers", "both", "pre_and_post_activation"}, default="both"
        Where the spaces found automatically are observed (see
        :class:`~skmerge.ModelMerger`).
    self_check : {"auto"} or bool, default="auto"
        Check the spaces by random permutations first (see
        :class:`~skmerge.ModelMerger`).
    precision : {"auto", "single", "double"}, default="auto"
        Precision of the per-batch products of the statistics.
    verbose : bool, default=False
        Show progress bars.

    Attributes
    ----------
    merged_model_ : torch.nn.Module
        The merged network (``stop_at=None``), or a
        :class:`~skmerge.zipit.MultiHeadModel`; in evaluation mode on
        ``device_``.
    spaces_ : list of skmerge.graph.Space
        The feature spaces, in graph order.
    zipped_ : list of bool
        Per space, whether it was zipped (all True without ``stop_at``).
    labels_ : list of torch.Tensor or None
        Per zipped space, ``(n_models, d)``: the merged feature that feature
        ``i`` of model ``k`` joins (``None`` for a space kept per model or
        never observed).
    within_model_merges_ : list of int
        Per space, the number of merges that put two features of one model
        into one merged feature.
    aligners_ : list of list
        ``aligners_[i][k]``: the :class:`~skmerge.zipit.MergeUnmerge` of space
        ``i`` and model ``k`` (``merge_``, ``unmerge_``, ``share_``; ``None``
        in the spaces without ``labels_``, which every model keeps).
    statistics_ : list of JointCovariance or None
        Per zipped space, the means and cross-covariances of all pairs of models.
    weights_ : numpy.ndarray of shape (n_models,)
        The normalized weights.
    classes_ : numpy.ndarray
        ``arange(n_outputs)``.
    n_samples_seen_ : int
        Number of alignment inputs.
    n_features_in_ : int
        Number of input features, set when ``X`` is a 2-D array or tensor.
    device_ : torch.device
        Device used.
    timings_ : dict
        Seconds spent in ``"statistics"``, ``"solve"`` (the matching),
        ``"transform"``, ``"reset_bn"`` and ``"total"``.

    Notes
    -----
    Block-diagonal spaces (``GroupNorm`` groups, grouped convolutions,
    attention heads) are zipped block by block: blocks are first matched as
    wholes to the reference's (attention heads, as in
    :class:`~skmerge.ModelMerger`; groups stay in place), then the features
    of matched blocks are zipped into one merged block. A tied space
    (weights that both create and read it, e.g. a tied embedding) cannot take
    averaging merges; it is matched by permutations to the reference
    (one feature per model in each merged feature).

    The statistics of all pairs of models take ``n (n + 1) / 2`` float64
    matrices of ``d x d`` per zipped space (as in
    :class:`~skmerge.reference_free.ReferenceFreeMerger`), and the matching
    works on the ``n d x n d`` correlation matrix: ``n d - d`` steps, each
    an argmax over it.

    :meth:`aligned_state_dicts` gives every model transformed by its merge
    (mean of its members of each merged feature, zero where it has none) and
    unmerge matrices; the merged model is their sum weighted by ``share_``
    per merged feature, not their plain mean. ``repair`` is not offered.

    :meth:`refit` matches again from ``statistics_`` with other ``alpha``,
    ``beta`` or ``weights``, without a pass over the data; ``stop_at``
    decides which spaces have statistics and needs ``fit``.

    Examples
    --------
    >>> import torch
    >>> from skmerge.graph import permute_model
    >>> from skmerge.zipit import ZipItMerger
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                             torch.nn.Linear(16, 3))
    >>> x = torch.randn(256, 4)
    >>> permuted = permute_model(model, x[:2], seed=1)[0]
    >>> merger = ZipItMerger([model, permuted], device="cpu").fit(x)
    >>> torch.allclose(merger.merged_model_(x), model(x), atol=1e-6)
    True
    >>> merger.within_model_merges_
    [0]
    """

    def __init__(
        self,
        models,
        alpha: float = 0.3,
        beta: float = 1.0,
        stop_at=None,
        reference: int = 0,
        weights=None,
        reset_bn: bool | str = True,
        batch_size: int = 128,
        device="auto",
        spaces=None,
        taps: str = DEFAULT_TAPS,
        self_check: bool | str = "auto",
        precision: str = "auto",
        verbose: bool = False,
    ):
        self.models = models
        self.alpha = alpha
        self.beta = beta
        self.stop_at = stop_at
        self.reference = reference
        self.weights = weights
        self.reset_bn = reset_bn
        self.batch_size = batch_size
        self.device = device
        self.spaces = spaces
        self.taps = taps
        self.self_check = self_check
        self.precision = precision
        self.verbose = verbose

    #: ``stop_at`` too: the statistics are those of the zipped spaces only
    _refit_frozen = ModelMerger._refit_frozen | {"stop_at"}

    def fit(self, X, y=None):
        """Zip the models on ``X`` and build ``merged_model_``.

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
            Alignment inputs, or a dataset/loader of ``x`` or ``(x, y)``
            batches. Passed through every model once.
        y : ignored

        Returns
        -------
        self : ZipItMerger
        """
        return self._fit(X)

    # ---------------------------------------------------------------- checks
    def _check_method_params(self) -> None:
        self._check_pass_params()
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not 0 <= float(value) <= 1):
                raise ValueError(f"{name} must be a float in [0, 1], got {value!r}.")
        stop = self.stop_at
        if stop is not None and (isinstance(stop, bool) or not isinstance(stop, (numbers.Integral, str))):
            raise TypeError(f"stop_at must be None, an int or a space name, got {stop!r}.")

    def _zipped(self, spaces: list) -> list:
        """Per space, whether it is zipped: the spaces up to ``stop_at`` and what their producers read."""
        if self.stop_at is None:
            return [True] * len(spaces)
        if not spaces:
            raise ValueError("stop_at needs feature spaces, but the models have none.")
        stop = self.stop_at
        if isinstance(stop, str):
            names = [s.name for s in spaces]
            if stop not in names:
                raise ValueError(f"stop_at={stop!r} is not the name of a feature space; the spaces are "
                                 f"{names}.")
            last = names.index(stop)
        else:
            if not -len(spaces) <= stop < len(spaces):
                raise ValueError(f"stop_at={stop} is out of range for {len(spaces)} feature spaces.")
            last = int(stop) % len(spaces)
        readers: dict = {}
        for i, space in enumerate(spaces):
            for sl in space.consumers:
                readers.setdefault(sl.name, set()).add(i)
        family = {}
        for i, space in enumerate(spaces):
            if space.block_family is not None:
                family.setdefault(space.block_family, set()).add(i)
        zipped, todo = set(range(last + 1)), list(range(last + 1))
        while todo:
            # Upstream closure: what a zipped space's producers read is zipped too, and the
            # spaces whose blocks (attention heads) permute together go together.
            i = todo.pop()
            needed = set(family.get(spaces[i].block_family, ()))
            for sl in spaces[i].producers:
                needed |= readers.get(sl.name, set())
            for j in needed - zipped:
                zipped.add(j)
                todo.append(j)
        return [i in zipped for i in range(len(spaces))]

    # ------------------------------------------------------------- matching
    def _fit_aligners(self, models, reference, batches, dtype, runner, stream=None) -> list[list]:
        n_models, spaces = len(models), self.spaces_
        self.zipped_ = self._zipped(spaces)
        chosen = [i for i, space in enumerate(spaces) if self.zipped_[i] and space.taps]
        for i, space in enumerate(spaces):
            if self.zipped_[i] and not space.taps:
                warnings.warn(f"Space {space.name!r} is never observed; it keeps each model's basis.",
                              stacklevel=4)
        _check_memory(n_models, [spaces[i].dim for i in chosen], self.device_)
        tick = time.perf_counter()
        stats, self.n_samples_seen_ = self._accumulate(
            models, reference, batches, [spaces[i] for i in chosen], dtype, runner,
            statistics_type=JointCovariance)
        self.timings_["statistics"] = time.perf_counter() - tick
        self.statistics_ = [None] * len(spaces)
        for i, s in zip(chosen, stats):
            self.statistics_[i] = s
        return self._resolve(n_models, reference)

    def _resolve(self, n_models: int, reference: int) -> list[list]:
        """The matching of the zipped spaces from ``statistics_`` (the step :meth:`refit` repeats)."""
        tick = time.perf_counter()
        spaces = self.spaces_
        chosen = [i for i, s in enumerate(self.statistics_) if s is not None]
        self.labels_ = [None] * len(spaces)
        self.within_model_merges_ = [0] * len(spaces)
        orders = self._block_orders(spaces, self.statistics_, n_models, reference)
        progress = tqdm(chosen, desc="Zipping", disable=not self._show_progress(), leave=False)
        for i in progress:
            self.labels_[i], self.within_model_merges_[i] = self._labels(
                spaces[i], self.statistics_[i], reference, orders.get(spaces[i].block_family))
        self.timings_["solve"] = time.perf_counter() - tick
        return [[None] * n_models if row is None else row for row in self._parts(self.weights_)]

    def _parts(self, weights) -> list:
        """``aligners_``: per space, the MergeUnmerge of every model (or None)."""
        return [None if labels is None else from_labels(labels, weights) for labels in self.labels_]

    @staticmethod
    def _block_orders(spaces, statistics, n_models: int, reference: int) -> dict:
        """Attention heads matched as wholes to the reference's: ``{family: [order per model]}``."""
        orders = {}
        for family, members in block_families(spaces).items():
            members = [i for i in members if statistics[i] is not None]
            if members:
                block = spaces[members[0]].block_size
                orders[family] = [None if k == reference else
                                  match_blocks([statistics[i].pair(k, reference) for i in members], block)
                                  for k in range(n_models)]
        return orders

    def _labels(self, space: Space, stats: JointCovariance, reference: int, orders=None) -> tuple:
        """``(labels, n_within)``: the merged feature of every model's features in one space, ``(n_models, d)``."""
        n_models, d, b = stats.n_views, space.dim, space.block_size
        if space.orthogonal:
            return self._permutation_labels(space, stats, reference, orders), 0
        labels = torch.empty(n_models, d, dtype=torch.long)
        n_within = 0
        for g in range(d // b):  # reference block g and the blocks matched to it
            blocks = [g if k == reference or orders is None or orders[k] is None
                      else int(np.flatnonzero(orders[k] == g)[0]) for k in range(n_models)]
            index = [torch.arange(h * b, (h + 1) * b) for h in blocks]
            # the reference's features first: merged features follow its order where they can
            views = [reference] + [k for k in range(n_models) if k != reference]
            correlation = joint_correlation(stats, views, [index[k] for k in views])
            owners = torch.arange(n_models).repeat_interleave(b)
            found, within = zip_match(correlation, owners, b, float(self.alpha), float(self.beta))
            n_within += within
            for position, k in enumerate(views):
                labels[k, index[k]] = g * b + found[position * b:(position + 1) * b]
        return labels, n_within

    @staticmethod
    def _permutation_labels(space: Space, stats, reference: int, orders) -> torch.Tensor:
        """A tied space: each model permuted to the reference (blockwise, heads matched)."""
        n_models, d = stats.n_views, space.dim
        labels = torch.empty(n_models, d, dtype=torch.long)
        for k in range(n_models):
            if k == reference:
                labels[k] = torch.arange(d)
                continue
            aligner = PermutationAligner()
            if space.block_size != d:
                aligner = BlockAligner(aligner, space.block_size, None if orders is None else orders[k])
            permutation = torch.as_tensor(aligner.fit_from_stats(stats.pair(k, reference)).permutation_)
            labels[k, permutation.long().cpu()] = torch.arange(d)  # new channel j is old permutation[j]
        return labels

    # ---------------------------------------------------------- merged model
    def _states(self, models) -> list:
        return [{key: value.to(self.device_) for key, value in model.state_dict().items()} for model in models]

    def _averaged_state(self, models, weights, reference: int, aligned_states=None) -> dict:
        merged = combine_states(self._states(models), self.spaces_, self._parts(weights), weights)
        for key, value in models[reference].state_dict().items():
            if not value.is_floating_point():
                merged[key] = value.to(self.device_, copy=True)
        return merged

    def _merged_module(self, models, weights, reference: int, aligned_states=None) -> nn.Module:
        if self.stop_at is None:
            return super()._merged_module(models, weights, reference)
        states, spaces, parts = self._states(models), self.spaces_, self._parts(weights)
        merged = combine_states(states, spaces, parts, weights)
        ones = [None if p is None else torch.ones(space.dim) for p, space in zip(parts, spaces)]
        trunk = producer_values(states[0], spaces, ones, 0.0)  # 1 where a zipped space is produced
        heads = []
        for k, state in enumerate(states):
            own = apply_transforms(state, spaces, [None if p is None else (p[k].mapping_, p[k].inverse_mapping_)
                                                   for p in parts])
            for key, mask in trunk.items():
                own[key] = torch.where(mask > 0, merged[key], own[key])
            heads.append(_module_with_state(models[reference], own, self.device_))
        share_tensors(heads, {key for key, mask in trunk.items() if bool((mask > 0).all())})
        return MultiHeadModel(heads, weights).to(self.device_).eval()

    def merge_with_weights(self, weights, X=None) -> nn.Module:
        """Build the merged model of the fitted matching with other weights.

        The groups of features stay; the weights change each merged feature's
        mean over its members, the averaging of the entries that produce no
        feature space, and the weights of a partial model's heads.

        Parameters
        ----------
        weights : array-like of shape (n_models,)
            Non-negative weights, normalized to sum to one.
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader, optional
            Data to re-estimate the BatchNorm statistics on (when ``reset_bn``).

        Returns
        -------
        torch.nn.Module
            A new model in evaluation mode on ``device_``.
        """
        check_is_fitted(self, "merged_model_")
        models = self._validated_models()
        weights = _normalized_weights(weights, len(models))
        model = self._merged_module(models, weights, self._validated_reference(len(models)))
        if X is not None and self.reset_bn and has_batchnorm(model):
            reset_bn_stats(model, X, batch_size=self.batch_size, device=self.device_,
                           exact=self.reset_bn == "exact")
        return model.eval()


def _check_memory(n_models: int, dims, device: torch.device) -> None:
    """Refuse, before any forward pass, statistics and a matching that cannot fit on ``device``."""
    statistics = _joint_bytes(n_models, dims)
    matching = max((8 * 4 * (n_models * d) ** 2 for d in dims), default=0)  # correlations, scores, masks
    available = available_bytes(device)
    if available is not None and statistics + matching > available:
        raise MemoryError(
            f"ZipItMerger keeps the cross-covariances of all pairs of its {n_models} models "
            f"({statistics / 2**30:.2f} GiB for widths up to {max(dims)}) and matches on the pooled "
            f"correlation matrix ({matching / 2**30:.2f} GiB), but only {available / 2**30:.2f} GiB "
            f"are available on {device}. Zip fewer models at once, or fewer spaces (stop_at).")

