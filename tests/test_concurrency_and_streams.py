"""Concurrent fits on shared models, streams of alignment data, buffers used as tensors, bad inputs."""

import threading
import warnings

import numpy as np
import pytest
import torch
from joblib import parallel_backend
from sklearn.model_selection import GridSearchCV
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import _archs
from skmerge import CCAAligner, ModelMerger, PermutationAligner
from skmerge.graph import find_spaces, permute_model

torch.set_num_threads(1)


def _models(name="resnet", n=2):
    return [_archs.make_model(name, seed) for seed in range(n)]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_concurrent_fits_give_the_sequential_result_and_leave_the_models_alone():
    models = _models()
    x = _archs.inputs("resnet", 96)
    models[0].train()
    models[0].layer1[0].bn1.eval()
    flags = [[m.training for m in model.modules()] for model in models]
    before = [_state(model) for model in models]
    sequential = ModelMerger(models, CCAAligner(), device="cpu", batch_size=32).fit(x).merged_model_.state_dict()
    results, errors = [None] * 4, []

    def fit(i):
        try:
            results[i] = ModelMerger(models, CCAAligner(), device="cpu", batch_size=32).fit(x)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=fit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for merger in results:
        for key, value in merger.merged_model_.state_dict().items():
            assert torch.equal(value, sequential[key]), key
    for model, state, flag in zip(models, before, flags):
        _archs.assert_same_state(state, model)
        assert [m.training for m in model.modules()] == flag


def test_grid_search_with_threads_equals_the_sequential_search():
    models = _models("mlp")
    x, y = _archs.inputs("mlp", 120), np.arange(120) % 5
    grid = {"aligner__regularization": [0.1, 0.5]}
    scores = []
    for n_jobs in (1, 2):
        search = GridSearchCV(ModelMerger(models, CCAAligner(), device="cpu"), grid, cv=2, n_jobs=n_jobs)
        with parallel_backend("threading"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            search.fit(x, y)
        scores.append(search.cv_results_["mean_test_score"])
    assert np.all(np.isfinite(scores[1]))
    np.testing.assert_array_equal(scores[0], scores[1])


class _Stream(IterableDataset):
    """A one-shot stream of samples, with or without a length."""

    def __init__(self, x, with_length):
        self.iterator = iter(x)
        self.n = len(x)
        if with_length:
            self.__len__ = lambda: self.n

    def __iter__(self):
        return self.iterator


def test_streams_without_length_and_one_shot_streams_lose_no_sample():
    models = _models("mlp")
    x = _archs.inputs("mlp", 77)
    for with_length in (False, True):
        loader = DataLoader(_Stream(x, with_length), batch_size=16)
        merger = ModelMerger(models, PermutationAligner(), device="cpu").fit(loader)
        assert merger.n_samples_seen_ == 77
        expected = ModelMerger(models, PermutationAligner(), device="cpu", batch_size=16).fit(x)
        for a, b in zip(merger.statistics_, expected.statistics_):
            torch.testing.assert_close(a.covariance(1), b.covariance(1))


def test_a_one_shot_stream_cannot_feed_a_second_pass():
    models = _models("vgg")  # BatchNorm: the merged model's statistics need a second pass
    loader = DataLoader(_Stream(_archs.inputs("vgg", 40), False), batch_size=16)
    with pytest.raises(ValueError, match="read only once"):
        ModelMerger(models, PermutationAligner(), device="cpu").fit(loader)


class _Scaled(nn.Module):
    """A per-channel buffer (a fixed normalization) multiplied into a feature map."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 2)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 6).view(1, 6, 1, 1))

    def forward(self, x):
        return self.head((torch.relu(self.conv(x)) * self.scale).mean((2, 3)))


def test_a_per_channel_buffer_moves_with_its_channels():
    torch.manual_seed(0)
    model = _Scaled().double()
    x = torch.randn(64, 3, 6, 6, dtype=torch.float64)
    (space,) = find_spaces(model, x[:2])
    assert "scale" in {s.name for s in space.producers}
    permuted, _ = permute_model(model, x[:2], seed=1)
    assert not torch.equal(permuted.scale, model.scale)
    merged = ModelMerger([model, permuted], PermutationAligner(), device="cpu").fit(x).merged_model_
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("data, message", [
    (torch.randn(20, 7, dtype=torch.float64), r"shape \(2, 7\).*expects 12 input features"),
    (torch.randint(0, 5, (20, 12)), r"dtype int64"),
])
def test_inputs_the_models_cannot_take_get_a_short_error(data, message):
    with pytest.raises(ValueError, match=message) as info:
        ModelMerger(_models("mlp"), device="cpu").fit(data)
    assert len(str(info.value)) < 400
