"""LearnedCoefficientMerger: step 0 is the merger, learning helps, known answers, errors."""

import copy
import doctest
import os
from types import SimpleNamespace

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.frozen import FrozenEstimator
from sklearn.model_selection import GridSearchCV
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from skmerge import IdentityAligner, ModelMerger, PermutationAligner
from skmerge.batchnorm import reset_bn_stats
from skmerge.coefficients import LearnedCoefficientMerger

import _archs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: tiny models gain nothing from more, a loaded machine loses a lot."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _assert_on_simplex(coefficients, n_models):
    arrays = coefficients.values() if isinstance(coefficients, dict) else [coefficients]
    for c in arrays:
        assert c.shape == (n_models,)
        assert np.all(c >= 0) and np.isfinite(c).all()
        np.testing.assert_allclose(c.sum(), 1.0, atol=1e-9)


def _mlp(seed):
    from skmerge.models import get_model

    torch.manual_seed(seed)
    return get_model("mlp", in_features=64, num_classes=10, hidden=(32, 32))


@pytest.fixture(scope="module")
def digits():
    """Three digits MLPs (seeds 0-2) trained on 900 training images; the other 298 are held out."""
    from skmerge.datasets import load_digits
    from skmerge.training import train_model

    train, test = load_digits("train", flatten=True), load_digits("test", flatten=True)
    order = np.random.RandomState(0).permutation(len(train))
    fit_part, held = order[:900], order[900:]
    models = [train_model(_mlp(seed), Subset(train, fit_part), epochs=15, seed=seed)
              for seed in range(3)]
    x, y = train.tensors
    return SimpleNamespace(models=models, x_fit=x[fit_part], y_fit=y[fit_part], x_held=x[held],
                           y_held=y[held], x_test=test.tensors[0], y_test=test.tensors[1])


@pytest.fixture(scope="module")
def permutation_merger(digits):
    return ModelMerger(digits.models, PermutationAligner(), device="cpu").fit(digits.x_fit)


# ------------------------------------------------------------------ step 0
@pytest.mark.parametrize("granularity", ["tensor", "model"])
@pytest.mark.parametrize("weights", [None, [0.5, 0.3, 0.2]])
def test_initial_coefficients_are_the_mergers_average(digits, granularity, weights):
    models, x_fit, x_held, y_held = digits.models, digits.x_fit, digits.x_held, digits.y_held
    merger = ModelMerger(models, PermutationAligner(), weights=weights, device="cpu").fit(x_fit)
    # learning_rate=0: the coefficients stay at their initial value, log(weights_) through softmax
    learner = LearnedCoefficientMerger(merger, granularity=granularity, n_epochs=2,
                                       learning_rate=0.0, random_state=0).fit(x_held, y_held)
    coefficients = learner.coefficients_
    arrays = list(coefficients.values()) if granularity == "tensor" else [coefficients]
    if granularity == "tensor":
        assert sorted(coefficients) == sorted(n for n, _ in merger.merged_model_.named_parameters())
    for c in arrays:
        np.testing.assert_allclose(c, merger.weights_, rtol=1e-12)
    # exactly the merger's model: same parameters bit for bit (same order of summation)
    _archs.assert_same_state(_archs.state_copy(merger.merged_model_), learner.merged_model_)
    assert torch.equal(_archs.outputs(learner.merged_model_, x_held), _archs.outputs(merger.merged_model_, x_held))
    # the training forward pass (functional_call on the combined parameters) is the merger's model
    expected = F.cross_entropy(_archs.outputs(merger.merged_model_, x_held), y_held).item()
    np.testing.assert_allclose(learner.loss_curve_, [expected, expected], rtol=1e-5)
    assert learner.n_iter_ == learner.best_epoch_ == 2
    assert learner.validation_loss_curve_ is None


