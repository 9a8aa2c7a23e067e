"""Numbers behind the diagnostic plots of a fitted :class:`~skmerge.ModelMerger`.

Three diagnostics, each a plain function returning a ``dict`` of numpy arrays
and floats (no matplotlib needed; :mod:`skmerge.plotting` draws them):

* :func:`correlation_summary` -- per feature space, how concentrated each
  reference neuron's match is: its top-1 and top-2 correlations with the other
  model's neurons next to the top-1 and top-2 coefficients of the alignment
  mapping (Horoi et al., ICML 2024: features are spread over several neurons,
  which a permutation cannot express).
* :func:`interpolation_path` -- accuracy and loss along the straight line
  between the reference model and another model in weight space, before and
  after alignment (linear mode connectivity; the "barrier").
* :func:`summarize_results` -- mean and standard deviation of a metric per
  aligner and number of merged models, from a flat list of benchmark records.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance
from sklearn.utils.validation import check_is_fitted
from torch.utils.data import DataLoader, Dataset

from ._batches import as_loader, split_batch
from .batchnorm import has_batchnorm, reset_bn_stats

__all__ = [
    "correlation_matrix",
    "correlation_summary",
    "interpolation_path",
    "summarize_results",
    "loss_barrier",
]


# --------------------------------------------------------------------------
# argument checks shared by the diagnostics


def _check_merger(merger) -> None:
    if not (hasattr(merger, "models") and hasattr(merger, "get_params")):
        raise TypeError(
            f"expected a fitted skmerge.ModelMerger, got {type(merger).__name__}."
        )
    check_is_fitted(merger, ["statistics_", "aligners_", "spaces_"])


def _n_models(merger) -> int:
    return len(merger.aligners_[0]) if merger.aligners_ else len(merger.models)


def _reference(merger) -> int:
    if merger.statistics_:
        return int(merger.statistics_[0].reference)
    return int(merger.reference)


def _resolve_model(merger, model: int | None) -> int:
    """Index of the non-reference model (the first one when ``model`` is None)."""
    n_models, reference = _n_models(merger), _reference(merger)
    if model is None:
        return 1 if reference == 0 else 0
    if isinstance(model, bool) or not isinstance(model, numbers.Integral):
        raise TypeError(f"model must be an int, got {model!r}.")
    if not 0 <= model < n_models:
        raise ValueError(f"model={model} is out of range for {n_models} models.")
    if model == reference:
        raise ValueError(
            f"model={model} is the reference model; pick another model (the reference is "
            "compared with itself, which is trivially perfect)."
        )
    return int(model)


def _resolve_space(merger, space: int) -> int:
    n_spaces = len(merger.spaces_)
    if isinstance(space, bool) or not isinstance(space, numbers.Integral):
        raise TypeError(f"space must be an int index into merger.spaces_, got {space!r}.")
    if not -n_spaces <= space < n_spaces:
        raise ValueError(f"space={space} is out of range: the merger has {n_spaces} spaces.")
    return int(space) % n_spaces


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def _mapping(merger, space: int, model: int) -> np.ndarray:
    aligner = merger.aligners_[space][model]
    name = merger.spaces_[space].name
    if aligner is None:
        raise ValueError(
            f"space {space} ({name!r}) has no fitted aligner for model {model} (it is never "
            "observed, so every model keeps its own basis)."
        )
    mapping = getattr(aligner, "mapping_", None)
    if mapping is None:
        raise TypeError(
            f"the aligner of space {space} ({name!r}), a {type(aligner).__name__}, has no "
            "mapping_ matrix; correlation_summary needs an aligner with mapping_ (CCAAligner, "
            "PermutationAligner, IdentityAligner)."
        )
    return _numpy(mapping)


# --------------------------------------------------------------------------
# correlations vs mapping coefficients


def correlation_matrix(merger, space: int, model: int | None = None) -> np.ndarray:
    """Pearson correlations between a model's neurons and the reference's, from the statistics.

    No new pass over data: ``corr = S_xy / sqrt(diag(S_xx) diag(S_yy)^T)`` with
    the covariances accumulated during ``fit`` (``X``: ``model``, ``Y``: the
    reference). Pairs involving a zero-variance neuron (dead unit) get 0.

    Parameters
    ----------
    merger : skmerge.ModelMerger
        A fitted merger.
    space : int
        Index into ``merger.spaces_``.
    model : int, optional
        Model compared with the reference; the first non-reference model by
        default (1 when ``reference=0``).

    Returns
    -------
    numpy.ndarray of shape (d, d)
        ``corr[i, j]``: neuron ``i`` of ``model`` vs neuron ``j`` of the
        reference.
    """
    _check_merger(merger)
    space = _resolve_space(merger, space)
    model = _resolve_model(merger, model)
    return _correlations(merger, space, model)[0]


def _correlations(merger, space: int, model: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correlation matrix, standard deviations of ``model``'s and of the reference's neurons)."""
    pair = merger.statistics_[space].pair(model)
    s_xy = _numpy(pair.covariance_xy())
    std_x = np.sqrt(np.clip(np.diag(_numpy(pair.covariance_xx())), 0.0, None))
    std_y = np.sqrt(np.clip(np.diag(_numpy(pair.covariance_yy())), 0.0, None))
    scale = np.outer(std_x, std_y)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(scale > 0, s_xy / np.where(scale > 0, scale, 1.0), 0.0)
    return np.clip(corr, -1.0, 1.0), std_x, std_y


