"""ModelMerger: align the hidden features of several networks, then average them."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import numbers
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted
from torch import nn
from tqdm.auto import tqdm

from ._blocks import BlockAligner, match_heads, orthogonal_aligner
from ._batches import as_loader, iter_inputs, loader_length as _length
from ._observe import BatchObserver, taps_by_key
from ._distributed import all_reduce_statistics, all_reduce_sum_, is_distributed
from ._model_checks import architecture_difference, check_model_tensors
from ._prediction import MergedModelClassifierMixin
from ._space_aligners import aligner_for, check_selectors_match, check_space_aligners
from ._statistics_cache import combination_cache, data_key, statistics_cache
from ._validation import check_device
from .aligners import CCAAligner, OptimalTransportAligner
from .batchnorm import has_batchnorm, reset_bn_stats
from .combine import resolve_combine
from .graph import AveragingFallbackWarning, Space, apply_transforms
from .graph._apply import normalize_transforms, slices_by_tensor, transform_tensor
from .graph._export import meta_copy
from .graph._find import analyze
from .graph._walk import DEFAULT_TAPS, check_taps
from .graph._permute import verify_spaces
from .graph._runner import GraphRunner, model_tensors, runner_for
from .repair import channel_maps_of, repair_
from .stats import CrossCovariance, ReferenceCovariance

__all__ = ["ModelMerger", "SmallSampleMergeWarning"]


class SmallSampleMergeWarning(UserWarning):
    """Too few alignment samples for a feature space's dimension."""


def _is_soft_plan(aligner) -> bool:
    """Whether a fitted aligner maps by a soft transport plan (a reference feature that is an
    average of several), itself or in one of its blocks. A plan so sharp that every column is
    one-hot to 1e-3 merges like a permutation and does not count."""
    if isinstance(aligner, BlockAligner):
        return any(_is_soft_plan(block) for block in getattr(aligner, "blocks_", ()))
    if not isinstance(aligner, OptimalTransportAligner) or getattr(aligner, "epsilon_", 0.0) == 0.0:
        return False
    return float(torch.as_tensor(aligner.mapping_).amax(dim=0).min()) < 1.0 - 1e-3


def _warn_soft_plans_without_renormalization(aligners, merged_model: nn.Module) -> None:
    """Soft plans average features, which shrinks them layer after layer; BatchNorm or REPAIR undoes it."""
    if has_batchnorm(merged_model):
        return
    if any(_is_soft_plan(a) for row in aligners for a in row if a is not None):
        warnings.warn(
            "OptimalTransportAligner's soft plans average features, which shrinks the merged "
            "activations layer after layer, and the models have no BatchNorm to renormalize them: "
            "the merge can fall to near chance. Pass repair=True (REPAIR renormalizes every merged "
            "channel), or reg=\"exact\" for a hard matching.", UserWarning, stacklevel=5)


