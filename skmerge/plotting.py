"""Diagnostic figures for model merging (needs the optional matplotlib extra).

Install with ``pip install skmerge[plot]``. The numbers are computed by
:mod:`skmerge.diagnostics` (importable without matplotlib); this module only
draws them:

* :func:`plot_correlation_distributions` -- per feature space, top-1/top-2
  correlations of each reference neuron next to the top-1/top-2 coefficients of
  the alignment mapping;
* :func:`plot_interpolation` -- accuracy and loss along the linear path between
  two models, before and after alignment, with the barrier heights;
* :func:`plot_accuracy_vs_models` -- accuracy against the number of merged
  models, one curve per aligner.

Every function returns the :class:`matplotlib.figure.Figure` it drew on and
accepts existing axes to draw into.
"""

from __future__ import annotations

try:
    import matplotlib  # noqa: F401  (a clear error when the extra is missing)
    import matplotlib.pyplot as plt
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "skmerge.plotting needs matplotlib, an optional dependency: install it with "
        "`pip install skmerge[plot]` (or `pip install matplotlib`). The numbers behind the "
        "plots are available without it in skmerge.diagnostics."
    ) from error

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .diagnostics import (
    _check_merger,
    _mapping,
    _resolve_model,
    _resolve_space,
    correlation_summary,
    interpolation_path,
    summarize_results,
)

__all__ = [
    "plot_correlation_distributions",
    "plot_interpolation",
    "plot_accuracy_vs_models",
]

_TOP1, _TOP2 = "C0", "C1"


def _axes_grid(axes, n_rows: int, n_cols: int, figsize) -> tuple[Any, np.ndarray]:
    """(figure, axes of shape (n_rows, n_cols)) from user axes or a new figure."""
    if axes is None:
        fig, grid = plt.subplots(n_rows, n_cols, figsize=figsize, squeeze=False,
                                 constrained_layout=True)
        return fig, grid
    flat = np.asarray(axes, dtype=object).reshape(-1)
    if flat.size != n_rows * n_cols:
        raise ValueError(f"axes must hold {n_rows * n_cols} Axes ({n_rows} x {n_cols}), "
                         f"got {flat.size}.")
    return flat[0].figure, flat.reshape(n_rows, n_cols)


# --------------------------------------------------------------------------
# correlation distributions


def _default_spaces(merger, model: int) -> list[int]:
    spaces = []
    for index in range(len(merger.spaces_)):
        try:
            _mapping(merger, index, model)
        except (ValueError, TypeError):
            continue
        spaces.append(index)
    if not spaces:
        raise ValueError(f"no feature space has an aligner with a mapping_ for model {model}.")
    return spaces


