"""The statistics of a pass are reused: refit, and fit on the same models and data."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV, StratifiedKFold

import _archs
from skmerge import CCAAligner, ModelMerger, PermutationAligner, ProcrustesAligner, ReferenceFreeMerger
from skmerge import _observe
from skmerge._statistics_cache import clear_statistics_cache

torch.set_num_threads(1)


@pytest.fixture
def passes(monkeypatch):
    """Counts the batches observed (each model's forward pass on each batch)."""
    count = [0]
    original = _observe.BatchObserver.run

    def counted(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_observe.BatchObserver, "run", counted)
    clear_statistics_cache()
    yield count
    clear_statistics_cache()


def _same(a, b):
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_refit_solves_again_without_a_pass(passes):
    models = [_archs.make_model("resnet", seed) for seed in range(3)]
    x = _archs.inputs("resnet", 48)
    merger = ModelMerger(models, CCAAligner(), device="cpu", batch_size=16).fit(x)
    assert passes[0] == 3 * 3  # 3 batches through 3 models
    merger.refit(x, aligner=ProcrustesAligner(), weights=[0.5, 0.25, 0.25])
    assert passes[0] == 9 and merger.timings_["statistics"] == 0.0
    clear_statistics_cache()
    expected = ModelMerger(models, ProcrustesAligner(), weights=[0.5, 0.25, 0.25], device="cpu",
                           batch_size=16).fit(x)
    _same(expected.merged_model_, merger.merged_model_)
    with pytest.raises(ValueError, match="precision"):
        merger.refit(x, precision="double")


def test_grid_search_over_the_aligner_makes_one_pass_per_fold(passes):
    models = [_archs.make_model("mlp", seed) for seed in range(2)]
    x, y = _archs.inputs("mlp", 120), np.arange(120) % 5
    grid = {"aligner__regularization": [0.05, 0.3, 0.9]}
    cv = StratifiedKFold(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search = GridSearchCV(ModelMerger(models, CCAAligner(), device="cpu"), grid, cv=cv).fit(x, y)
    fold_batches = 2 * int(np.ceil(60 / 128))  # 2 models, one batch of 60 per fold
    # 2 folds x 3 candidates, and the refit on all the data: 2 + 1 passes
    assert passes[0] == 2 * fold_batches + 2
    scores = search.cv_results_["mean_test_score"]
    uncached = []
    for r in grid["aligner__regularization"]:
        fold_scores = []
        for train, test in cv.split(x, y):
            clear_statistics_cache()
            m = ModelMerger(models, CCAAligner(r), device="cpu").fit(x[train])
            fold_scores.append(m.score(x[test], y[test]))
        uncached.append(np.mean(fold_scores))
    np.testing.assert_allclose(scores, uncached, rtol=0, atol=1e-12)


def test_a_changed_weight_or_other_data_is_a_new_pass(passes):
    models = [_archs.make_model("mlp", seed) for seed in range(2)]
    x = _archs.inputs("mlp", 40)
    ModelMerger(models, PermutationAligner(), device="cpu").fit(x)
    ModelMerger(models, CCAAligner(), device="cpu").fit(x.clone())  # same content: reused
    assert passes[0] == 2
    with torch.no_grad():
        models[1].layers[0].weight.mul_(1.01)  # an in-place update: a new version
    ModelMerger(models, CCAAligner(), device="cpu").fit(x)
    assert passes[0] == 4
    ModelMerger(models, CCAAligner(), device="cpu").fit(x + 1)
    assert passes[0] == 6
    loader = torch.utils.data.DataLoader(x, batch_size=64)
    ModelMerger(models, CCAAligner(), device="cpu").fit(loader)
    ModelMerger(models, CCAAligner(), device="cpu").fit(loader)  # loaders are never cached
    assert passes[0] == 10


def test_reference_free_refit(passes):
    models = [_archs.make_model("mlp", seed) for seed in range(3)]
    x = _archs.inputs("mlp", 60)
    merger = ReferenceFreeMerger(models, CCAAligner(0.3), device="cpu", max_iter=3).fit(x)
    n = passes[0]
    merger.refit(aligner=ProcrustesAligner())
    assert passes[0] == n
    clear_statistics_cache()
    expected = ReferenceFreeMerger(models, ProcrustesAligner(), device="cpu", max_iter=3).fit(x)
    _same(expected.merged_model_, merger.merged_model_)
