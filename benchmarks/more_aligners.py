"""Merged accuracy of every aligner on the embedded digits data.

Trains ``4 * repeats`` small MLPs (``get_model("mlp", in_features=64,
num_classes=10, hidden=(64, 64))``, 40 epochs, one seed each) on
``load_digits("train")``, exactly like ``tests/test_merge.py``, and merges
the first 2 and all 4 models of each group of four with every aligner:
Identity, Permutation, CCA (the core aligners) next to Procrustes and
optimal transport. Each cell is the test accuracy of the merged model
(``load_digits("test")``, 599 images), mean and min..max over the groups;
``solve`` is the mean time spent fitting the aligners of one merge
(``ModelMerger.timings_["solve"]``). Run (under a minute on one CPU core)::

    python benchmarks/more_aligners.py

It prints the table and writes it to ``docs/_generated/more_aligners.txt``,
which docs/user_guide/more_aligners.rst includes verbatim.
"""

from __future__ import annotations

from _common import emit_table, mean_range, train_digits_mlps  # first: sets OMP_WAIT_POLICY

import argparse
import os
import time
import warnings

import numpy as np
import torch

from skmerge import ModelMerger
from skmerge.aligners import (
    CCAAligner,
    IdentityAligner,
    OptimalTransportAligner,
    PermutationAligner,
    ProcrustesAligner,
)
from skmerge.datasets import load_digits
from skmerge.training import ensemble_accuracy, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "_generated", "more_aligners.txt")

ALIGNERS = [
    ("IdentityAligner()", IdentityAligner()),
    ("PermutationAligner()", PermutationAligner()),
    ("CCAAligner()  [regularization=0.3]", CCAAligner()),
    ("ProcrustesAligner()", ProcrustesAligner()),
    ("ProcrustesAligner(scale=False)", ProcrustesAligner(scale=False)),
    ('OptimalTransportAligner(reg="exact")', OptimalTransportAligner(reg="exact")),
    ("OptimalTransportAligner(reg=0.01)", OptimalTransportAligner(reg=0.01)),
    ("OptimalTransportAligner()  [reg=0.05]", OptimalTransportAligner()),
    ("OptimalTransportAligner(reg=0.2)", OptimalTransportAligner(reg=0.2)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="groups of 4 models (default 3)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--output", default=OUTPUT, help="where to write the table ('' to skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small matrices: threads only add overhead
    start = time.perf_counter()
    train, test = load_digits("train"), load_digits("test")
    inputs, _ = train.tensors
    groups = [train_digits_mlps(range(4 * r, 4 * r + 4), train, args.epochs)
              for r in range(args.repeats)]

    sizes = (2, 4)
    accuracy = {(name, n): [] for name, _ in ALIGNERS for n in sizes}
    solve = {name: [] for name, _ in ALIGNERS}
    iterations = {name: [] for name, _ in ALIGNERS}
    warned = {name: 0 for name, _ in ALIGNERS}
    base = [evaluate(m, test)["accuracy"] for group in groups for m in group]
    ensemble = {n: [ensemble_accuracy(group[:n], test) for group in groups] for n in sizes}
    for group in groups:
        for n in sizes:
            for name, aligner in ALIGNERS:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    merger = ModelMerger(group[:n], aligner, device="cpu").fit(inputs)
                warned[name] += sum(1 for w in caught if "converge" in str(w.message))
                accuracy[name, n].append(merger.score(*test.tensors))
                solve[name].append(merger.timings_["solve"])
                iterations[name] += [int(getattr(a, "n_iter_", 0)) for row in merger.aligners_
                                     for a in row if a is not None]

    width = max(len(name) for name, _ in ALIGNERS)
    header = (f"{'aligner':<{width}} | {'2 models':^21} | {'4 models':^21} | "
              f"{'solve':>8} | {'Sinkhorn it.':>12}")
    lines = [
        f"digits MLP 64-64-64-10, {args.epochs} epochs; merged test accuracy, mean (min..max) "
        f"over {args.repeats} groups of 4 models",
        "",
        header,
        "-" * len(header),
    ]
    for name, _ in ALIGNERS:
        its = iterations[name]
        its_text = f"{int(np.mean(its)):>5} max {max(its):>5}" if "OptimalTransport" in name and \
            "exact" not in name else "-"
        lines.append(
            f"{name:<{width}} | {mean_range(accuracy[name, 2]):>21} | {mean_range(accuracy[name, 4]):>21} | "
            f"{1000 * np.mean(solve[name]):6.1f}ms | {its_text:>12}"
        )
    lines += [
        "-" * len(header),
        f"{'base models (each alone)':<{width}} | {mean_range(base):>21} |",
        f"{'ensemble (mean softmax)':<{width}} | {mean_range(ensemble[2]):>21} | {mean_range(ensemble[4]):>21} |",
        "",
        "solve: mean time to fit all aligners of one merge (CPU); Sinkhorn it.: mean and max",
        "iterations per merge point.",
        "ConvergenceWarnings (Sinkhorn stopped at max_iter): "
        + (", ".join(f"{name} {count} of {len(iterations[name])} fits"
                     for name, count in warned.items() if count) or "none")
        + ".",
    ]
    emit_table("\n".join(lines), args.output, time.perf_counter() - start)


if __name__ == "__main__":
    main()