def plot_correlation_distributions(
    merger,
    spaces: int | Sequence[int] | None = None,
    model: int | None = None,
    *,
    axes=None,
    bins: int = 20,
    absolute: bool = True,
    standardize: bool = True,
    normalize: str = "l2",
):
    """Histograms of top-1/top-2 correlations and top-1/top-2 mapping coefficients per space.

    One row per feature space. Left: for each reference neuron, its largest
    and second largest (absolute) correlation with the other model's neurons.
    Right: the largest and second largest normalized absolute coefficients of
    the column of ``mapping_`` that rebuilds that reference neuron. The title
    of the right panel gives the Wasserstein distances between the
    correlation and coefficient distributions (top-1 and top-2). All numbers
    come from :func:`skmerge.diagnostics.correlation_summary`.

    How to read it: if features matched one to one, top-1 correlations would
    be near 1 and top-2 near 0, and a permutation would be the right
    alignment. Top-2 correlations close to the top-1 ones mean each reference
    feature is spread over several neurons of the other model; a CCA mapping
    then spreads its coefficients too (top-2 coefficient well above 0).

    Parameters
    ----------
    merger : skmerge.ModelMerger
        A fitted merger.
    spaces : int or sequence of int, optional
        Indices into ``merger.spaces_``; by default every space with a fitted
        mapping for ``model``.
    model : int, optional
        Model compared with the reference; the first non-reference model by
        default.
    axes : array-like of matplotlib Axes, optional
        ``2 * n_spaces`` axes (shape ``(n_spaces, 2)`` or flat, row by row) to
        draw into; a new figure when None.
    bins : int, default=20
        Number of histogram bins over [0, 1] ([-1, 1] for signed correlations
        with negative values).
    absolute, standardize, normalize
        Passed to :func:`~skmerge.diagnostics.correlation_summary`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    _check_merger(merger)
    model = _resolve_model(merger, model)
    if spaces is None:
        indices = _default_spaces(merger, model)
    else:
        requested = [spaces] if np.ndim(spaces) == 0 else list(spaces)
        indices = [_resolve_space(merger, s) for s in requested]
        if not indices:
            raise ValueError("spaces is empty.")
    summaries = [correlation_summary(merger, s, model, absolute=absolute,
                                     standardize=standardize, normalize=normalize)
                 for s in indices]
    fig, grid = _axes_grid(axes, len(indices), 2, (9.0, 2.4 * len(indices) + 0.4))
    labels = ("top-1", "top-2")
    for summary, (ax_corr, ax_coef) in zip(summaries, grid):
        tops = summary["top1_correlation"], summary["top2_correlation"]
        low = -1.0 if min(t.min() for t in tops) < 0 else 0.0
        edges = np.linspace(low, 1.0, int(bins) + 1)
        ax_corr.hist(list(tops), bins=edges, color=[_TOP1, _TOP2], label=labels)
        kind = "|correlation|" if summary["absolute"] else "correlation"
        ax_corr.set_title(f"{summary['space_name']}: {kind}", fontsize="medium")
        ax_corr.set_ylabel("reference neurons")

        coefficient_edges = np.linspace(0.0, 1.0, int(bins) + 1)
        ax_coef.hist([summary["top1_coefficient"], summary["top2_coefficient"]],
                     bins=coefficient_edges, color=[_TOP1, _TOP2], label=labels)
        ax_coef.set_title(
            f"{summary['aligner']} |coefficient|  (W1: top-1 {summary['wasserstein_top1']:.2f}, "
            f"top-2 {summary['wasserstein_top2']:.2f})", fontsize="medium")
        for ax in (ax_corr, ax_coef):
            ax.legend(fontsize="small")
    grid[-1, 0].set_xlabel(f"correlation with model {summaries[0]['model']}'s neurons")
    grid[-1, 1].set_xlabel(f"normalized mapping coefficient ({summaries[0]['normalize']})")
    return fig


# --------------------------------------------------------------------------
# interpolation path

_PATH_KEYS = ("alphas", "accuracy_before", "loss_before", "accuracy_after", "loss_after")


def plot_interpolation(path_or_merger, X_eval=None, y_eval=None, *, axes=None, **kwargs):
    """Accuracy and loss along the linear path between two models, before and after alignment.

    Two panels (accuracy, loss), each with a dashed curve *before* alignment
    (plain interpolation of the raw weights) and a solid curve *after*
    alignment, and thin dotted chords joining each curve's end points. The
    legend gives each curve's barrier: the largest drop below its chord
    (:func:`skmerge.diagnostics.loss_barrier`). A high barrier before and a
    flat curve after alignment mean the aligner found the correspondence
    between the two networks (linear mode connectivity after alignment).

    Parameters
    ----------
    path_or_merger : dict or skmerge.ModelMerger
        The output of :func:`skmerge.diagnostics.interpolation_path`, or a
        fitted merger (the path is then computed on ``X_eval``/``y_eval``).
    X_eval, y_eval
        Evaluation data, only with a merger.
    axes : sequence of two matplotlib Axes, optional
        Where to draw accuracy and loss; a new figure when None.
    **kwargs
        Passed to :func:`~skmerge.diagnostics.interpolation_path` (``model``,
        ``n_points``, ``X_bn``, ``reset_bn``, ``batch_size``), only with a
        merger.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(path_or_merger, Mapping):
        if X_eval is not None or y_eval is not None or kwargs:
            raise TypeError("X_eval, y_eval and path options are only accepted with a merger; "
                            "a path dict is already computed.")
        missing = [key for key in _PATH_KEYS if key not in path_or_merger]
        if missing:
            raise ValueError(f"the path dict lacks {missing}; pass the output of "
                             "skmerge.diagnostics.interpolation_path.")
        path = path_or_merger
    else:
        if X_eval is None:
            raise ValueError("plot_interpolation needs X_eval (and labels) with a merger.")
        path = interpolation_path(path_or_merger, X_eval, y_eval, **kwargs)

    fig, grid = _axes_grid(axes, 1, 2, (9.0, 3.4))
    alphas = np.asarray(path["alphas"], dtype=float)
    aligner = path.get("aligner", "aligned")
    for ax, metric in zip(grid[0], ("accuracy", "loss")):
        for curve, style, color, name in (("before", "--", "0.45", "before alignment"),
                                          ("after", "-", "C2", f"after alignment ({aligner})")):
            values = np.asarray(path[f"{metric}_{curve}"], dtype=float)
            barrier = path.get(f"{metric}_barrier_{curve}")
            label = name if barrier is None else f"{name}, barrier {barrier:.3f}"
            ax.plot(alphas, values, style, color=color, marker="o", markersize=3, label=label)
            ax.plot(alphas[[0, -1]], values[[0, -1]], ":", color=color, linewidth=1,
                    label=f"_chord {curve}")
        ax.set_ylabel("accuracy" if metric == "accuracy" else "loss (cross-entropy)")
        ax.set_xlim(0, 1)
        ax.legend(fontsize="small")
    reference, model = path.get("reference", 0), path.get("model", 1)
    for ax in grid[0]:
        ax.set_xlabel(f"alpha  (0: model {reference}, reference;  1: model {model})")
    title = "Linear interpolation"
    if path.get("bn_reset"):
        title += " (BatchNorm statistics re-estimated at each point)"
    grid[0, 0].set_title(title, fontsize="medium", loc="left")
    return fig