# -------------------------------------------------------------- learning
@pytest.mark.parametrize("granularity", ["tensor", "model"])
def test_learning_lowers_the_loss_on_digits(digits, permutation_merger, granularity):
    models, x_fit, x_held, y_held = digits.models, digits.x_fit, digits.x_held, digits.y_held
    x_test, y_test = digits.x_test, digits.y_test
    learned = LearnedCoefficientMerger(permutation_merger, granularity=granularity, n_epochs=5,
                                       random_state=0).fit(x_held, y_held)
    assert learned.n_iter_ == 5 and len(learned.loss_curve_) == 5
    assert learned.loss_curve_[-1] < learned.loss_curve_[0] - 0.05, learned.loss_curve_
    _assert_on_simplex(learned.coefficients_, 3)
    held_loss = F.cross_entropy(_archs.outputs(learned.merged_model_, x_held), y_held).item()
    merger_loss = F.cross_entropy(_archs.outputs(permutation_merger.merged_model_, x_held), y_held).item()
    assert held_loss < merger_loss - 0.05, (held_loss, merger_loss)
    # plain averaging of unaligned models is poor: learned coefficients recover a lot of it
    plain = ModelMerger(models, IdentityAligner(), device="cpu").fit(x_fit)
    recovered = LearnedCoefficientMerger(plain, granularity=granularity, n_epochs=10,
                                         random_state=0).fit(x_held, y_held)
    assert recovered.score(x_test, y_test) > plain.score(x_test, y_test) + 0.2


@pytest.mark.parametrize("granularity", ["model", "tensor"])
def test_good_model_wins_over_random_weights(digits, granularity):
    """Known answer: a trained model merged with an untrained one (no alignment)."""
    models, x_fit, x_held, y_held = digits.models, digits.x_fit, digits.x_held, digits.y_held
    untrained = _mlp(seed=10).eval()
    merger = ModelMerger([untrained, models[0]], IdentityAligner(), device="cpu").fit(x_fit)
    np.testing.assert_allclose(merger.weights_, [0.5, 0.5])
    learner = LearnedCoefficientMerger(merger, granularity=granularity, n_epochs=10,
                                       random_state=0).fit(x_held, y_held)
    _assert_on_simplex(learner.coefficients_, 2)
    if granularity == "model":
        assert learner.coefficients_[1] > 0.85, learner.coefficients_
    else:
        for name, c in learner.coefficients_.items():
            if name.endswith("weight"):
                assert c[1] > 0.7, (name, c)
    assert learner.score(x_held, y_held) > merger.score(x_held, y_held) + 0.2


def test_early_stopping_keeps_the_best_coefficients(digits):
    """Known answer: labels that pull towards the untrained model, validation on the true labels."""
    models, x_fit, x_held = digits.models, digits.x_fit, digits.x_held
    untrained = _mlp(seed=10).eval()
    merger = ModelMerger([models[0], untrained], IdentityAligner(), device="cpu").fit(x_fit)
    misleading = _archs.outputs(untrained, x_held).argmax(1)
    learner = LearnedCoefficientMerger(merger, granularity="model", n_epochs=20, n_iter_no_change=2,
                                       random_state=0)
    learner.fit(x_held, misleading, validation=TensorDataset(x_fit[:300], digits.y_fit[:300]))
    curve = learner.validation_loss_curve_
    assert len(curve) == learner.n_iter_ + 1
    assert learner.best_epoch_ == 0 and learner.n_iter_ == 2, curve
    np.testing.assert_allclose(learner.coefficients_, merger.weights_, rtol=1e-12)
    # without validation data, the misleading labels move the weight to the untrained model
    plain = clone(learner).set_params(merger=merger).fit(x_held, misleading)
    assert plain.coefficients_[1] > 0.5 and plain.best_epoch_ == plain.n_iter_ == 20


def test_early_stopping_restores_the_best_epoch(digits, permutation_merger):
    """Few samples and a large step: the validation loss soon stops improving."""
    x_held, y_held = digits.x_held, digits.y_held
    train, valid = slice(0, 40), slice(100, None)
    learner = LearnedCoefficientMerger(permutation_merger, n_epochs=30, learning_rate=1.0,
                                       batch_size=16, n_iter_no_change=2, random_state=3)
    learner.fit(x_held[train], y_held[train], validation=(x_held[valid], y_held[valid]))
    curve = learner.validation_loss_curve_
    assert len(curve) == learner.n_iter_ + 1 and len(learner.loss_curve_) == learner.n_iter_
    assert learner.best_epoch_ == int(np.argmin(curve)) >= 1, curve
    assert learner.n_iter_ == learner.best_epoch_ + 2 < 30, curve
    # the kept coefficients are those of best_epoch_: the same seed without validation,
    # stopped there, gives them (the validation passes draw no random numbers)
    again = clone(learner).set_params(merger=permutation_merger, n_epochs=learner.best_epoch_)
    again.fit(x_held[train], y_held[train])
    for name, c in learner.coefficients_.items():
        np.testing.assert_allclose(c, again.coefficients_[name], rtol=1e-10)
    assert again.best_epoch_ == again.n_iter_ == learner.best_epoch_


