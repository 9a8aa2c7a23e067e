"""Joint and per-task accuracy (skmerge.tasks, score_tasks)."""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import skmerge.tasks as tasks_module
from skmerge import ModelMerger, PermutationAligner
from skmerge.datasets import load_digits, split_disjoint_classes
from skmerge.tasks import evaluate_tasks, task_accuracies


def _direct(outputs, labels, tasks):
    """Sample by sample, with Python loops."""
    joint = np.mean([int(np.argmax(o)) == y for o, y in zip(outputs, labels)])
    per_task = []
    for classes in tasks:
        hits = []
        for o, y in zip(outputs, labels):
            if y in classes:
                best = max(classes, key=lambda c: o[c])
                hits.append(best == y)
        per_task.append(np.mean(hits))
    return joint, per_task


@pytest.mark.parametrize("seed", range(3))
def test_task_accuracies_match_a_direct_computation(seed):
    rng = np.random.default_rng(seed)
    outputs = rng.normal(size=(200, 10))
    labels = rng.integers(0, 10, size=200)
    outputs[np.arange(200), labels] += rng.uniform(0, 2, size=200)  # better than chance
    tasks = [[3, 0, 7], [1, 2, 4, 9], [5, 6, 8]]
    result = task_accuracies(torch.as_tensor(outputs), torch.as_tensor(labels), tasks)
    joint, per_task = _direct(outputs, labels, tasks)
    assert result["joint"] == pytest.approx(joint)
    assert result["per_task"] == pytest.approx(per_task)
    assert result["task_mean"] == pytest.approx(np.mean(per_task))
    for classes, value in zip(tasks, result["joint_per_task"]):
        rows = np.isin(labels, classes)
        assert value == pytest.approx(np.mean(outputs[rows].argmax(1) == labels[rows]))
    assert all(j <= p + 1e-12 for j, p in zip(result["joint_per_task"], result["per_task"]))


def test_tasks_from_split_disjoint_classes_and_merged_models():
    train, test = load_digits("train"), load_digits("test")
    subsets = split_disjoint_classes(train, 2, seed=0)
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 10)) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merger = ModelMerger(models, PermutationAligner(), device="cpu").fit(train.tensors[0][:256])
    by_subsets = merger.score_tasks(test, subsets)
    by_classes = evaluate_tasks(merger.merged_model_, test, [s.classes for s in subsets])
    assert by_subsets == by_classes
    x, y = test.tensors
    assert by_subsets["joint"] == pytest.approx(merger.score(x, y))
    assert merger.score_tasks(x, [s.classes for s in subsets], y=y) == by_subsets


def test_a_task_without_samples_and_bad_input():
    outputs = np.eye(4)[[0, 1, 0, 1]]
    result = task_accuracies(outputs, [0, 1, 0, 1], [[0, 1], [2, 3]])
    assert result["per_task"][0] == 1.0 and np.isnan(result["per_task"][1])
    assert result["task_mean"] == 1.0
    with pytest.raises(ValueError, match="disjoint"):
        task_accuracies(outputs, [0, 1, 2, 3], [[0, 1], [1, 2]])
    with pytest.raises(ValueError, match="outside range"):
        task_accuracies(outputs, [0, 1, 2, 3], [[0, 5]])
    with pytest.raises(ValueError, match="2-D"):
        task_accuracies(outputs[0], [0], [[0]])
    with pytest.raises(ValueError, match="one label per row"):
        task_accuracies(outputs, [0, 1], [[0, 1]])
    with pytest.raises(ValueError, match="non-empty list"):
        task_accuracies(outputs, [0, 1, 2, 3], [])
    with pytest.raises(ValueError, match=r"\(input, label\) pairs"):
        evaluate_tasks(torch.nn.Linear(4, 4), TensorDataset(torch.randn(5, 4)), [[0, 1]])


def test_docstrings_run():
    result = doctest.testmod(tasks_module)
    assert result.attempted > 2 and result.failed == 0