# --------------------------------------------------------------------------
# accuracy vs number of merged models


def plot_accuracy_vs_models(results, ax=None, *, metric: str = "accuracy",
                            baselines: Mapping[str, float] | None = None):
    """A metric of the merged model against the number of merged models, per aligner.

    One line per aligner through the mean over repeats, with error bars of one
    standard deviation (see :func:`skmerge.diagnostics.summarize_results`).

    Parameters
    ----------
    results : list of dict, dict of columns, or pandas.DataFrame
        Records with keys ``"aligner"``, ``"n_models"`` and ``metric``, e.g.
        ``[{"aligner": "CCA", "n_models": 2, "accuracy": 0.95, "seed": 0}, ...]``
        as written by a benchmark script; repeats of one ``(aligner,
        n_models)`` give the error bars.
    ax : matplotlib Axes, optional
        Where to draw; a new figure when None.
    metric : str, default="accuracy"
        The record key to plot.
    baselines : dict of str to float, optional
        Horizontal reference lines, e.g. ``{"base models (mean)": 0.96}``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    summary = summarize_results(results, metric=metric)
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    else:
        fig = ax.figure
    for aligner, row in summary.items():
        ax.errorbar(row["n_models"], row["mean"], yerr=row["std"], marker="o", capsize=3,
                    label=aligner)
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax.axhline(float(value), linestyle=":", color=f"C{(len(summary) + i) % 10}", label=name)
    ticks = sorted({int(n) for row in summary.values() for n in row["n_models"]})
    ax.set_xticks(ticks)
    ax.set_xlabel("number of merged models")
    ax.set_ylabel(metric)
    ax.legend(fontsize="small")
    return fig