def test_zero_weight_model_keeps_coefficient_zero(digits):
    models, x_fit, x_held, y_held = digits.models, digits.x_fit, digits.x_held, digits.y_held
    merger = ModelMerger(models[:2], IdentityAligner(), weights=[1, 0], device="cpu").fit(x_fit)
    learner = LearnedCoefficientMerger(merger, n_epochs=2, random_state=0).fit(x_held, y_held)
    for c in learner.coefficients_.values():
        np.testing.assert_array_equal(c, [1.0, 0.0])


# ------------------------------------------------- inputs and data forms
def test_models_and_merger_are_never_modified(digits, permutation_merger):
    models, x_held, y_held = digits.models, digits.x_held, digits.y_held
    before = [_archs.state_copy(m) for m in models]
    merged_before = _archs.state_copy(permutation_merger.merged_model_)
    weights_before = permutation_merger.weights_.copy()
    learner = LearnedCoefficientMerger(permutation_merger, n_epochs=2, learning_rate=0.5,
                                       random_state=0).fit(x_held, y_held)
    assert learner.merger_ is permutation_merger
    assert learner.merged_model_ is not permutation_merger.merged_model_
    for state, model in zip(before, models):
        _archs.assert_same_state(state, model)
    _archs.assert_same_state(merged_before, permutation_merger.merged_model_)
    np.testing.assert_array_equal(permutation_merger.weights_, weights_before)
    assert not permutation_merger.merged_model_.training
    assert not any(p.requires_grad is False for p in permutation_merger.merged_model_.parameters())
    assert not learner.merged_model_.training


def test_unfitted_merger_is_cloned_and_fitted_on_x(digits):
    models, x_held, y_held = digits.models, digits.x_held, digits.y_held
    merger = ModelMerger(models[:2], PermutationAligner(), device="cpu")
    learner = LearnedCoefficientMerger(merger, n_epochs=1, random_state=0).fit(x_held, y_held)
    assert not hasattr(merger, "merged_model_")          # the parameter stays unfitted
    assert learner.merger_ is not merger and learner.merger_.models is merger.models
    assert learner.merger_.n_samples_seen_ == len(x_held)


def test_data_forms_and_random_state(digits, permutation_merger):
    x_held, y_held = digits.x_held, digits.y_held
    kwargs = dict(n_epochs=2, batch_size=64, random_state=7)
    tensors = LearnedCoefficientMerger(permutation_merger, **kwargs).fit(x_held, y_held)
    arrays = LearnedCoefficientMerger(permutation_merger, **kwargs).fit(x_held.numpy(),
                                                                         y_held.numpy())
    dataset = LearnedCoefficientMerger(permutation_merger, **kwargs).fit(
        TensorDataset(x_held, y_held))
    for other in (arrays, dataset):  # same samples, same seed: same shuffling, same result
        for name, c in tensors.coefficients_.items():
            np.testing.assert_allclose(c, other.coefficients_[name], rtol=1e-10)
    other_seed = LearnedCoefficientMerger(permutation_merger, **{**kwargs, "random_state": 8}).fit(
        x_held, y_held)
    assert any(not np.allclose(c, other_seed.coefficients_[n])
               for n, c in tensors.coefficients_.items())
    loader = DataLoader(TensorDataset(x_held, y_held), batch_size=50, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    from_loader = LearnedCoefficientMerger(permutation_merger, n_epochs=2).fit(loader)
    _assert_on_simplex(from_loader.coefficients_, 3)
    in_order = DataLoader(TensorDataset(x_held, y_held), batch_size=50)
    assert from_loader.score(in_order) == from_loader.score(x_held, y_held)
    # predictions
    assert tensors.n_features_in_ == 64 and not hasattr(dataset, "n_features_in_")
    np.testing.assert_array_equal(tensors.classes_, np.arange(10))
    proba = tensors.predict_proba(x_held)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(proba.argmax(1), tensors.predict(x_held))
    with pytest.raises(ValueError, match="features"):
        tensors.predict(torch.zeros(3, 10))


def test_custom_loss(digits, permutation_merger):
    x_held, y_held = digits.x_held, digits.y_held
    calls = []

    def loss(outputs, targets):
        calls.append(len(targets))
        return F.cross_entropy(outputs, targets, label_smoothing=0.1)

    learner = LearnedCoefficientMerger(permutation_merger, granularity="model", n_epochs=1,
                                       loss=loss, random_state=0).fit(x_held, y_held)
    assert sum(calls) == len(x_held)
    _assert_on_simplex(learner.coefficients_, 3)
    with pytest.raises(ValueError, match="scalar"):
        LearnedCoefficientMerger(permutation_merger, n_epochs=1,
                                 loss=lambda o, t: F.cross_entropy(o, t, reduction="none")
                                 ).fit(x_held, y_held)


# ------------------------------------------------------------- BatchNorm
def _vgg(seed):
    torch.manual_seed(seed)
    model = _archs.VGGBN()
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(shape, generator=generator))
    return model.eval()