def _top2(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Largest and second largest entry of every column (second is 0 with one row)."""
    if values.shape[0] < 2:
        return values.max(axis=0), np.zeros(values.shape[1])
    part = -np.partition(-values, 1, axis=0)
    return part[0], part[1]


def correlation_summary(
    merger,
    space: int,
    model: int | None = None,
    *,
    absolute: bool = True,
    standardize: bool = True,
    normalize: str = "l2",
) -> dict[str, Any]:
    """Top-1/top-2 correlations of each reference neuron vs top-1/top-2 mapping coefficients.

    For every neuron ``j`` of the reference model in one feature space:

    * **correlations** -- the largest and second largest ``|corr[i, j]|`` over
      the other model's neurons ``i`` (see :func:`correlation_matrix`). If
      features correspond one to one, the top-1 is high and the top-2 low.
    * **coefficients** -- column ``j`` of the fitted aligner's ``mapping_``,
      i.e. how reference feature ``j`` is rebuilt from the other model's
      neurons (``transform(X)[:, j] = X @ mapping_[:, j]``); its largest and
      second largest absolute entries after normalization. One dominant
      coefficient means a one-to-one match; several comparable ones mean the
      feature is spread over several neurons (Horoi et al., ICML 2024, whose
      figures show exactly these four distributions).

    The coefficients are made comparable across neurons and with the
    correlations: with ``standardize`` each row ``i`` is multiplied by the
    standard deviation of neuron ``i`` (the mapping between standardized
    features; otherwise a neuron that happens to fire at a small scale gets a
    large coefficient for the same contribution, and ReLU networks can rescale
    neurons freely), then each column is divided by its L2 norm
    (``normalize="l2"``: values in [0, 1], top-1 = 1 and top-2 = 0 exactly for a
    permutation, top-1 = top-2 = 1/sqrt(2) for an even mix of two neurons) or
    by its largest absolute value (``normalize="max"``: top-1 is always 1, only
    top-2 carries information).

    Parameters
    ----------
    merger : skmerge.ModelMerger
        A fitted merger. Everything comes from ``statistics_`` and
        ``aligners_``: no new pass over data.
    space : int
        Index into ``merger.spaces_`` (negative values count from the end).
    model : int, optional
        Model compared with the reference; the first non-reference model by
        default (1 when ``reference=0``).
    absolute : bool, default=True
        Rank correlations by absolute value (a strongly anti-correlated neuron
        is as informative for a linear mapping as a correlated one); signed
        correlations (what a permutation can exploit) when False.
    standardize : bool, default=True
        Express the mapping between standardized neurons before normalizing.
    normalize : {"l2", "max"}, default="l2"
        Normalization of each mapping column.

    Returns
    -------
    dict
        ``space`` (int), ``space_name`` (str), ``model``, ``reference`` (int),
        ``aligner`` (class name), ``correlations`` and ``coefficients``
        (``(d, d)`` arrays: signed correlations and normalized signed
        coefficients, other model's neurons in rows, reference neurons in
        columns), ``reference_neurons`` (indices of the reference neurons
        with non-zero variance; dead units have nothing to match and are left
        out of the distributions), ``top1_correlation``, ``top2_correlation``,
        ``top1_coefficient``, ``top2_coefficient`` (arrays with one value per
        reference neuron of ``reference_neurons``), ``wasserstein_top1`` and
        ``wasserstein_top2`` (floats: 1-Wasserstein distance between the
        correlation and coefficient distributions, with
        :func:`scipy.stats.wasserstein_distance`).

    Raises
    ------
    ValueError
        If ``space`` or ``model`` is out of range, ``model`` is the reference,
        or the space has no fitted aligner.
    TypeError
        If the space's aligner has no ``mapping_``.

    Examples
    --------
    >>> summary = correlation_summary(merger, space=0)  # doctest: +SKIP
    >>> summary["top1_correlation"].mean(), summary["wasserstein_top1"]  # doctest: +SKIP
    """
    _check_merger(merger)
    if normalize not in ("l2", "max"):
        raise ValueError(f"normalize must be 'l2' or 'max', got {normalize!r}.")
    space = _resolve_space(merger, space)
    model = _resolve_model(merger, model)
    mapping = _mapping(merger, space, model)
    corr, std_x, std_y = _correlations(merger, space, model)
    if mapping.shape != corr.shape:
        raise ValueError(
            f"mapping_ of space {space} has shape {mapping.shape}, but the statistics have "
            f"{corr.shape}."
        )

    coefficients = mapping * std_x[:, None] if standardize else mapping.copy()
    if normalize == "l2":
        norms = np.linalg.norm(coefficients, axis=0)
    else:
        norms = np.abs(coefficients).max(axis=0)
    coefficients = np.divide(coefficients, norms, out=np.zeros_like(coefficients),
                             where=norms > 0)

    # Dead reference neurons (zero variance on the alignment data) have nothing
    # to match: they are left out of the distributions.
    alive = np.flatnonzero(std_y > 0)
    if not len(alive):
        raise ValueError(f"every reference neuron of space {space} ({merger.spaces_[space].name!r}) "
                         "has zero variance on the alignment data.")
    top1_corr, top2_corr = _top2((np.abs(corr) if absolute else corr)[:, alive])
    top1_coef, top2_coef = _top2(np.abs(coefficients)[:, alive])
    return {
        "space": space,
        "space_name": merger.spaces_[space].name,
        "model": model,
        "reference": _reference(merger),
        "aligner": type(merger.aligners_[space][model]).__name__,
        "absolute": bool(absolute),
        "standardize": bool(standardize),
        "normalize": normalize,
        "reference_neurons": alive,
        "correlations": corr,
        "coefficients": coefficients,
        "top1_correlation": top1_corr,
        "top2_correlation": top2_corr,
        "top1_coefficient": top1_coef,
        "top2_coefficient": top2_coef,
        "wasserstein_top1": float(wasserstein_distance(top1_corr, top1_coef)),
        "wasserstein_top2": float(wasserstein_distance(top2_corr, top2_coef)),
    }


# --------------------------------------------------------------------------
# interpolation path


def loss_barrier(alphas, values, *, higher_is_better: bool = False) -> float:
    """Largest gap between a path and the straight line joining its end points.

    For a loss, ``max_a [L(a) - ((1 - a) L(0) + a L(1))]`` (Frankle et al. 2020,
    Entezari et al. 2022); for an accuracy (``higher_is_better=True``),
    ``max_a [((1 - a) A(0) + a A(1)) - A(a)]``. It is 0 at the end points, so
    the barrier is never negative: 0 means the path is at least as good as
    the chord everywhere (linear mode connectivity).

    Parameters
    ----------
    alphas : array-like of shape (n_points,)
        Increasing positions in [0, 1], starting at 0 and ending at 1.
    values : array-like of shape (n_points,)
        The metric at each position.
    higher_is_better : bool, default=False
        True for accuracies.

    Returns
    -------
    float
    """
    alphas = np.asarray(alphas, dtype=float)
    values = np.asarray(values, dtype=float)
    chord = (1 - alphas) * values[0] + alphas * values[-1]
    gap = chord - values if higher_is_better else values - chord
    return float(max(gap.max(), 0.0))


def _interpolated(state_a: dict, state_b: dict, alpha: float) -> dict:
    # Integer buffers (num_batches_tracked) come from the reference end.
    return {
        key: torch.lerp(a, state_b[key].to(a.dtype), alpha) if a.is_floating_point() else a.clone()
        for key, a in state_a.items()
    }


@torch.no_grad()
def _accuracy_and_loss(model, loader, device, dtype) -> tuple[float, float, int]:
    correct, total_loss, seen = 0, 0.0, 0
    for batch in loader:
        inputs, labels = split_batch(batch)
        if labels is None:
            raise ValueError("interpolation_path needs labels: pass y_eval, or X_eval "
                             "yielding (x, y) batches.")
        inputs = torch.as_tensor(inputs)
        inputs = inputs.to(device, dtype) if inputs.is_floating_point() else inputs.to(device)
        labels = torch.as_tensor(labels).to(device).long()
        logits = model(inputs).to(torch.float64)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
        seen += len(labels)
    if seen == 0:
        raise ValueError("X_eval is empty.")
    return correct / seen, total_loss / seen, seen


def interpolation_path(
    merger,
    X_eval,
    y_eval=None,
    *,
    model: int | None = None,
    n_points: int = 11,
    X_bn=None,
    reset_bn: bool | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Accuracy and loss along the linear path from the reference to another model.

    The parameters ``theta(alpha) = (1 - alpha) theta_ref + alpha theta_model``
    are evaluated at ``n_points`` evenly spaced ``alpha`` in [0, 1] twice:

    * **before** alignment: the raw ``state_dict`` of both source models
      (plain weight interpolation, the classic barrier of independently
      trained networks);
    * **after** alignment: ``model``'s weights expressed in the reference's
      feature basis by the fitted aligners (:meth:`ModelMerger.aligned_state_dicts`),
      whatever the aligner. At ``alpha = 0.5`` with two models this is the
      merged model.

    At ``alpha = 0`` both curves are the reference model. At ``alpha = 1`` the
    before curve is ``model`` itself; the after curve is ``model`` after
    alignment, which computes the same function for a permutation but not in
    general for CCA (a non-permutation mapping does not commute with the
    nonlinearity).

    With BatchNorm the running statistics are re-estimated at *every* point,
    end points included, so that all points are treated alike (interpolated
    statistics do not describe interpolated weights).

    Parameters
    ----------
    merger : skmerge.ModelMerger
        A fitted merger (any aligner).
    X_eval : torch.Tensor, numpy.ndarray, Dataset or DataLoader
        Evaluation inputs, or a dataset/loader of ``(x, y)`` batches.
    y_eval : array-like of shape (n_samples,), optional
        Labels of array or tensor ``X_eval``.
    model : int, optional
        The other end of the path; the first non-reference model by default.
    n_points : int, default=11
        Number of points, at least 2 (``alphas = linspace(0, 1, n_points)``).
    X_bn : torch.Tensor, numpy.ndarray, Dataset or DataLoader, optional
        Data to re-estimate BatchNorm statistics on at each point (e.g. the
        alignment or training data). When the model has BatchNorm and this is
        None, ``X_eval`` is used and a ``UserWarning`` says so (the labels are
        never used, but the test inputs then shape the statistics).
    reset_bn : bool, optional
        Re-estimate BatchNorm statistics; ``merger.reset_bn`` by default.
        Ignored for models without BatchNorm.
    batch_size : int, optional
        Batch size of the passes; ``merger.batch_size`` by default.

    Returns
    -------
    dict
        ``alphas``, ``accuracy_before``, ``loss_before``, ``accuracy_after``,
        ``loss_after`` (arrays of shape ``(n_points,)``; loss is the mean
        cross-entropy), ``loss_barrier_before``, ``loss_barrier_after``,
        ``accuracy_barrier_before``, ``accuracy_barrier_after`` (floats, see
        :func:`loss_barrier`), ``reference``, ``model`` (ints), ``aligner``
        (class name of ``merger.aligner``), ``bn_reset`` (bool) and
        ``n_samples`` (evaluation samples).

    Raises
    ------
    ValueError
        If ``model`` is out of range or the reference, ``n_points < 2``, or the
        data have no labels.
    """
    _check_merger(merger)
    check_is_fitted(merger, "merged_model_")
    model = _resolve_model(merger, model)
    reference = _reference(merger)
    if isinstance(n_points, bool) or not isinstance(n_points, numbers.Integral) or n_points < 2:
        raise ValueError(f"n_points must be an int >= 2, got {n_points!r}.")
    if y_eval is not None and isinstance(X_eval, (Dataset, DataLoader)):
        raise ValueError("y_eval is only for array or tensor X_eval; a Dataset or DataLoader "
                         "must yield (x, y) batches.")
    batch_size = int(batch_size or merger.batch_size)
    device = merger.device_
    work = copy.deepcopy(merger.merged_model_).to(device).eval()
    dtype = next(work.parameters()).dtype
    bn_reset = has_batchnorm(work) and (merger.reset_bn if reset_bn is None else bool(reset_bn))
    if bn_reset and X_bn is None:
        warnings.warn(
            "The model has BatchNorm and no X_bn was given: BatchNorm statistics are "
            "re-estimated on X_eval at each point. Pass X_bn (e.g. the alignment data) to keep "
            "the evaluation inputs out of them.", UserWarning, stacklevel=2)
        X_bn = X_eval
    loader = as_loader(X_eval, batch_size, y=y_eval)

    sources = merger.models
    raw = [{key: value.detach().to(device) for key, value in sources[k].state_dict().items()}
           for k in (reference, model)]
    aligned_all = merger.aligned_state_dicts()
    aligned = [aligned_all[reference], aligned_all[model]]

    alphas = np.linspace(0.0, 1.0, int(n_points))
    result: dict[str, Any] = {"alphas": alphas}
    n_seen = 0
    for curve, (start, end) in (("before", raw), ("after", aligned)):
        accuracy, loss = np.empty(len(alphas)), np.empty(len(alphas))
        for i, alpha in enumerate(alphas):
            work.load_state_dict(_interpolated(start, end, float(alpha)))
            if bn_reset:
                reset_bn_stats(work, X_bn, batch_size=batch_size, device=device)
            accuracy[i], loss[i], n_seen = _accuracy_and_loss(work.eval(), loader, device, dtype)
        result[f"accuracy_{curve}"] = accuracy
        result[f"loss_{curve}"] = loss
        result[f"loss_barrier_{curve}"] = loss_barrier(alphas, loss)
        result[f"accuracy_barrier_{curve}"] = loss_barrier(alphas, accuracy, higher_is_better=True)
    result.update(reference=reference, model=model, aligner=type(merger.aligner).__name__,
                  bn_reset=bool(bn_reset), n_samples=n_seen)
    return result


# --------------------------------------------------------------------------
# accuracy vs number of merged models


def _records(results) -> list[Mapping]:
    """Rows of ``results``: a sequence of mappings, a dict of columns, or a DataFrame."""
    if hasattr(results, "to_dict") and not isinstance(results, Mapping):  # pandas.DataFrame
        return list(results.to_dict("records"))
    if isinstance(results, Mapping):
        columns = {key: list(np.atleast_1d(np.asarray(value, dtype=object)))
                   for key, value in results.items()}
        lengths = {len(value) for value in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"the columns of results have different lengths: {sorted(lengths)}.")
        n = lengths.pop() if lengths else 0
        return [{key: value[i] for key, value in columns.items()} for i in range(n)]
    if isinstance(results, Iterable) and not isinstance(results, (str, bytes)):
        rows = list(results)
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TypeError(f"results[{i}] is a {type(row).__name__}, not a mapping (dict).")
        return rows
    raise TypeError("results must be a list of dicts, a dict of columns or a pandas DataFrame, "
                    f"got {type(results).__name__}.")


def summarize_results(results, metric: str = "accuracy") -> dict[str, dict[str, np.ndarray]]:
    """Mean and standard deviation of a metric per aligner and number of merged models.

    Parameters
    ----------
    results : list of dict, dict of columns, or pandas.DataFrame
        One record per merge, with at least the keys ``"aligner"`` (str: a
        label such as ``"CCA"`` or ``"Permutation"``; baselines like
        ``"ensemble"`` are just more labels), ``"n_models"`` (int) and
        ``metric`` (float). Other keys (``"seed"``, ``"dataset"``, ...) are
        ignored; repeated ``(aligner, n_models)`` records are repeats. The same
        data as a dict of equal-length columns or a DataFrame also works.
    metric : str, default="accuracy"
        The key to summarize (e.g. ``"loss"``).

    Returns
    -------
    dict
        ``{aligner: {"n_models", "mean", "std", "count"}}`` in order of first
        appearance, each an array sorted by ``n_models``. ``std`` is the sample
        standard deviation over repeats (``ddof=1``), 0 for a single record.

    Raises
    ------
    ValueError
        If a record lacks a key, or a value is not finite.
    """
    rows = _records(results)
    if not rows:
        raise ValueError("results is empty.")
    groups: dict[str, dict[int, list[float]]] = {}
    for i, row in enumerate(rows):
        for key in ("aligner", "n_models", metric):
            if key not in row:
                raise ValueError(f"results[{i}] has no {key!r} key (keys: {sorted(row)}).")
        value, n_models = float(row[metric]), row["n_models"]
        if not np.isfinite(value):
            raise ValueError(f"results[{i}][{metric!r}] is not finite: {row[metric]!r}.")
        if float(n_models) != int(n_models):
            raise ValueError(f"results[{i}]['n_models'] must be an integer, got {n_models!r}.")
        groups.setdefault(str(row["aligner"]), {}).setdefault(int(n_models), []).append(value)
    summary = {}
    for aligner, by_n in groups.items():
        ns = sorted(by_n)
        values = [np.asarray(by_n[n]) for n in ns]
        summary[aligner] = {
            "n_models": np.asarray(ns, dtype=int),
            "mean": np.array([v.mean() for v in values]),
            "std": np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]),
            "count": np.array([len(v) for v in values], dtype=int),
        }
    return summary
