"""The batch observer: statistics fed from inside the forward passes."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from skmerge._observe import BatchObserver
from skmerge.graph import Tap
from skmerge.stats import ReferenceCovariance


class _Looped(nn.Module):
    """``lin`` applied ``repeats`` times (shared weights); ``head`` and ``side`` read the same tensor."""

    def __init__(self, repeats: int) -> None:
        super().__init__()
        self.repeats = repeats
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.side = nn.Linear(3, 2)

    def forward(self, x):
        for _ in range(self.repeats):
            x = torch.relu(self.lin(x))
        return self.head(x) + self.side(x)


def _observe(models, x):
    taps_by_module = {"lin": [(0, Tap("lin", 1, dim=3))],
                      "head": [(1, Tap("head", 1, dim=3))],
                      "side": [(1, Tap("side", 1, dim=3))]}
    statistics = [ReferenceCovariance(len(models), reference=0) for _ in range(2)]
    spaces = [SimpleNamespace(name="input"), SimpleNamespace(name="hidden")]
    observer = BatchObserver(statistics, spaces, taps_by_module)
    for k, model in enumerate(models):
        observer.run(model, k, x)
    observer.commit()
    return statistics


def _inputs_of(model, path, x):
    seen = []
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen


def test_every_call_is_observed_and_a_tensor_read_twice_counts_once():
    torch.manual_seed(0)
    x = torch.randn(50, 3, dtype=torch.float64)
    models = [_Looped(2).double(), _Looped(2).double()]
    with torch.no_grad():
        statistics = _observe(models, x)
    # Space 0: both calls of the shared layer, 100 samples; space 1: "head"
    # and "side" read the same tensor, which is observed once (50 samples).
    assert statistics[0].n_samples_ == 100 and statistics[1].n_samples_ == 50
    for space, path in ((0, "lin"), (1, "head")):
        views = [torch.cat(_inputs_of(model, path, x)).numpy() for model in models]
        expected = np.cov(np.hstack(views).T)
        np.testing.assert_allclose(statistics[space].covariance(1).numpy(), expected[3:, 3:], atol=1e-12)
        np.testing.assert_allclose(statistics[space].cross_covariance(1).numpy(), expected[3:, :3], atol=1e-12)


def test_a_model_calling_a_module_fewer_times_than_the_reference_is_an_error():
    x = torch.randn(20, 3)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"Model 1 called \['lin'\] fewer times"):
        _observe([_Looped(2), _Looped(1)], x)


def test_a_tapped_module_that_never_runs_is_an_error():
    x = torch.randn(20, 3)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"\['lin'\] were never called"):
        _observe([_Looped(0), _Looped(0)], x)


def test_non_finite_activations_name_the_space_and_the_model():
    x = torch.randn(20, 3)
    broken = _Looped(1)
    with torch.no_grad():
        broken.lin.weight.fill_(float("nan"))
        with pytest.raises(ValueError, match=r"space 1 \(hidden\) of model 1"):
            _observe([_Looped(1), broken], x)