def test_batchnorm_model():
    models = [_vgg(0), _vgg(1)]
    before = [_archs.state_copy(m) for m in models]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(97, *_archs.VGGBN.input_shape, generator=generator)  # last batch of one
    y = torch.randint(0, 5, (97,), generator=generator)
    merger = ModelMerger(models, PermutationAligner(), batch_size=32, device="cpu").fit(x)
    merged_before = _archs.state_copy(merger.merged_model_)

    # step 0: same parameters; running statistics re-estimated on the same data and batches
    still = LearnedCoefficientMerger(merger, n_epochs=1, learning_rate=0.0, batch_size=32,
                                     random_state=0).fit(x, y)
    torch.testing.assert_close(_archs.outputs(still.merged_model_, x), _archs.outputs(merger.merged_model_, x))

    learner = LearnedCoefficientMerger(merger, n_epochs=3, learning_rate=0.2, batch_size=32,
                                       random_state=0).fit(x, y)
    assert learner.loss_curve_[-1] < learner.loss_curve_[0], learner.loss_curve_
    _assert_on_simplex(learner.coefficients_, 2)
    assert {"features.1.weight", "features.1.bias"} <= set(learner.coefficients_)
    assert not any(name.endswith(("running_mean", "running_var")) for name in learner.coefficients_)
    model = learner.merged_model_
    assert not model.training and not any(m.training for m in model.modules())
    # BatchNorm statistics are those of the learned model on x, not the merger's
    expected = reset_bn_stats(copy.deepcopy(model), x, batch_size=32)
    _archs.assert_same_state(_archs.state_copy(expected), model)
    assert not torch.equal(model.features[1].running_var,
                           merger.merged_model_.features[1].running_var)
    for state, m in zip(before, models):
        _archs.assert_same_state(state, m)
    _archs.assert_same_state(merged_before, merger.merged_model_)


# ----------------------------------------------------- scikit-learn integration
def test_clone_get_params_and_frozen_merger(digits, permutation_merger):
    models, x_held, y_held = digits.models, digits.x_held, digits.y_held
    learner = LearnedCoefficientMerger(ModelMerger(models, PermutationAligner()), n_epochs=3)
    params = learner.get_params(deep=True)
    assert params["granularity"] == "tensor" and "merger__aligner" in params
    assert "merger__reference" in params
    cloned = clone(learner)
    assert cloned.merger is not learner.merger and cloned.merger.models is learner.merger.models
    cloned.set_params(merger__aligner=IdentityAligner(), granularity="model")
    assert isinstance(cloned.merger.aligner, IdentityAligner)
    assert isinstance(learner.merger.aligner, PermutationAligner)

    # a fitted merger: clone gives an unfitted merger; FrozenEstimator keeps the fitted one
    assert not hasattr(clone(LearnedCoefficientMerger(permutation_merger)).merger, "merged_model_")
    frozen = FrozenEstimator(permutation_merger)
    assert clone(LearnedCoefficientMerger(frozen)).merger is frozen
    search = GridSearchCV(LearnedCoefficientMerger(frozen, n_epochs=2, random_state=0),
                          {"granularity": ["tensor", "model"]}, cv=2)
    search.fit(x_held.numpy(), y_held.numpy())
    assert search.best_estimator_.merger_ is frozen
    assert search.best_params_["granularity"] in ("tensor", "model")
    assert 0.0 <= search.best_estimator_.score(x_held, y_held) <= 1.0