class ModelMerger(MergedModelClassifierMixin, BaseEstimator):
    """Merge several networks of one architecture into one network.

    Every *feature space* of the architecture (a set of channels that must share
    one transform, found automatically with :func:`skmerge.graph.find_spaces`)
    is aligned model by model to the reference model ("all-to-one"): a clone of
    ``aligner`` is fitted on the activations of the model (``X``) against those
    of the reference (``y``). The weights of each model are then expressed in
    the reference's basis (producers get ``mapping.T`` on their rows, consumers
    ``inverse_mapping.T`` on their columns) and averaged.

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Two or more models of the same architecture, compared by structure:
        the same module types (by qualified name, so two classes of one name
        from a factory function qualify) and ``state_dict`` keys, shapes and
        dtypes. Every parameter and buffer must be finite and on one device
        per model. They are never modified (each submodule's training flag
        included).
    aligner : estimator, default=CCAAligner()
        Any skmerge aligner (an estimator with ``fit_from_stats``, ``mapping_``
        and ``inverse_mapping_``). It is cloned for every (space, model) pair.
    space_aligners : list of (selector, aligner) pairs, optional
        Other aligners for some spaces: a space is aligned with the aligner
        of the first pair whose selector matches it, the others with
        ``aligner``. A selector is a shell-style pattern on the space's name
        (``"*mlp*"``; the names are those of ``spaces_`` and
        :func:`~skmerge.graph.find_spaces`) or a callable taking the
        :class:`~skmerge.graph.Space` and returning a bool. Every selector
        must match at least one space (checked before the statistics pass).
        Example: ``[("*mlp*", PermutationAligner())]`` keeps the hidden units
        of a transformer's MLPs one-to-one while ``aligner`` maps the other
        spaces densely (:ref:`merging-space-aligners`). :meth:`refit` can
        change it without a pass.
    reference : int, default=0
        Index of the model whose feature bases the others are aligned to.
    weights : array-like of shape (n_models,), optional
        Non-negative averaging weights (normalized to sum to one); uniform by
        default.
    combine : {"uniform", "fisher", "regmean"} or skmerge.combine.Fisher or skmerge.combine.RegMean, default="uniform"
        How the aligned models are combined. ``"uniform"``: their average
        (with ``weights``). ``"fisher"``: Fisher-weighted averaging (Matena
        and Raffel, NeurIPS 2022), every parameter entry weighted by each
        model's diagonal Fisher information on ``X`` carried into the aligned
        basis (:class:`~skmerge.combine.Fisher`). ``"regmean"``: every Linear
        and Conv layer is the least-squares fit of all aligned models'
        outputs from their inputs (RegMean, Jin et al., ICLR 2023;
        :class:`~skmerge.combine.RegMean`), the rest averaged. Both are
        measured inside the alignment pass over ``X`` (RegMean: a Gram
        product per layer and batch; Fisher: per-example gradients of every
        model), hold every aligned model's state
        at once while combining (uniform
        averaging transforms and adds one tensor at a time) and combine with
        ``weights``. An instance sets their parameters (``combine__alpha``
        for GridSearchCV); their statistics are reused by :meth:`refit`.
    reset_bn : bool or "exact", default=True
        Re-estimate the merged model's BatchNorm running statistics on the
        alignment data (averaged statistics do not describe the merged model):
        population statistics in two passes over the data, whatever the batch
        sizes (:func:`skmerge.batchnorm.reset_bn_stats`). ``"exact"`` measures
        the layers one after the other (about half as many passes as there
        are BatchNorm layers), which makes the statistics independent of how
        batches and ``torch.distributed`` shards cut the data.
    repair : bool, default=False
        After averaging (and the BatchNorm reset), apply REPAIR (Jordan et al.,
        ICLR 2023; :func:`skmerge.repair.repair_`): rescale and shift every
        hidden channel of the merged model so that its mean and standard
        deviation on the alignment data become the interpolation (with
        ``weights``) of those of the base models in the reference's basis
        (the aligned models after permutations; after dense maps each base
        model's own outputs times its map), folded into the layers' weights
        and biases (or BatchNorm affine parameters). It counters the
        variance collapse of averaging and helps most in networks *without*
        BatchNorm, where the BatchNorm reset has nothing to re-estimate; with
        BatchNorm it also restores the scale of the BatchNorm outputs. Costs
        one more pass over the data through all the models; needs ``X``.
    batch_size : int, default=128
        Batch size of the passes over array, tensor and Dataset inputs.
    device : {"auto"} or str or torch.device, default="auto"
        Where the forward passes, statistics and linear algebra run; "auto"
        picks CUDA when available, else the CPU.
    spaces : list of skmerge.graph.Space, optional
        Feature spaces given by hand (for models that torch.export cannot
        capture); found automatically when None.
    taps : {"formed", "consumers", "both", "pre_and_post_activation"}, default="both"
        Where the spaces found automatically are observed
        (:func:`~skmerge.graph.find_spaces`' ``taps``): where their features
        are formed (after the nonlinearity, before any pooling, as in the
        CCA Merge paper), at the inputs of the layers that read them (after
        pooling and flattening), both, pooled (the default: the best CCA
        merges measured), or where they are formed and at the inputs of
        their nonlinearities, pooled. The measured best differs by model and
        aligner (:ref:`benchmarks-converged`); only used when ``spaces`` is
        None.
    self_check : {"auto"} or bool, default="auto"
        Before merging, check that permuting every space at random (whole
        heads of an attention layer included) leaves the reference model's
        outputs on two example inputs unchanged: it catches a wrong space at
        the cost of one weight transform and two forward passes on two
        inputs. ``"auto"`` runs it whenever an input is available, True
        requires one, False skips it.
    precision : {"auto", "single", "double"}, default="auto"
        Precision of the per-batch products of the statistics
        (:class:`~skmerge.stats.ReferenceCovariance`); the means and the
        accumulation across batches are float64 in every case. ``"single"``
        computes each batch's products in float32 (several times faster on
        CPUs) with a relative error below 1e-5 that does not grow with the
        number of batches; ``"double"`` computes them in float64. ``"auto"`` follows
        the models: ``"double"`` for float64 models, ``"single"`` otherwise.
    verbose : bool, default=False
        Show progress bars.

    Attributes
    ----------
    merged_model_ : torch.nn.Module
        The merged network: same class and ``state_dict`` keys as the inputs,
        on ``device_``, in evaluation mode.
    spaces_ : list of skmerge.graph.Space
        The feature spaces that were aligned.
    aligners_ : list of list
        ``aligners_[i][k]`` is the aligner fitted for space ``i`` and model
        ``k`` (``None`` for the reference model, whose basis is kept).
    statistics_ : list of skmerge.stats.ReferenceCovariance
        Per space, the accumulated statistics (means, auto-covariances, and
        cross-covariances with the reference).
    weights_ : numpy.ndarray of shape (n_models,)
        The normalized averaging weights.
    classes_ : numpy.ndarray
        ``arange(n_outputs)``: class indices predicted by ``predict``.
    n_samples_seen_ : int
        Number of alignment inputs.
    n_features_in_ : int
        Number of input features, set when ``X`` is a 2-D array or tensor.
    device_ : torch.device
        Device used.
    timings_ : dict
        Seconds spent in ``"statistics"`` (forward passes and accumulation),
        ``"solve"``, ``"combine"`` (the Fisher or Gram statistics of
        ``combine``, only when it is not uniform; the part of the pass spent
        on them is not counted in ``"statistics"``), ``"transform"`` (weights and
        averaging), ``"reset_bn"``, ``"repair"`` (only with ``repair=True``)
        and ``"total"``.
    combination_ : skmerge.combine.Fisher or skmerge.combine.RegMean
        The fitted combination, with its statistics (only when ``combine``
        is not uniform).

    Examples
    --------
    >>> import torch
    >>> from skmerge import ModelMerger, PermutationAligner
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> models = [torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                               torch.nn.Linear(16, 3)) for _ in range(2)]
    >>> merger = ModelMerger(models, PermutationAligner()).fit(torch.randn(256, 4))
    >>> merger.merged_model_(torch.randn(2, 4)).shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        models,
        aligner=CCAAligner(),
        space_aligners=None,
        reference: int = 0,
        weights=None,
        combine="uniform",
        reset_bn: bool | str = True,
        repair: bool = False,
        batch_size: int = 128,
        device="auto",
        spaces=None,
        taps: str = DEFAULT_TAPS,
        self_check: bool | str = "auto",
        precision: str = "auto",
        verbose: bool = False,
    ):
        self.models = models
        self.aligner = aligner
        self.space_aligners = space_aligners
        self.reference = reference
        self.weights = weights
        self.combine = combine
        self.reset_bn = reset_bn
        self.repair = repair
        self.batch_size = batch_size
        self.device = device
        self.spaces = spaces
        self.taps = taps
        self.self_check = self_check
        self.precision = precision
        self.verbose = verbose

    # ------------------------------------------------------------------ sklearn
    def __sklearn_clone__(self):
        # Share the (never modified) source models instead of deep-copying them,
        # so that GridSearchCV over large models stays cheap.
        params = self.get_params(deep=False)
        cloned = {
            name: value if name == "models" else clone(value, safe=False)
            for name, value in params.items()
        }
        return type(self)(**cloned)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Labels are optional: alignment is unsupervised, score() uses them.
        tags.target_tags.required = False
        tags.input_tags.three_d_array = True
        return tags

    # ---------------------------------------------------------------- validation
    def _validated_models(self) -> list[nn.Module]:
        models = self.models
        if isinstance(models, nn.Module) or not isinstance(models, Sequence):
            raise TypeError(
                "models must be a list or tuple of torch.nn.Module objects, "
                f"got {type(models).__name__}."
            )
        models = list(models)
        if len(models) < 2:
            raise ValueError(f"ModelMerger needs at least 2 models, got {len(models)}.")
        for k, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise TypeError(f"models[{k}] is a {type(model).__name__}, not a torch.nn.Module.")
        for k, model in enumerate(models[1:], start=1):
            difference = architecture_difference(model, models[0], f"models[{k}]", "models[0]")
            if difference is not None:
                raise ValueError(f"models[{k}] and models[0] have different architectures: "
                                 f"{difference}. All models must share one architecture.")
        # Once, before any work: values that no statistic would notice (the last
        # layer, a running variance) would otherwise reach the merged model.
        for k, model in enumerate(models):
            check_model_tensors(model, f"models[{k}]")
        return models

    def _validated_reference(self, n_models: int) -> int:
        ref = self.reference
        if not isinstance(ref, numbers.Integral) or isinstance(ref, bool):
            raise TypeError(f"reference must be an int, got {ref!r}.")
        if not 0 <= ref < n_models:
            raise ValueError(f"reference={ref} is out of range for {n_models} models.")
        return int(ref)

    def _validated_weights(self, n_models: int) -> np.ndarray:
        if self.weights is None:
            return np.full(n_models, 1.0 / n_models)
        return _normalized_weights(self.weights, n_models)

    def _resolved_device(self) -> torch.device:
        return check_device(self.device, "device")

    # ----------------------------------------------------------------------- fit
    def fit(self, X, y=None):
        """Align the models on ``X`` and build ``merged_model_``.

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
            Alignment inputs (first axis = samples), or a dataset/loader of
            ``x`` or ``(x, y)`` batches. Passed through every model once.
        y : ignored
            Accepted so that the merger works in scikit-learn pipelines and
            ``GridSearchCV``.

        Returns
        -------
        self : ModelMerger
        """
        return self._fit(X)

    def _fit(self, X):
        """Shared by the mergers: align (the ``_fit_aligners`` step), average, reset BatchNorm."""
        start = time.perf_counter()
        models = self._validated_models()
        n_models = len(models)
        reference = self._validated_reference(n_models)
        self.weights_ = self._validated_weights(n_models)
        self._check_method_params()
        repair = getattr(self, "repair", False)  # absent in mergers pickled before it existed
        if repair and X is None:
            raise ValueError("repair=True needs data: REPAIR measures the activations of the merged "
                             "and the aligned models. Call fit(X), or pass repair=False.")
        if X is None and resolve_combine(getattr(self, "combine", "uniform")) is not None:
            raise ValueError(f"combine={self.combine!r} needs data (the Fisher information or the "
                             "layers' input Gram matrices are measured on it): call fit(X).")
        self.device_ = self._resolved_device()
        loader = as_loader(X, self.batch_size) if X is not None else None
        dtype = _floating_dtype(models[reference])
        # The models are read, never modified: no mode switch, no hook, no move.
        self.timings_ = {}
        batches, example = self._example_and_batches(loader, dtype)
        if isinstance(batches, _Stream):
            batches.key = data_key(X)
        self.spaces_, runner = self._spaces(models[reference], example)
        check_selectors_match(getattr(self, "space_aligners", None), self.spaces_)
        combination = self._start_combination(models, dtype, X, runner)
        self.aligners_ = self._fit_aligners(models, reference, batches, dtype, runner,
                                            combination and combination.stream)
        self._finish_combination(combination, models, loader, dtype)
        return self._build(models, reference, loader, example, X, start)

    def _build(self, models, reference, loader, example, X, start):
        """Average the aligned models into ``merged_model_`` and re-estimate its statistics."""
        repair = getattr(self, "repair", False)
        tick = time.perf_counter()
        # REPAIR needs the aligned states again: transform each model once.
        aligned = list(self._aligned_states(models)) if repair else None
        merged_model = self._merged_module(models, self.weights_, reference, aligned)
        self.timings_["transform"] = time.perf_counter() - tick

        if not repair:
            _warn_soft_plans_without_renormalization(self.aligners_, merged_model)
        tick = time.perf_counter()
        if self.reset_bn and has_batchnorm(merged_model):
            if loader is None:
                warnings.warn(
                    "The models have BatchNorm layers but fit() got no data: the merged model "
                    "keeps the averaged running statistics, which usually do not match its "
                    "activations. Call fit(X) to re-estimate them (or "
                    "skmerge.batchnorm.reset_bn_stats), or pass reset_bn=False to keep them "
                    "knowingly.", UserWarning, stacklevel=3)
            else:
                reset_bn_stats(merged_model, _reread(loader, "re-estimate the BatchNorm statistics"),
                               device=self.device_, verbose=self._show_progress(),
                               exact=self.reset_bn == "exact")
        self.timings_["reset_bn"] = time.perf_counter() - tick
        if repair:
            tick = time.perf_counter()
            self._repair(merged_model, models, aligned, self.weights_, _reread(loader, "apply REPAIR"))
            del aligned
            self.timings_["repair"] = time.perf_counter() - tick
        self.timings_["total"] = time.perf_counter() - start

        self.merged_model_ = merged_model
        self.__dict__.pop("n_features_in_", None)
        # Without data, a merger that takes an example input (weight matching) reads it there.
        source = X if X is not None else getattr(self, "example_input", None)
        if isinstance(source, (torch.Tensor, np.ndarray)) and source.ndim == 2:
            self.n_features_in_ = int(source.shape[1])
        if example is not None:
            self.classes_ = np.arange(self._n_outputs(merged_model, example))
        return self

    # Steps that other mergers (weight matching) replace.
    def _check_method_params(self) -> None:
        self._check_pass_params()
        if not hasattr(self.aligner, "fit_from_stats"):
            raise TypeError(
                f"aligner must be a skmerge aligner with fit_from_stats, got {type(self.aligner).__name__}."
            )
        check_space_aligners(getattr(self, "space_aligners", None))
        resolve_combine(getattr(self, "combine", "uniform"))

    def _start_combination(self, models, dtype, X, runner=None):
        """The combination of a non-uniform ``combine`` about to be fitted (None: uniform).

        Its statistics are reused, as the spaces' statistics are, when the
        same models see the same array or tensor data again (``GridSearchCV``
        over ``combine__alpha`` or the aligner); otherwise, given the
        alignment pass's ``runner``, they are measured inside that pass
        (``stream``).
        """
        self.__dict__.pop("combination_", None)
        combination = resolve_combine(getattr(self, "combine", "uniform"))
        if combination is None:
            return None
        combination = clone(combination)
        model_key, refs = combination_cache.model_key(models)
        data = data_key(X)
        key = None if data is None or is_distributed() else (
            combination.statistics_key(), model_key, data, self._statistics_precision(dtype),
            str(self.device_), self.batch_size)
        cached = combination_cache.get(key) if key is not None else None
        if cached is not None:
            combination.use_statistics(cached)
        stream = combination.stream(self, models, dtype, runner) if cached is None and runner is not None \
            else None
        return _PendingCombination(combination, stream, key, refs, cached is not None)

    def _finish_combination(self, pending, models, loader, dtype) -> None:
        """Set ``combination_``: from the cache, from what the pass streamed, or from a pass of its own.

        The pass of its own is needed when the alignment statistics came from
        the cache (no alignment pass ran) or for :meth:`refit` with new data.
        """
        if pending is None:
            return
        tick = time.perf_counter()
        combination, stream = pending.combination, pending.stream
        if not pending.cached:
            if stream is not None and stream.n_calls:
                stream.finish(self, models, loader, dtype)
            else:
                purpose = f"estimate the statistics of combine={type(combination).__name__}"
                combination.fit_statistics(self, models, _reread(loader, purpose), dtype)
            if pending.key is not None:
                combination_cache.put(pending.key, pending.refs, combination.statistics())
        self.combination_ = combination
        inside = stream.seconds if stream is not None else 0.0
        if "statistics" in self.timings_:
            self.timings_["statistics"] -= inside
        self.timings_["combine"] = inside + time.perf_counter() - tick

    def _fit_combination(self, models, loader, dtype, X=None) -> None:
        """The statistics of a non-uniform ``combine`` on ``X`` in a pass of their own (:meth:`refit`)."""
        self._finish_combination(self._start_combination(models, dtype, X), models, loader, dtype)

    def _refit_combination(self, models, X, dtype) -> None:
        """``combination_`` for :meth:`refit`: the last fit's statistics when they still apply, else ``X``'s."""
        combination = resolve_combine(getattr(self, "combine", "uniform"))
        previous = self.__dict__.pop("combination_", None)
        if combination is None:
            return
        if previous is not None and previous.statistics_key() == combination.statistics_key():
            self.combination_ = clone(combination).use_statistics(previous.statistics())
            self.timings_["combine"] = 0.0
            return
        if X is None:
            raise ValueError(
                f"refit cannot use combine={self.combine!r} without data: the last fit did not "
                f"measure its statistics ({type(combination).__name__} with these parameters). Pass X "
                "to measure them on it, or call fit.")
        self._fit_combination(models, as_loader(X, self.batch_size), dtype, X)

    def _check_pass_params(self) -> None:
        """The parameters of the statistics pass and the BatchNorm reset, shared by every merger."""
        if self.reset_bn not in (True, False, "exact"):
            raise ValueError(f'reset_bn must be True, False or "exact", got {self.reset_bn!r}.')
        if self.precision not in ("auto", "single", "double"):
            raise ValueError(f"precision must be 'auto', 'single' or 'double', got {self.precision!r}.")

    def _example_and_batches(self, loader, dtype):
        """The input batches of the statistics pass and the example that finds the spaces.

        The example is the start of the first batch, read once: a stream that
        can be iterated only once loses no sample.
        """
        if loader is None:
            raise ValueError("ModelMerger.fit needs alignment data X.")
        batches = iter_inputs(loader, self.device_, dtype)
        first = next(batches, None)
        if first is None or len(first) == 0:
            raise ValueError("The alignment data X is empty.")
        return _Stream(itertools.chain([first], batches), _length(loader)), first[:2]

    def _fit_aligners(self, models, reference, batches, dtype, runner, stream=None) -> list[list]:
        """One pass for the statistics (feeding ``stream`` too), then one aligner per (space, model)."""
        tick = time.perf_counter()
        self.statistics_, self.n_samples_seen_ = self._accumulate(
            models, reference, batches, self.spaces_, dtype, runner, stream=stream)
        self.timings_["statistics"] = time.perf_counter() - tick
        return self._resolve(len(models), reference)

    def _resolve(self, n_models: int, reference: int) -> list[list]:
        """The aligners fitted from ``statistics_`` (the step :meth:`refit` repeats)."""
        tick = time.perf_counter()
        aligners = self._solve(self.spaces_, self.statistics_, n_models, reference)
        self.timings_["solve"] = time.perf_counter() - tick
        return aligners

    #: parameters that :meth:`refit` cannot change (the statistics depend on them)
    _refit_frozen = frozenset({"models", "reference", "spaces", "taps", "precision", "device", "batch_size"})

    def refit(self, X=None, **params):
        """Solve the statistics of the last ``fit`` again with other parameters, without a pass.

        The statistics (``statistics_``) do not depend on the aligner: changing
        it, its parameters or the averaging ``weights`` only needs the solve
        and the weight transform. (``fit`` on the same models and data reuses
        the statistics too, which is what makes ``GridSearchCV`` over aligner
        parameters cheap after the first candidate of each fold.)

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader, optional
            Data for the BatchNorm re-estimation (``reset_bn``) and REPAIR
            (``repair``) of the new merged model; without it, BatchNorm layers
            keep the averaged statistics (with a warning) and REPAIR cannot run.
            A ``combine`` whose statistics the last fit did not measure (a
            switch from ``"uniform"`` to ``"regmean"``, another Fisher
            ``random_state``) measures them on ``X``, and needs it.
        **params
            New parameters, as for ``set_params`` (``aligner=``,
            ``aligner__regularization=``, ``weights=``, ``reset_bn=``,
            ``combine__alpha=``, ...). Parameters the statistics depend on
            (``models``, ``reference``, ``spaces``, ``precision``, ``device``,
            ``batch_size``) need ``fit``. The statistics of ``combine`` are
            measured in each model's own basis: they are reused under any
            aligner and weights.

        Raises
        ------
        ValueError
            If a parameter the statistics depend on changes, or ``combine``
            needs statistics that were not measured and ``X`` is None.

        Returns
        -------
        self : ModelMerger
        """
        check_is_fitted(self, "statistics_")
        changed = sorted(k for k in params if k.split("__")[0] in self._refit_frozen)
        if changed:
            raise ValueError(f"refit cannot change {changed}: the statistics depend on them; call fit.")
        self.set_params(**params)
        start = time.perf_counter()
        models = self._validated_models()
        reference = self._validated_reference(len(models))
        self.weights_ = self._validated_weights(len(models))
        self._check_method_params()
        if getattr(self, "repair", False) and X is None:
            raise ValueError("repair=True needs data X: REPAIR measures activations.")
        self.timings_ = {"statistics": 0.0}
        dtype = _floating_dtype(models[reference])
        check_selectors_match(getattr(self, "space_aligners", None), self.spaces_)
        self._refit_combination(models, X, dtype)
        self.aligners_ = self._resolve(len(models), reference)
        loader = as_loader(X, self.batch_size) if X is not None else None
        example = _first_example(loader, self.device_, dtype)
        return self._build(models, reference, loader, example, X, start)

    def _show_progress(self) -> bool:
        # Under torch.distributed only rank 0 draws progress bars.
        return bool(self.verbose) and (not is_distributed() or torch.distributed.get_rank() == 0)

    def _spaces(self, reference_model: nn.Module, example: torch.Tensor | None):
        """The spaces (given or found on the reference) and the runner that observes them."""
        taps = getattr(self, "taps", DEFAULT_TAPS)  # absent in mergers pickled before it existed
        check_taps(taps)
        if self.spaces is not None:
            if taps != DEFAULT_TAPS:
                raise ValueError(f"taps={taps!r} places the taps of the spaces found automatically; "
                                 "spaces given by hand carry their own taps. Pass one or the other.")
            spaces = list(self.spaces)
            runner = runner_for(reference_model, example, spaces) if example is not None else None
        else:
            traced, spaces = analyze(reference_model, example, taps)
            runner = GraphRunner(traced, [t.node for s in spaces for t in s.taps], reference_model)
            if not spaces:
                warnings.warn(f"{type(reference_model).__name__} has no feature space to align: the merge "
                              "is plain averaging of the parameters.", AveragingFallbackWarning,
                              stacklevel=4)
        if self.self_check not in ("auto", True, False):
            raise ValueError(f'self_check must be "auto", True or False, got {self.self_check!r}.')
        if self.self_check is True and runner is None:
            raise ValueError("self_check=True needs an input to run the model: call fit(X).")
        if self.self_check and spaces and runner is not None:
            verify_spaces(runner, reference_model, spaces, example)
        return spaces, runner

    def _statistics_precision(self, dtype: torch.dtype) -> str:
        if self.precision != "auto":
            return self.precision
        return "double" if dtype == torch.float64 else "single"

    @torch.no_grad()
    def _accumulate(self, models, reference, batches, spaces, dtype, runner,
                    statistics_type=ReferenceCovariance, stream=None):
        """One pass over the data through every model, accumulating per-space statistics.

        ``statistics_type(n_views, reference=, precision=)`` makes each
        space's accumulator (the reference-free merger keeps all pairs).
        ``stream`` (a combination's :class:`~skmerge.combine._PassStream`)
        sees the same runs; it gets nothing when the statistics come from
        the cache.
        """
        precision = self._statistics_precision(dtype)
        model_key, refs = statistics_cache.model_key(models)
        data = getattr(batches, "key", None)
        key = None if data is None or is_distributed() else (
            statistics_type, model_key, data, reference, precision, str(self.device_), self.batch_size,
            tuple((s.name, s.dim, tuple(getattr(t, "node", None) or t.module for t in s.taps)) for s in spaces))
        cached = statistics_cache.get(key) if key is not None else None
        if cached is not None:  # the same models on the same data: the pass is done already
            return cached
        statistics = [statistics_type(len(models), reference=reference, precision=precision)
                      for _ in spaces]
        for stats in statistics:
            stats._accumulating = True  # nobody holds a snapshot yet: grow the comoments in place
        taps = taps_by_key(spaces)
        if stream is not None and stream.keys:
            runner = runner.reporting(list(stream.keys))
        tensors = [_tensors_on(model, self.device_) for model in models]
        # The reference first, then the other models one at a time: of a batch, the
        # reference's centered observations are held, and of the model running only its
        # live activations, never every model's.
        order = [reference] + [k for k in range(len(models)) if k != reference]
        n_seen = 0
        progress = tqdm(batches, total=getattr(batches, "total", None), desc="Alignment statistics",
                        disable=not self._show_progress(), leave=False)
        for inputs in progress:
            observer = BatchObserver(statistics, spaces, taps, runner, stream)
            for k in order:
                observer.run(tensors[k], k, inputs)
            observer.commit()
            n_seen += len(inputs)
        for stats in statistics:
            del stats._accumulating
        if n_seen == 0:
            raise ValueError("The alignment data X is empty.")
        statistics = all_reduce_statistics(statistics)
        if is_distributed():
            n_seen = int(all_reduce_sum_(torch.tensor([n_seen], dtype=torch.int64,
                                                      device=self.device_)).item())
        if key is not None:
            statistics_cache.put(key, refs, (statistics, n_seen))
        return statistics, n_seen

    def _solve(self, spaces, statistics, n_models, reference):
        orders = match_heads(spaces, lambda i, k: statistics[i].pair(k), n_models, reference)
        aligners = []
        progress = tqdm(total=len(spaces) * (n_models - 1), desc="Solving",
                        disable=not self._show_progress(), leave=False)
        for space, stats in zip(spaces, statistics):
            row = []
            for k in range(n_models):
                if k == reference:
                    row.append(None)
                    continue
                row.append(self._fit_space(space, stats.pair(k), orders.get((space.block_family, k))))
                progress.update()
            aligners.append(row)
        progress.close()
        return aligners

    def _fit_space(self, space: Space, pair: CrossCovariance, order=None):
        """Fit one clone of the space's aligner per block (blocks matched by ``order``)."""
        if not space.taps:
            warnings.warn(f"Space {space.name!r} is never observed; it keeps each model's basis.",
                          stacklevel=3)
            return None
        chosen = aligner_for(space, getattr(self, "space_aligners", None), self.aligner)
        aligner = self._small_sample_safe(clone(chosen), space, pair.n_samples_)
        if space.orthogonal:
            aligner = orthogonal_aligner(aligner, space)
        if space.block_size == space.dim:
            return aligner.fit_from_stats(pair)
        return BlockAligner(aligner, space.block_size, order).fit_from_stats(pair)

    def _small_sample_safe(self, aligner, space: Space, n_samples: int):
        # Same threshold as CCAAligner's own SmallSampleWarning; the merger names
        # the space and regularizes instead of fitting a singular covariance.
        if n_samples >= 2 * space.dim:
            return aligner
        message = (f"Space {space.name!r} has dimension {space.dim} but only {n_samples} "
                   "samples were seen; its covariances are (nearly) singular.")
        if aligner.get_params(deep=False).get("regularization", None) == 0:
            warnings.warn(f"{message} Using regularization='auto' (OAS shrinkage) for it; pass "
                          "more alignment data or set the aligner's regularization.",
                          SmallSampleMergeWarning, stacklevel=4)
            return aligner.set_params(regularization="auto")
        warnings.warn(f"{message} Pass more alignment data.", SmallSampleMergeWarning, stacklevel=4)
        return aligner

    def _repair(self, merged_model: nn.Module, models, aligned_states, weights, data) -> None:
        """REPAIR ``merged_model`` in place against the models' features in the reference's basis.

        After permutations the aligned states compute the models' features
        exactly: they are the targets. A dense map does not commute with the
        nonlinearities, so a model with transformed weights computes other
        features than it was trained to; the targets are then the models as
        trained, each output mapped into the reference's basis.
        """
        transforms = [[_transform_of(row[k]) for row in self.aligners_] for k in range(len(models))]
        if any(isinstance(t, tuple) for row in transforms for t in row):
            targets = [copy.deepcopy(model).eval() for model in models]  # copies: the inputs are never hooked
            maps = [channel_maps_of(model, self.spaces_, row) for model, row in zip(models, transforms)]
        else:
            targets, maps = [], None
            for state in aligned_states:
                model = copy.deepcopy(merged_model)
                model.load_state_dict(state)
                targets.append(model.eval())
        repair_(merged_model, targets, weights, data, batch_size=self.batch_size, device=self.device_,
                spaces=self.spaces_, channel_maps=maps, verbose=self._show_progress())

    def _transform_precision(self, models) -> str:
        """Products with dense maps in float32 for float32 models (``precision``), else float64.

        ``models`` are the validated models (not checked again: that reads every tensor).
        """
        if not hasattr(self, "precision"):  # mergers without statistics: permutations only
            return "double"
        return self._statistics_precision(_floating_dtype(models[0]))

    def _operations(self, k: int) -> list:
        return normalize_transforms(self.spaces_, [_transform_of(row[k]) for row in self.aligners_])

    def _aligned_states(self, models):
        """Yield each model's state_dict expressed in the reference's feature basis."""
        precision = self._transform_precision(models)
        for k, model in enumerate(models):
            state = {key: value.to(self.device_) for key, value in model.state_dict().items()}
            transforms = [_transform_of(row[k]) for row in self.aligners_]
            yield apply_transforms(state, self.spaces_, transforms, precision=precision)

    def _merged_module(self, models, weights, reference: int, aligned_states=None) -> nn.Module:
        """The merged network (a module of the reference's architecture holding the averaged state)."""
        state = self._averaged_state(models, weights, reference, aligned_states)
        return _module_with_state(models[reference], state, self.device_)

    def _averaged_state(self, models, weights, reference: int, aligned_states=None) -> dict:
        """The combined aligned states (``combine``; computed from ``models`` when not given)."""
        combination = getattr(self, "combination_", None)
        if combination is not None:
            return combination.merged_state(self, models, weights, reference, aligned_states)
        return self._uniform_state(models, weights, reference, aligned_states)

    def _uniform_state(self, models, weights, reference: int, aligned_states=None) -> dict:
        """The weighted mean of the aligned states, one tensor at a time.

        Each tensor of each model is transformed and added to the mean before
        the next one is touched, so the extra memory is the merged state and
        one tensor, not one aligned state per model.
        """
        if aligned_states is not None:
            states = [dict(state) for state in aligned_states]
            entries = [{} for _ in models]
        else:
            states = [model.state_dict() for model in models]
            entries = [slices_by_tensor(self.spaces_, self._operations(k)) for k in range(len(models))]
        precision = self._transform_precision(models)
        merged = {}
        for key, value in states[reference].items():
            if not value.is_floating_point():  # integer buffers (num_batches_tracked): the reference's
                merged[key] = value.to(self.device_, copy=True)
                continue
            total = None
            for weight, state, todo in zip(weights, states, entries):
                tensor = state[key].to(self.device_)
                if key in todo:
                    tensor = transform_tensor(tensor, todo[key], precision).mul_(float(weight))
                else:
                    tensor = tensor * float(weight)  # a new tensor, never the model's own
                if total is None:
                    total = tensor
                else:
                    total += tensor
                del tensor
            merged[key] = total
        return merged

    def aligned_state_dicts(self) -> list[dict]:
        """Each source model's ``state_dict`` expressed in the reference's feature basis.

        The averaged ``merged_model_`` is their weighted mean; interpolating
        between two of them traces the linear path *after* alignment.

        Returns
        -------
        list of dict
            One new ``state_dict`` per model, on ``device_`` (the reference's
            is a copy of its own).
        """
        check_is_fitted(self, "merged_model_")
        return list(self._aligned_states(self._validated_models()))

    def merge_with_weights(self, weights, X=None) -> nn.Module:
        """Build a merged model from the fitted alignment with other averaging weights.

        Reuses the fitted aligners (no new pass for statistics), so sweeping
        weights, e.g. along the interpolation path between two models, costs
        one weight transform (and one BatchNorm pass) per point.

        Parameters
        ----------
        weights : array-like of shape (n_models,)
            Non-negative averaging weights, normalized to sum to one.
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader, optional
            Data to re-estimate the BatchNorm statistics on (when the model has
            BatchNorm and ``reset_bn`` is True); the averaged statistics are
            kept when None. With ``repair=True`` it is required: REPAIR then
            corrects the new model's activation statistics towards the
            interpolation, with these weights, of the aligned models'.

        Returns
        -------
        torch.nn.Module
            A new model in evaluation mode on ``device_``.

        Raises
        ------
        ValueError
            If the weights are invalid, or ``repair=True`` and ``X`` is None.
        """
        check_is_fitted(self, "merged_model_")
        models = self._validated_models()
        weights = _normalized_weights(weights, len(models))
        repair = getattr(self, "repair", False)
        if repair and X is None:
            raise ValueError("This merger has repair=True: merge_with_weights needs data X to "
                             "repair the new model (REPAIR measures activations).")
        aligned = list(self._aligned_states(models)) if repair else None
        state = self._averaged_state(models, weights, self._validated_reference(len(models)), aligned)
        model = copy.deepcopy(self.merged_model_)
        model.load_state_dict(state)
        if X is not None and self.reset_bn and has_batchnorm(model):
            reset_bn_stats(model, X, batch_size=self.batch_size, device=self.device_,
                           exact=self.reset_bn == "exact")
        if repair:
            self._repair(model, models, aligned, weights, X)
        return model.eval()

    @staticmethod
    @torch.no_grad()
    def _n_outputs(model, example) -> int:
        output = model(example)
        if not isinstance(output, torch.Tensor) or output.ndim < 2:
            return 1
        return int(output.shape[-1])

    # --------------------------------------------------------------- inference
    # ------------------------------------------------------------- persistence
    def __getstate__(self):
        # Modules go to the CPU so that a merger saved on a GPU machine loads on
        # a CPU-only one (aligners and statistics move their own tensors);
        # __setstate__ moves the merged model back to its device when it can.
        state = self.__dict__.copy()
        if "merged_model_" in state:
            state["merged_model_"] = _on_cpu(state["merged_model_"])
        models = state.get("models")
        if isinstance(models, (list, tuple)) and any(
            isinstance(m, nn.Module) and _module_device(m).type != "cpu" for m in models
        ):
            state["models"] = type(models)(_on_cpu(m) for m in models)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        device = getattr(self, "device_", None)
        if device is not None and device.type == "cuda" and not torch.cuda.is_available():
            self.device_ = torch.device("cpu")
        if hasattr(self, "merged_model_"):
            self.merged_model_.to(self.device_)


@dataclasses.dataclass
class _PendingCombination:
    """A combination being fitted: its stream in the alignment pass, its cache key, whether it was cached."""

    combination: object
    stream: object
    key: tuple | None
    refs: object
    cached: bool


def _transform_of(aligner):
    """The transform that :func:`skmerge.graph.apply_transforms` applies for one fitted aligner."""
    if aligner is None:
        return None
    permutation = getattr(aligner, "permutation_", None)
    if permutation is not None:
        permutation = torch.as_tensor(permutation)
        if bool((permutation >= 0).all()):
            return permutation.long()
    return torch.as_tensor(aligner.mapping_), torch.as_tensor(aligner.inverse_mapping_)


def _normalized_weights(weights, n_models: int) -> np.ndarray:
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (n_models,):
        raise ValueError(
            f"weights must have one entry per model ({n_models}), got shape {weights.shape}."
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(
            f"weights must be finite, non-negative and sum to a positive value, got {weights}."
        )
    return weights / weights.sum()


class _Stream:
    """Input batches read once, with their number when known (progress bars).

    ``key`` identifies the data's content when it is an array or a tensor
    (statistics of the same models on the same data are reused).
    """

    def __init__(self, iterator, total):
        self.iterator, self.total, self.key = iterator, total, None

    def __iter__(self):
        return self.iterator


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a == b or (a.type == b.type == "cuda" and (a.index is None or b.index is None))


def _tensors_on(model: nn.Module, device: torch.device) -> dict:
    """The model's parameters and buffers by name, on ``device`` (moved copies only where needed)."""
    return {name: t if _same_device(t.device, device) else t.to(device)
            for name, t in model_tensors(model).items()}


def _floating_dtype(model: nn.Module) -> torch.dtype:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _module_with_state(model: nn.Module, state: dict, device: torch.device) -> nn.Module:
    """A new module of ``model``'s architecture on ``device`` holding ``state``, in eval mode.

    Built from a structural copy holding the tensors of ``state`` themselves
    (no copy): tied weights stay tied, buffers outside the state_dict are
    copied from ``model``.
    """
    new = meta_copy(model)
    new.load_state_dict(state, assign=True)  # the merged tensors themselves, no copy
    _retie(new, model)
    persistent = set(state)
    for name, buffer in model.named_buffers():
        if name not in persistent:  # non-persistent buffers (masks, position ids): the model's
            owner, _, attr = name.rpartition(".")
            new.get_submodule(owner).register_buffer(attr, buffer.to(device, copy=True), persistent=False)
    return new.to(device).eval()


def _retie(new: nn.Module, model: nn.Module) -> None:
    """Share ``new``'s parameters as ``model`` shares its own (``to_empty`` unties them)."""
    first: dict = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in first:
            first[id(param)] = name
            continue
        owner, _, attr = name.rpartition(".")
        source_owner, _, source_attr = first[id(param)].rpartition(".")
        tied = getattr(new.get_submodule(source_owner), source_attr)
        setattr(new.get_submodule(owner), attr, tied)


def _first_example(loader, device, dtype):
    """The start of the first batch (None without data)."""
    if loader is None:
        return None
    first = next(iter_inputs(loader, device, dtype), None)
    return None if first is None else first[:2]


def _reread(loader, purpose: str):
    """``loader`` for a second pass; a one-shot stream, already exhausted, cannot give one."""
    if loader is not None and next(iter(loader), None) is None:
        raise ValueError(f"The alignment data can be read only once (a stream that is not re-iterable), "
                         f"but fit needs a second pass to {purpose}: pass a tensor, an array, a Dataset "
                         "or a re-iterable DataLoader, or turn the option off.")
    return loader


def _on_cpu(model: nn.Module) -> nn.Module:
    return model if _module_device(model).type == "cpu" else copy.deepcopy(model).cpu()


def _module_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
