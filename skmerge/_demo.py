"""The experiment behind ``skmerge demo``: train, ensemble, merge, tabulate.

Kept apart from :mod:`skmerge.cli` (argument parsing and errors) so that the
experiment can be run and tested from Python, and its numbers checked
against an independent recomputation.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ALIGNERS", "DEMO_ALIGNERS", "DEMO_DEFAULTS", "DemoResult", "DemoRow", "format_table",
           "make_aligner", "run_demo", "save_plot"]

#: Aligner names accepted by the command line, in the order they are shown.
#: Aligners the demo compares by default.
DEMO_ALIGNERS = ("identity", "permutation", "cca")
#: Every aligner the command line can build.
ALIGNERS = DEMO_ALIGNERS + ("procrustes", "ot")

#: Per-architecture defaults of the demo on digits (8x8 images), chosen so that
#: one model trains in a second or two on 2 CPU cores and the base models
#: reach about 96-99 % test accuracy. The MLP is the default: with three
#: hidden layers, plain averaging collapses to chance, permutation matching
#: loses about ten points and CCA Merge stays at the base models' accuracy.
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": dict(width=1.0, epochs=40, kwargs=dict(hidden=(64, 64, 64))),
    "vgg11": dict(width=0.25, epochs=10, kwargs={}),
    "vgg16": dict(width=0.25, epochs=10, kwargs={}),
    "resnet20": dict(width=1.0, epochs=10, kwargs={}),
    "resnet18": dict(width=0.25, epochs=10, kwargs=dict(stem="cifar")),
    "vit": dict(width=0.5, epochs=60, kwargs=dict(patch_size=4, depth=2)),
}


@dataclass
class DemoRow:
    """One line of the demo table.

    Attributes
    ----------
    n_models : int
        Models involved: 1 for a base model, else the number ensembled or merged.
    method : str
        ``"base"``, ``"ensemble"`` or ``"merge"``.
    label : str
        Text of the method column (``"base model, seed 0"``, ``"merge, cca"``).
    accuracy : float
        Test accuracy in [0, 1].
    seconds : float or None
        Merge time (``ModelMerger.timings_["total"]``) for merges, else None.
    aligner : str or None
        Aligner name for merges.
    """

    n_models: int
    method: str
    label: str
    accuracy: float
    seconds: float | None = None
    aligner: str | None = None


@dataclass
class DemoResult:
    """Everything ``skmerge demo`` measured.

    Attributes
    ----------
    rows : list of DemoRow
        Base models, then per number of models the ensemble and the merges.
    settings : dict
        Model name, width, epochs, seeds, data set sizes and thread count.
    models : list of torch.nn.Module
        The trained base models (in seed order).
    train_seconds : float
        Wall time spent training.
    total_seconds : float
        Wall time of the whole run.
    """

    rows: list[DemoRow] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    models: list[Any] = field(default_factory=list)
    train_seconds: float = 0.0
    total_seconds: float = 0.0


def make_aligner(name: str, regularization: float | str | None = None):
    """Build an aligner from its command-line name.

    Parameters
    ----------
    name : {"identity", "permutation", "cca", "procrustes", "ot"}
        Aligner name ("ot": :class:`~skmerge.OptimalTransportAligner`).
    regularization : float, "auto" or None, default=None
        CCA shrinkage; None keeps :class:`~skmerge.CCAAligner`'s default.

    Returns
    -------
    estimator
        A new, unfitted aligner.
    """
    from .aligners import (CCAAligner, IdentityAligner, OptimalTransportAligner,
                           PermutationAligner, ProcrustesAligner)

    if name == "cca":
        return CCAAligner() if regularization is None else CCAAligner(regularization=regularization)
    if regularization is not None:
        raise ValueError(f"regularization applies to the cca aligner only, not {name!r}")
    if name == "permutation":
        return PermutationAligner()
    if name == "identity":
        return IdentityAligner()
    if name == "procrustes":
        return ProcrustesAligner()
    if name == "ot":
        return OptimalTransportAligner()
    raise ValueError(f"unknown aligner {name!r}; choose from {', '.join(ALIGNERS)}")


def run_demo(
    model: str = "mlp",
    n_models: int = 4,
    *,
    width: float | None = None,
    epochs: int | None = None,
    aligners: Sequence[str] = DEMO_ALIGNERS,
    seed: int = 0,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Train ``n_models`` models on digits, ensemble them and merge them.

    Models are trained with seeds ``seed, seed + 1, ...`` on the training
    split of :func:`skmerge.datasets.load_digits`; the first two, then all of
    them, are merged with every aligner (aligned on the training images) and
    everything is scored on the test images.

    Parameters
    ----------
    model : str, default="mlp"
        A name from :func:`skmerge.models.available_models`.
    n_models : int, default=4
        Number of base models (at least 2).
    width : float, optional
        Width multiplier; per-model default from :data:`DEMO_DEFAULTS`.
    epochs : int, optional
        Training epochs; per-model default from :data:`DEMO_DEFAULTS`.
    aligners : sequence of str, default=("identity", "permutation", "cca")
        Aligners to merge with, by name.
    seed : int, default=0
        Seed of the first model.
    device : str, default="auto"
        Where to train and merge (``"auto"``: CUDA when available).
    log : callable, optional
        Receives one progress message at a time (the CLI prints them on
        stderr).

    Returns
    -------
    DemoResult
    """
    start = time.perf_counter()  # the imports below take a second or two: count them
    import torch

    from .datasets import dataset_info, load_digits
    from .merge import ModelMerger
    from .models import get_model
    from .training import ensemble_accuracy, evaluate, train_models

    say = log or (lambda message: None)
    if n_models < 2:
        raise ValueError(f"the demo needs at least 2 models, got {n_models}")
    defaults = DEMO_DEFAULTS.get(model, dict(width=1.0, epochs=10, kwargs={}))
    width = defaults["width"] if width is None else width
    epochs = defaults["epochs"] if epochs is None else epochs
    info = dataset_info("digits")
    arch = dict(defaults["kwargs"], in_channels=info["in_channels"],
                image_size=info["image_size"], num_classes=info["num_classes"], width=width)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                       else ("cpu" if device == "auto" else device))
    train, test = load_digits("train"), load_digits("test")
    seeds = [seed + i for i in range(n_models)]
    result = DemoResult(settings=dict(
        model=model, width=width, epochs=epochs, seeds=seeds, arch_kwargs=defaults["kwargs"],
        n_train=len(train), n_test=len(test), threads=torch.get_num_threads(),
        device=str(dev)))

    models = []
    for i, s in enumerate(seeds):
        tick = time.perf_counter()
        say(f"training {model} {i + 1}/{n_models} (seed {s}, {epochs} epochs) ...")
        # train_models seeds the initialization too, so seed s gives the same
        # model here as in `skmerge train --seed s`.
        (trained,) = train_models(lambda: get_model(model, **arch), train, 1, seeds=[s],
                                  epochs=epochs, device=dev)
        models.append(trained)
        accuracy = evaluate(trained, test)["accuracy"]
        result.rows.append(DemoRow(1, "base", f"base model, seed {s}", accuracy))
        say(f"  test accuracy {accuracy:.4f} ({time.perf_counter() - tick:.1f} s)")
    result.models = models
    result.train_seconds = time.perf_counter() - start

    alignment = train.tensors[0]
    for k in sorted({2, n_models}):
        subset = models[:k]
        result.rows.append(DemoRow(k, "ensemble", "ensemble", ensemble_accuracy(subset, test)))
        for name in aligners:
            say(f"merging {k} models with {name} ...")
            merger = ModelMerger(subset, make_aligner(name), device=dev).fit(alignment)
            accuracy = evaluate(merger.merged_model_, test)["accuracy"]
            seconds = merger.timings_["total"]
            result.rows.append(DemoRow(k, "merge", f"merge, {name}", accuracy, seconds, name))
            say(f"  test accuracy {accuracy:.4f} ({seconds:.2f} s)")
    result.total_seconds = time.perf_counter() - start
    return result


