"""Regenerate the figures of docs/user_guide/diagnostics.rst on the digits data.

Trains small models on scikit-learn's digits (embedded, nothing downloaded),
merges them and draws the three diagnostic plots of :mod:`skmerge.plotting`:

* ``docs/_generated/diagnostics_correlations.png`` -- top-1/top-2 correlations
  vs CCA coefficients per hidden layer of two MLPs;
* ``docs/_generated/diagnostics_interpolation.png`` -- the linear path between
  two MLPs (permutation and CCA alignment) and two VGG11-BN nets
  (permutation, BatchNorm re-estimated at each point);
* ``docs/_generated/diagnostics_accuracy_vs_models.png`` (and the records it
  plots, ``diagnostics_accuracy_vs_models.json``) -- merged accuracy vs number
  of merged MLPs per aligner, mean +- std over random subsets of a pool.

Run from the repository root (about a minute on two CPU cores)::

    pip install -e .[plot]
    python benchmarks/diagnostics_figures.py

The numbers quoted in the user guide are the ones this script prints; its
two tables are written as ``docs/_generated/diagnostics_interpolation.inc``
and ``docs/_generated/diagnostics_accuracy_vs_models.inc``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from skmerge import CCAAligner, IdentityAligner, ModelMerger, PermutationAligner  # noqa: E402
from skmerge.datasets import load_digits  # noqa: E402
from skmerge.diagnostics import (  # noqa: E402
    correlation_summary,
    interpolation_path,
    summarize_results,
)
from skmerge.models import get_model  # noqa: E402
from skmerge.plotting import (  # noqa: E402
    plot_accuracy_vs_models,
    plot_correlation_distributions,
    plot_interpolation,
)
from skmerge.training import ensemble_accuracy, evaluate, train_models  # noqa: E402

from _common import rst_table  # noqa: E402  (benchmarks/, next to this script)

OUT = Path(__file__).resolve().parents[1] / "docs" / "_generated"
ALIGNERS = {"Identity": IdentityAligner, "Permutation": PermutationAligner, "CCA": CCAAligner}


def mlp():
    return get_model("mlp", in_features=64, num_classes=10, hidden=(128, 128, 128))


def vgg():
    return get_model("vgg11", in_channels=1, num_classes=10, width=0.25, image_size=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=8, help="MLPs trained for the n-models plot")
    parser.add_argument("--repeats", type=int, default=3, help="random subsets per n_models")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the models are tiny: one thread is fastest)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    train, test = load_digits("train"), load_digits("test")
    x_train = train.tensors[0]
    mlps = train_models(mlp, train, args.pool, epochs=20, batch_size=64)
    base = [evaluate(m, test)["accuracy"] for m in mlps]
    print(f"{args.pool} MLPs 64-128-128-128-10: test accuracy {np.mean(base):.4f} "
          f"(min {min(base):.4f}, max {max(base):.4f})  [{time.perf_counter() - start:.0f} s]")

    # 1. Correlations vs CCA coefficients, models 0 and 1.
    cca = ModelMerger(mlps[:2], CCAAligner()).fit(x_train)
    fig = plot_correlation_distributions(cca)
    fig.savefig(args.out / "diagnostics_correlations.png", dpi=110)
    print("\ncorrelations (|corr|) vs CCA coefficients (std-scaled, L2-normalized), means:")
    for index in range(len(cca.spaces_)):
        s = correlation_summary(cca, index)
        print(f"  {s['space_name']:<12} corr top1 {s['top1_correlation'].mean():.3f} "
              f"top2 {s['top2_correlation'].mean():.3f} | coef top1 "
              f"{s['top1_coefficient'].mean():.3f} top2 {s['top2_coefficient'].mean():.3f} | "
              f"W1 top1 {s['wasserstein_top1']:.3f} top2 {s['wasserstein_top2']:.3f} "
              f"({len(s['reference_neurons'])} live reference neurons)")

    # 2. Interpolation paths.
    vggs = train_models(vgg, train, 2, epochs=10, batch_size=64)
    print(f"\n2 VGG11-BN (width 0.25): test accuracy "
          f"{[round(evaluate(m, test)['accuracy'], 4) for m in vggs]}")
    rows = [("MLP", ModelMerger(mlps[:2], PermutationAligner()).fit(x_train), None),
            ("MLP", cca, None),
            ("VGG11-BN", ModelMerger(vggs, PermutationAligner()).fit(x_train), x_train)]
    fig, axes = plt.subplots(len(rows), 2, figsize=(9.5, 3.0 * len(rows)), constrained_layout=True)
    print("\ninterpolation (test set, 11 points):")
    table = []
    for (name, merger, x_bn), row in zip(rows, axes):
        path = interpolation_path(merger, *test.tensors, X_bn=x_bn)
        plot_interpolation(path, axes=row)
        row[0].set_title(f"{name}, {path['aligner']}" + (" (BatchNorm re-estimated)"
                                                          if path["bn_reset"] else ""),
                         fontsize="medium", loc="left")
        mid = len(path["alphas"]) // 2
        print(f"  {name:<9} {path['aligner']:<19} accuracy at alpha=0.5: before "
              f"{path['accuracy_before'][mid]:.4f}, after {path['accuracy_after'][mid]:.4f} | "
              f"loss barrier before {path['loss_barrier_before']:.3f}, after "
              f"{path['loss_barrier_after']:.3f} | accuracy barrier before "
              f"{path['accuracy_barrier_before']:.3f}, after {path['accuracy_barrier_after']:.3f} | "
              f"alpha=1: model {path['accuracy_before'][-1]:.4f}, aligned model "
              f"{path['accuracy_after'][-1]:.4f}")
        table.append([name, f"``{path['aligner']}``",
                      f"{path['accuracy_before'][mid]:.3f} -> {path['accuracy_after'][mid]:.3f}",
                      f"{path['loss_barrier_before']:.3f} -> {path['loss_barrier_after']:.3f}",
                      f"{path['accuracy_after'][-1]:.3f} / {path['accuracy_before'][-1]:.3f}"])
    fig.savefig(args.out / "diagnostics_interpolation.png", dpi=110)
    (args.out / "diagnostics_interpolation.inc").write_text(rst_table(
        ["models", "aligner", "accuracy at alpha = 0.5 (before -> after)", "loss barrier (before -> after)",
         "alpha = 1: aligned model / model"], table))

    # 3. Accuracy vs number of merged models: random subsets of the pool.
    rng = np.random.default_rng(0)
    records = []
    for n_models in range(2, min(6, args.pool) + 1):
        for repeat in range(args.repeats):
            subset = sorted(rng.choice(args.pool, size=n_models, replace=False).tolist())
            models = [mlps[i] for i in subset]
            for label, aligner in ALIGNERS.items():
                merger = ModelMerger(models, aligner()).fit(x_train)
                records.append({"aligner": label, "n_models": n_models, "repeat": repeat,
                                "models": subset, "accuracy": merger.score(*test.tensors)})
            records.append({"aligner": "ensemble", "n_models": n_models, "repeat": repeat,
                            "models": subset, "accuracy": ensemble_accuracy(models, test)})
    with open(args.out / "diagnostics_accuracy_vs_models.json", "w") as f:
        json.dump(records, f, indent=1)
    fig = plot_accuracy_vs_models(records, baselines={"base models (mean)": float(np.mean(base))})
    fig.savefig(args.out / "diagnostics_accuracy_vs_models.png", dpi=110)
    print("\nmerged accuracy (mean +- std over random subsets):")
    summary = summarize_results(records)
    for label, row in summary.items():
        cells = "  ".join(f"{n}: {m:.3f}+-{s:.3f}"
                          for n, m, s in zip(row["n_models"], row["mean"], row["std"]))
        print(f"  {label:<12} {cells}")
    sizes = next(iter(summary.values()))["n_models"]
    (args.out / "diagnostics_accuracy_vs_models.inc").write_text(rst_table(
        ["aligner", *(f"{n} models" for n in sizes)],
        [[label, *(f"{m:.3f} ± {s:.3f}" for m, s in zip(row["mean"], row["std"]))]
         for label, row in summary.items()]))
    print(f"\nwrote {args.out}/diagnostics_*.png in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