def test_joblib_round_trip(digits, permutation_merger, tmp_path):
    x_held, y_held = digits.x_held, digits.y_held
    learner = LearnedCoefficientMerger(permutation_merger, n_epochs=1, random_state=0).fit(
        x_held, y_held)
    path = tmp_path / "learner.joblib"
    joblib.dump(learner, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.predict_logits(x_held), learner.predict_logits(x_held))
    assert loaded.coefficients_.keys() == learner.coefficients_.keys()


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("params, error, match", [
    ({"granularity": "layer"}, ValueError, "granularity"),
    ({"granularity": None}, ValueError, "granularity"),
    ({"n_epochs": 0}, ValueError, "n_epochs"),
    ({"n_epochs": 2.5}, ValueError, "n_epochs"),
    ({"n_epochs": True}, ValueError, "n_epochs"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"n_iter_no_change": 0}, ValueError, "n_iter_no_change"),
    ({"learning_rate": -0.1}, ValueError, "learning_rate"),
    ({"learning_rate": float("nan")}, ValueError, "learning_rate"),
    ({"learning_rate": "fast"}, ValueError, "learning_rate"),
    ({"loss": "mse"}, ValueError, "loss"),
    ({"merger": object()}, TypeError, "ModelMerger"),
])
def test_bad_parameters(digits, permutation_merger, params, error, match):
    x_held, y_held = digits.x_held, digits.y_held
    learner = LearnedCoefficientMerger(permutation_merger).set_params(**params)
    with pytest.raises(error, match=match):
        learner.fit(x_held, y_held)


def test_bad_data(digits, permutation_merger):
    x_held, y_held = digits.x_held, digits.y_held
    learner = LearnedCoefficientMerger(permutation_merger, n_epochs=1)
    with pytest.raises(ValueError, match="needs labels"):
        learner.fit(x_held)
    with pytest.raises(ValueError, match="needs labels"):
        learner.fit(TensorDataset(x_held))
    with pytest.raises(ValueError, match="as .x, y. pairs"):
        learner.fit(TensorDataset(x_held, y_held), y_held)
    with pytest.raises(ValueError, match="different numbers of samples"):
        learner.fit(x_held, y_held[:-1])
    with pytest.raises(ValueError, match="integers"):
        learner.fit(x_held, y_held + 0.5)
    with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
        learner.fit(x_held, y_held + 10)
    with pytest.raises(ValueError, match="numeric"):
        learner.fit(x_held, np.array(["a"] * len(x_held)))
    with pytest.raises(ValueError, match="empty"):
        learner.fit(TensorDataset(x_held[:0], y_held[:0]))
    with pytest.raises(ValueError, match="validation"):
        learner.fit(x_held, y_held, validation=TensorDataset(x_held))
    with pytest.raises(NotFittedError):
        LearnedCoefficientMerger(permutation_merger).predict(x_held)


# ------------------------------------------------------------------- docs
def test_docstring_example_runs():
    import skmerge.coefficients

    result = doctest.testmod(skmerge.coefficients, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_user_guide_page_examples_run():
    path = os.path.join(ROOT, "docs", "user_guide", "learned_coefficients.rst")
    result = doctest.testfile(path, module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 20


def test_lazy_export():
    import skmerge

    assert skmerge.LearnedCoefficientMerger is LearnedCoefficientMerger


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    models = [_vgg(0).double(), _vgg(1).double()]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, *_archs.VGGBN.input_shape, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (96,), generator=generator)
    learned = {}
    for device in ("cpu", "cuda"):
        merger = ModelMerger(models, PermutationAligner(), batch_size=32, device=device).fit(x)
        learned[device] = LearnedCoefficientMerger(merger, n_epochs=2, learning_rate=0.2,
                                                   batch_size=32, random_state=0).fit(x, y)
    gpu = learned["cuda"]
    assert gpu.device_.type == "cuda" and next(gpu.merged_model_.parameters()).is_cuda
    for name, c in learned["cpu"].coefficients_.items():
        np.testing.assert_allclose(gpu.coefficients_[name], c, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gpu.predict_logits(x), learned["cpu"].predict_logits(x),
                               rtol=1e-6, atol=1e-6)