def _describe(settings: dict[str, Any]) -> str:
    extra = ", ".join(f"{k} {'-'.join(map(str, v)) if isinstance(v, tuple) else v}"
                      for k, v in settings["arch_kwargs"].items())
    return f"{settings['model']} ({extra + ', ' if extra else ''}width {settings['width']:g})"


def format_table(result: DemoResult) -> str:
    """Render a demo result as the text table ``skmerge demo`` prints.

    Parameters
    ----------
    result : DemoResult
        Output of :func:`run_demo`.

    Returns
    -------
    str
        A header, one row per :class:`DemoRow` (columns: models, method,
        test accuracy in [0, 1], merge time) and a summary, ending in a
        newline.
    """
    s = result.settings
    lines = [
        f"{len(s['seeds'])} x {_describe(s)}, {s['epochs']} epochs each, on digits "
        f"({s['n_train']} training / {s['n_test']} test images).",
        "Merged on the training images, scored on the test images; merging 2 uses "
        "the first two models.",
        "",
    ]
    header = ("models", "method", "test accuracy", "merge time")
    body = [(str(r.n_models), r.label, f"{r.accuracy:.4f}",
             "-" if r.seconds is None else f"{r.seconds:.2f} s") for r in result.rows]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]

    def line(cells):
        return (f"{cells[0]:>{widths[0]}}  {cells[1]:<{widths[1]}}  "
                f"{cells[2]:>{widths[2]}}  {cells[3]:>{widths[3]}}").rstrip()

    lines += [line(header), line(["-" * w for w in widths])]
    previous = None
    for row, cells in zip(result.rows, body):
        if previous is not None and row.n_models != previous:
            lines.append("")  # one block per number of models
        previous = row.n_models
        lines.append(line(cells))
    base = [r.accuracy for r in result.rows if r.method == "base"]
    spread = statistics.stdev(base) if len(base) > 1 else 0.0
    lines += [
        "",
        f"Base models: mean {statistics.fmean(base):.4f} +- {spread:.4f} (std). "
        "The ensemble runs every model; a merged model is one model.",
        f"Wall time {result.total_seconds:.1f} s (training {result.train_seconds:.1f} s), "
        f"{s['threads']} CPU thread{'s' if s['threads'] != 1 else ''}"
        f"{'' if s['device'] == 'cpu' else ', device ' + s['device']}.",
    ]
    return "\n".join(lines) + "\n"


def save_plot(result: DemoResult, path: str) -> None:
    """Draw test accuracy against the number of merged models, per aligner.

    Uses :func:`skmerge.plotting.plot_accuracy_vs_models`; the ensemble is one
    more line and the base models' mean a horizontal reference.

    Parameters
    ----------
    result : DemoResult
        Output of :func:`run_demo`.
    path : str
        Image file; the format follows the extension (``.png``, ``.pdf``,
        ``.svg``, ...).

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    """
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # files only, also on machines without a display
    import matplotlib.pyplot as plt

    from .plotting import plot_accuracy_vs_models

    records = [{"aligner": r.aligner or r.method, "n_models": r.n_models,
                "accuracy": r.accuracy} for r in result.rows if r.method != "base"]
    base = [r.accuracy for r in result.rows if r.method == "base"]
    fig = plot_accuracy_vs_models(records, baselines={"base models (mean)": statistics.fmean(base)})
    ax = fig.axes[0]
    ax.set_title(f"skmerge demo: {_describe(result.settings)} on digits", fontsize="medium")
    ax.set_ylabel("test accuracy")
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
