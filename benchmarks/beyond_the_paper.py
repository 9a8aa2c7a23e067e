"""Weight matching and hierarchical merging next to all-to-one merging, on digits MLPs.

Trains 4 small MLPs (``get_model("mlp", in_features=64, num_classes=10,
hidden=(64, 64))``, 40 epochs, seeds 0-3) on ``load_digits("train")``, exactly
like ``tests/test_merge.py``, and merges 2 and 4 of them:

* all-to-one with ``ModelMerger`` and the Identity, Permutation and CCA
  aligners (alignment data: the training inputs), and with
  ``WeightMatchingMerger`` (no data), once per choice of the reference;
* ``hierarchical_merge`` with CCA and Permutation, once per pairing of the
  leaves (the left model of each pair is its reference).

Each cell is the test accuracy of the merged model (``load_digits("test")``,
599 images), mean (min..max): for 2 models over the 6 pairs of the 4 models
and both references (orders), for 4 models over the 4 references (all-to-one)
or the 3 pairings (hierarchical). Run (well under 2 minutes on one CPU
core)::

    python benchmarks/beyond_the_paper.py

It prints the table and writes it to ``docs/_generated/beyond_the_paper.txt``,
which docs/user_guide/beyond.rst includes verbatim.
"""

from __future__ import annotations

from _common import emit_table, mean_range, train_digits_mlps  # first: sets OMP_WAIT_POLICY

import argparse
import itertools
import os
import time

import torch

from skmerge import ModelMerger
from skmerge.aligners import CCAAligner, IdentityAligner, PermutationAligner
from skmerge.datasets import load_digits
from skmerge.hierarchical import hierarchical_merge
from skmerge.training import ensemble_accuracy, evaluate
from skmerge.weight_matching import WeightMatchingMerger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "_generated", "beyond_the_paper.txt")
N_MODELS = 4

ALL_TO_ONE = [
    ("all-to-one  IdentityAligner()", IdentityAligner()),
    ("all-to-one  PermutationAligner()", PermutationAligner()),
    ("all-to-one  CCAAligner()", CCAAligner()),
    ("all-to-one  WeightMatchingMerger()  [no data]", None),
]
HIERARCHICAL = [
    ("hierarchical  CCAAligner()", CCAAligner()),
    ("hierarchical  PermutationAligner()", PermutationAligner()),
]


def all_to_one(models, aligner, reference: int, inputs, test) -> float:
    if aligner is None:
        merger = WeightMatchingMerger(models, reference=reference, example_input=inputs[:2],
                                      device="cpu", random_state=0).fit()
    else:
        merger = ModelMerger(models, aligner, reference=reference, device="cpu").fit(inputs)
    return merger.score(*test.tensors)


def hierarchical(models, aligner, inputs, test) -> float:
    _, mergers = hierarchical_merge(models, inputs, aligner, device="cpu")
    return mergers[-1][0].score(*test.tensors)


def pairings(n: int) -> list[list[int]]:
    """Orders of range(n) giving distinct trees: [0, 1, 2, 3], [0, 2, 1, 3], [0, 3, 1, 2] for 4."""
    if n == 2:
        return [[0, 1]]
    return [[0, j] + [i for i in range(1, n) if i != j] for j in range(1, n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--output", default=OUTPUT, help="where to write the table ('' to skip)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small matrices: threads only add overhead
    start = time.perf_counter()
    train, test = load_digits("train"), load_digits("test")
    inputs, _ = train.tensors
    models = train_digits_mlps(range(N_MODELS), train, args.epochs)

    pairs = list(itertools.permutations(range(N_MODELS), 2))  # 6 pairs x 2 orders
    accuracy = {}
    for name, aligner in ALL_TO_ONE:
        # 2 models: the first of each ordered pair is the reference
        accuracy[name, 2] = [all_to_one([models[a], models[b]], aligner, 0, inputs, test)
                             for a, b in pairs]
        accuracy[name, 4] = [all_to_one(models, aligner, ref, inputs, test) for ref in range(N_MODELS)]
    for name, aligner in HIERARCHICAL:
        accuracy[name, 2] = [hierarchical([models[a], models[b]], aligner, inputs, test)
                             for a, b in pairs]
        accuracy[name, 4] = [hierarchical([models[i] for i in order], aligner, inputs, test)
                             for order in pairings(N_MODELS)]
    base = [evaluate(model, test)["accuracy"] for model in models]
    ensemble2 = [ensemble_accuracy([models[a], models[b]], test)
                 for a, b in itertools.combinations(range(N_MODELS), 2)]
    ensemble4 = [ensemble_accuracy(models, test)]

    names = [name for name, _ in ALL_TO_ONE + HIERARCHICAL]
    width = max(len(name) for name in names)
    header = f"{'method':<{width}} | {'2 models':^21} | {'4 models':^21}"
    lines = [
        f"digits MLP 64-64-64-10, {args.epochs} epochs, seeds 0-{N_MODELS - 1}; merged test "
        "accuracy, mean (min..max)",
        "2 models: the 6 pairs x 2 references (orders); 4 models: the 4 references (all-to-one) "
        "or the 3 pairings (hierarchical)",
        "",
        header,
        "-" * len(header),
    ]
    for name in names:
        lines.append(f"{name:<{width}} | {mean_range(accuracy[name, 2]):>21} | {mean_range(accuracy[name, 4]):>21}")
    lines += [
        "-" * len(header),
        f"{'base models (each alone)':<{width}} | {mean_range(base):>21} |",
        f"{'ensemble (mean softmax)':<{width}} | {mean_range(ensemble2):>21} | {mean_range(ensemble4):>21}",
        "",
        "Alignment data (all but weight matching): the 1198 training inputs. With 2 models the",
        "hierarchical merge is a single all-to-one merge (same numbers).",
    ]
    emit_table("\n".join(lines), args.output, time.perf_counter() - start)


if __name__ == "__main__":
    main()
