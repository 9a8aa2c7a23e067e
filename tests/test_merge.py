"""ModelMerger: exactness on permuted copies, real merges, scikit-learn integration, errors."""

import copy
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from skmerge import CCAAligner, IdentityAligner, ModelMerger, PermutationAligner
from skmerge.batchnorm import reset_bn_stats
from skmerge.graph import find_spaces, permute_model

import _archs

torch.set_num_threads(2)

ARCHITECTURES = _archs.ARCHITECTURES


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_permutation_aligner_undoes_a_random_permutation(name):
    model = _archs.make_model(name, seed=0)
    inputs = _archs.inputs(name, 96)
    permuted, _ = permute_model(model, inputs[:2], seed=1)
    merger = ModelMerger([model, permuted], PermutationAligner(), reset_bn=False, device="cpu")
    merger.fit(inputs)
    expected = _archs.outputs(model, inputs)
    # Units that are dead on the data may be matched to any other dead unit;
    # the function on the data is reproduced exactly all the same.
    torch.testing.assert_close(_archs.outputs(merger.merged_model_, inputs), expected, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", ["mlp", "cat", "resnet"])
def test_cca_recovers_a_permuted_copy_when_activations_are_full_rank(name):
    model = _archs.make_model(name, seed=0)
    inputs = _archs.inputs(name, 600)
    permuted, _ = permute_model(model, inputs[:2], seed=2)
    merger = ModelMerger([model, permuted], CCAAligner(regularization=0), reset_bn=False, device="cpu")
    merger.fit(inputs)
    torch.testing.assert_close(_archs.outputs(merger.merged_model_, inputs), _archs.outputs(model, inputs),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("aligner", [CCAAligner(regularization=0.1), PermutationAligner()],
                         ids=["cca", "permutation"])
def test_merging_three_identical_models_returns_the_same_function(name, aligner):
    inputs = _archs.inputs(name, 64)
    # BatchNorm statistics of the data, as in a trained model: units that are
    # dead on the data (which CCA maps to zero) then stay dead after the reset.
    model = reset_bn_stats(_archs.make_model(name, seed=3), inputs, batch_size=64)
    merger = ModelMerger([model, copy.deepcopy(model), copy.deepcopy(model)], aligner,
                         batch_size=64, device="cpu").fit(inputs)
    torch.testing.assert_close(_archs.outputs(merger.merged_model_, inputs), _archs.outputs(model, inputs),
                               rtol=1e-6, atol=1e-6)


def test_weights_select_one_model_in_the_reference_basis():
    model = _archs.make_model("resnet", seed=0)
    other = _archs.make_model("resnet", seed=1)
    inputs = _archs.inputs("resnet", 64)
    only_reference = ModelMerger([model, other], CCAAligner(), weights=[1, 0], reset_bn=False,
                                 device="cpu").fit(inputs)
    torch.testing.assert_close(_archs.outputs(only_reference.merged_model_, inputs), _archs.outputs(model, inputs))
    permuted, _ = permute_model(other, inputs[:2], seed=5)
    only_other = ModelMerger([model, permuted], PermutationAligner(), weights=[0, 3], reset_bn=False,
                             device="cpu").fit(inputs)
    torch.testing.assert_close(_archs.outputs(only_other.merged_model_, inputs), _archs.outputs(other, inputs))


def test_merge_with_weights_and_aligned_state_dicts_reuse_the_alignment():
    model = _archs.make_model("vgg", seed=0)
    other = _archs.make_model("vgg", seed=1)
    inputs = _archs.inputs("vgg", 64)
    permuted, _ = permute_model(other, inputs[:2], seed=3)
    merger = ModelMerger([model, permuted], PermutationAligner(), reset_bn=False, device="cpu").fit(inputs)
    same = merger.merge_with_weights([0.5, 0.5])
    for key, value in merger.merged_model_.state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value)
    aligned = merger.aligned_state_dicts()
    for key, value in merger.merged_model_.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close((aligned[0][key] + aligned[1][key]) / 2, value)
    # The end points of the interpolation path are the two models' functions.
    torch.testing.assert_close(_archs.outputs(merger.merge_with_weights([1, 0]), inputs), _archs.outputs(model, inputs))
    torch.testing.assert_close(_archs.outputs(merger.merge_with_weights([0, 1]), inputs), _archs.outputs(other, inputs))
    with pytest.raises(ValueError, match="one entry per model"):
        merger.merge_with_weights([1.0])
    calibrated = ModelMerger([model, permuted], PermutationAligner(), device="cpu").fit(inputs)
    via_weights = calibrated.merge_with_weights([0.5, 0.5], X=inputs)
    torch.testing.assert_close(_archs.outputs(via_weights, inputs), _archs.outputs(calibrated.merged_model_, inputs))


def test_inputs_are_never_modified_and_modes_are_restored():
    models = [_archs.make_model("vgg", seed=s) for s in range(3)]
    models[1].train()
    before = [_archs.state_copy(m) for m in models]
    merger = ModelMerger(models, CCAAligner(), device="cpu").fit(_archs.inputs("vgg", 64))
    for state, model in zip(before, models):
        _archs.assert_same_state(state, model)
    assert [m.training for m in models] == [False, True, False]
    assert merger.merged_model_ is not models[0]
    assert not merger.merged_model_.training


def test_merged_model_has_the_same_class_and_keys():
    models = [_archs.make_model("resnet18", seed=s) for s in range(2)]
    merger = ModelMerger(models, device="cpu").fit(_archs.inputs("resnet18", 32))
    assert type(merger.merged_model_) is type(models[0])
    assert merger.merged_model_.state_dict().keys() == models[0].state_dict().keys()
    assert len(merger.aligners_) == len(merger.spaces_) == len(merger.statistics_)
    assert all(row[0] is None and row[1] is not None for row in merger.aligners_)
    assert set(merger.timings_) == {"statistics", "solve", "transform", "reset_bn", "total"}


def test_reset_bn_matches_an_independent_reestimation():
    models = [_archs.make_model("vgg", seed=s, dtype=torch.float32) for s in range(2)]
    inputs = _archs.inputs("vgg", 100, dtype=torch.float32)
    # One batch: the running statistics are then exactly those of all the data.
    merger = ModelMerger(models, CCAAligner(), batch_size=100, device="cpu").fit(inputs)
    no_reset = ModelMerger(models, CCAAligner(), reset_bn=False, device="cpu").fit(inputs)
    # Independent: the exact mean and (biased) variance of each BN input over all the data.
    model = no_reset.merged_model_
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    handle = bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    _archs.outputs(model, inputs)
    handle.remove()
    activations = seen[0].transpose(0, 1).reshape(bn.num_features, -1)
    name = next(n for n, m in model.named_modules() if m is bn)
    merged_bn = merger.merged_model_.get_submodule(name)
    torch.testing.assert_close(merged_bn.running_mean, activations.mean(1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_bn.running_var, activations.var(1), rtol=1e-4, atol=1e-5)


def test_data_forms_give_the_same_merge():
    models = [_archs.make_model("mlp", seed=s) for s in range(2)]
    inputs = _archs.inputs("mlp", 90)
    labels = torch.zeros(90, dtype=torch.long)
    forms = [inputs, inputs.numpy(), TensorDataset(inputs, labels),
             DataLoader(TensorDataset(inputs), batch_size=17)]
    merged = [ModelMerger(models, CCAAligner(), device="cpu", batch_size=32).fit(x).merged_model_
              for x in forms]
    for other in merged[1:]:
        for key, value in merged[0].state_dict().items():
            torch.testing.assert_close(other.state_dict()[key], value)


def test_joblib_round_trip(tmp_path):
    models = [_archs.make_model("cat", seed=s) for s in range(2)]
    inputs = _archs.inputs("cat", 64)
    merger = ModelMerger(models, CCAAligner(), device="cpu").fit(inputs)
    path = tmp_path / "merger.joblib"
    joblib.dump(merger, path)
    loaded = joblib.load(path)
    torch.testing.assert_close(_archs.outputs(loaded.merged_model_, inputs), _archs.outputs(merger.merged_model_, inputs))
    np.testing.assert_allclose(loaded.predict_proba(inputs), merger.predict_proba(inputs))


def test_clone_shares_the_source_models_and_clones_the_aligner():
    models = [_archs.make_model("mlp", seed=s) for s in range(2)]
    merger = ModelMerger(models, CCAAligner(regularization=0.3))
    cloned = clone(merger)
    assert cloned.models is models
    assert cloned.aligner is not merger.aligner
    assert cloned.get_params()["aligner__regularization"] == 0.3
    assert "aligner__regularization" in merger.get_params(deep=True)


def test_manual_spaces_and_self_check():
    model = _archs.make_model("mlp", seed=0)
    inputs = _archs.inputs("mlp", 64)
    spaces = find_spaces(model, inputs[:2])
    permuted, _ = permute_model(model, spaces=spaces, seed=4)
    merger = ModelMerger([model, permuted], PermutationAligner(), spaces=spaces, self_check=True,
                         reset_bn=False, device="cpu").fit(inputs)
    assert merger.spaces_ == spaces
    torch.testing.assert_close(_archs.outputs(merger.merged_model_, inputs), _archs.outputs(model, inputs))


def test_small_samples_warn_and_regularize():
    models = [_archs.make_model("mlp", seed=s) for s in range(2)]
    with pytest.warns(UserWarning, match="samples"):
        merger = ModelMerger(models, CCAAligner(regularization=0), device="cpu").fit(_archs.inputs("mlp", 5))
    assert np.isfinite(merger.predict_proba(_archs.inputs("mlp", 4))).all()


def test_predict_and_score_use_the_merged_model():
    models = [_archs.make_model("mlp", seed=s) for s in range(2)]
    inputs = _archs.inputs("mlp", 50)
    merger = ModelMerger(models, PermutationAligner(), device="cpu").fit(inputs)
    logits = _archs.outputs(merger.merged_model_, inputs)
    np.testing.assert_array_equal(merger.predict(inputs), logits.argmax(1).numpy())
    np.testing.assert_allclose(merger.predict_proba(inputs), torch.softmax(logits, 1).numpy(), rtol=1e-5)
    labels = logits.argmax(1).numpy()
    labels[:10] = (labels[:10] + 1) % logits.shape[1]
    assert merger.score(inputs, labels) == pytest.approx(0.8)
    assert merger.score(TensorDataset(inputs, torch.as_tensor(labels))) == pytest.approx(0.8)


# ----------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    mlp = _archs.make_model("mlp", seed=0)
    inputs = _archs.inputs("mlp", 20)
    with pytest.raises(ValueError, match="at least 2 models"):
        ModelMerger([mlp]).fit(inputs)
    with pytest.raises(TypeError, match="list or tuple"):
        ModelMerger(mlp).fit(inputs)
    with pytest.raises(ValueError, match="one architecture"):
        ModelMerger([mlp, _archs.make_model("cat", seed=0)]).fit(inputs)
    wider = nn.Sequential(nn.Flatten(), nn.Linear(inputs[0].numel(), 7))
    narrower = nn.Sequential(nn.Flatten(), nn.Linear(inputs[0].numel(), 5))
    with pytest.raises(ValueError, match="shape"):
        ModelMerger([wider, narrower]).fit(inputs.float())
    with pytest.raises(ValueError, match="reference=2"):
        ModelMerger([mlp, mlp], reference=2).fit(inputs)
    with pytest.raises(ValueError, match="one entry per model"):
        ModelMerger([mlp, mlp], weights=[1, 2, 3]).fit(inputs)
    with pytest.raises(ValueError, match="sum to a positive"):
        ModelMerger([mlp, mlp], weights=[0, 0]).fit(inputs)
    with pytest.raises(ValueError, match="non-negative"):
        ModelMerger([mlp, mlp], weights=[2, -1]).fit(inputs)
    with pytest.raises(ValueError, match="empty"):
        ModelMerger([mlp, mlp], device="cpu").fit(inputs[:0])
    broken = copy.deepcopy(mlp)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"models\[1\] has non-finite values .* 'layers.0.weight'"):
        ModelMerger([mlp, broken], device="cpu").fit(inputs)
    with pytest.raises(TypeError, match="fit_from_stats"):
        ModelMerger([mlp, mlp], aligner=object()).fit(inputs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ModelMerger([mlp, mlp], device="cuda").fit(inputs)


# ------------------------------------------------------ scikit-learn integration
@pytest.fixture(scope="module")
def digits_models():
    return _archs.digits_mlps(4)


def test_grid_search_over_the_aligner_regularization(digits_models):
    models, train, test = digits_models
    inputs, labels = train.tensors
    search = GridSearchCV(ModelMerger(models[:2], CCAAligner(), device="cpu"),
                          {"aligner__regularization": [0.0, 0.1, 0.5]}, cv=2)
    search.fit(inputs.numpy(), labels.numpy())
    assert search.best_params_["aligner__regularization"] in (0.0, 0.1, 0.5)
    assert search.best_estimator_.score(*test.tensors) > 0.5
    assert search.best_estimator_.models is models[:2] or search.best_estimator_.models == models[:2]


def test_real_merge_on_digits_beats_plain_averaging(digits_models):
    models, train, test = digits_models
    inputs, _ = train.tensors
    accuracy = {}
    for n_models in (2, 4):
        for name, aligner in [("identity", IdentityAligner()), ("permutation", PermutationAligner()),
                              ("cca", CCAAligner())]:
            merger = ModelMerger(models[:n_models], aligner, device="cpu").fit(inputs)
            accuracy[name, n_models] = merger.score(*test.tensors)
    for n_models in (2, 4):
        assert accuracy["permutation", n_models] > accuracy["identity", n_models] + 0.05, accuracy
        assert accuracy["cca", n_models] > accuracy["identity", n_models] + 0.05, accuracy
    assert accuracy["cca", 4] >= accuracy["permutation", 4], accuracy


# ------------------------------------------------------ scikit-learn's own checks
def _fixture_models():
    return _archs.any_width_models(2)


_EXPECTED_FAILED_CHECKS = {
    "check_estimators_overwrite_params": (
        "the check hashes every parameter with joblib.hash; torch modules (the models) "
        "do not hash deterministically, although fit never modifies them (tested above)"
    ),
    "check_parameters_default_constructible": (
        "the default aligner is an estimator instance, CCAAligner(), so that aligner__* "
        "parameters can be tuned without naming the aligner; it is cloned, never modified"
    ),
}


@parametrize_with_checks(
    [ModelMerger(_fixture_models(), CCAAligner(), device="cpu"),
     ModelMerger(_fixture_models(), PermutationAligner(), device="cpu")],
    expected_failed_checks=lambda estimator: _EXPECTED_FAILED_CHECKS,
)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(estimator)


class _TwoReaders(nn.Module):
    """Two consumers read the same hidden tensor."""

    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(5, 8)
        self.head_a = nn.Linear(8, 3)
        self.head_b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc0(x))
        return self.head_a(h) + self.head_b(h)


def test_taps_reading_the_same_tensor_count_each_sample_once():
    torch.manual_seed(0)
    models = [_TwoReaders().double() for _ in range(2)]
    inputs = torch.randn(40, 5, dtype=torch.float64)
    merger = ModelMerger(models, PermutationAligner(), device="cpu", batch_size=16).fit(inputs)
    (space,), (stats,) = merger.spaces_, merger.statistics_
    # h is observed once, where it is formed (the ReLU), though two heads read it.
    assert [tap.node for tap in space.taps] == ["relu"]
    assert stats.n_samples_ == 40
    with torch.no_grad():
        hidden = [torch.relu(model.fc0(inputs)) for model in models]
    torch.testing.assert_close(stats.covariance(1), torch.cov(hidden[1].T))
    torch.testing.assert_close(stats.cross_covariance(1), torch.cov(torch.cat(hidden, 1).T)[8:, :8])


@pytest.mark.parametrize("taps", ["consumers", "both"])
def test_taps_place_the_observations_of_the_spaces_found_automatically(taps):
    """ModelMerger(taps=t) is the merge of find_spaces(taps=t)'s spaces, and differs from "formed"."""
    models = [_archs.make_model("vgg", seed) for seed in range(2)]
    inputs = _archs.inputs("vgg", 64)
    placed = ModelMerger(models, CCAAligner(), device="cpu", taps=taps).fit(inputs)
    by_hand = ModelMerger(models, CCAAligner(), device="cpu",
                          spaces=find_spaces(models[0], inputs[:2], taps=taps)).fit(inputs)
    formed = ModelMerger(models, CCAAligner(), device="cpu", taps="formed").fit(inputs)
    assert [s.taps for s in placed.spaces_] == [s.taps for s in by_hand.spaces_]
    for (key, a), b in zip(placed.merged_model_.state_dict().items(), by_hand.merged_model_.state_dict().values()):
        assert torch.equal(a, b), key
    # the conv blocks' ReLUs are max-pooled before the next layer reads them: other samples
    consumers = placed if taps == "consumers" else ModelMerger(
        models, CCAAligner(), device="cpu", taps="consumers").fit(inputs)
    counts = {name: [s.n_samples_ for s in merger.statistics_]
              for name, merger in (("formed", formed), ("consumers", consumers), ("mine", placed))}
    assert counts["formed"] == [64 * 8 * 8, 64 * 4 * 4, 64 * 2 * 2, 64]
    assert counts["consumers"] == [64 * 4 * 4, 64 * 2 * 2, 64 * 2 * 2, 64]  # the head reads a flatten
    if taps == "both":  # the two pooled
        # the head reads a flatten of the last ReLU: the same samples, observed once
        assert counts["mine"] == [64 * 8 * 8 + 64 * 4 * 4, 64 * 4 * 4 + 64 * 2 * 2, 64 * 2 * 2, 64]
    assert not torch.allclose(placed.aligners_[0][1].mapping_, formed.aligners_[0][1].mapping_)


@pytest.mark.parametrize("taps", ["consumers", "both", "pre_and_post_activation"])
def test_every_tap_placement_merges_a_permuted_copy_exactly(taps):
    model = _archs.make_model("vgg", 0)
    inputs = _archs.inputs("vgg", 64)
    permuted = permute_model(model, inputs[:2], seed=3)[0]
    merger = ModelMerger([model, permuted], PermutationAligner(), device="cpu", taps=taps,
                         reset_bn=False).fit(inputs)
    torch.testing.assert_close(_archs.outputs(merger.merged_model_, inputs), _archs.outputs(model, inputs))


def test_cca_before_and_after_the_relus_merges_a_permuted_copy_of_a_residual_network_exactly():
    model = _archs.make_model("resnet", 0)
    inputs = _archs.inputs("resnet", 32)
    permuted = permute_model(model, inputs[:2], seed=5)[0]
    merger = ModelMerger([model, permuted], CCAAligner(regularization=0.0), device="cpu",
                         taps="pre_and_post_activation", reset_bn=False).fit(inputs)
    torch.testing.assert_close(_archs.outputs(merger.merged_model_, inputs), _archs.outputs(model, inputs))


class _InplaceMLP(nn.Module):
    """Linear -> ReLU(inplace=True) -> Linear: the linear output is overwritten by the ReLU."""

    def __init__(self):
        super().__init__()
        self.fc0, self.act, self.head = nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.act(self.fc0(x)))


def _pooled_covariance(*samples):
    return torch.cov(torch.cat(samples).T)


def test_pre_and_post_activation_observes_each_nonlinearity_input_before_it_is_overwritten():
    """The statistics are those of the pre- and post-activation samples pooled (an independent
    formula), also where ReLU(inplace=True) overwrites its input: a convolution map (observed as a
    strided view) and a linear output."""
    models = [_archs.make_model("vgg", seed) for seed in range(2)]
    inputs = _archs.inputs("vgg", 16)
    merger = ModelMerger(models, PermutationAligner(), device="cpu", taps="pre_and_post_activation",
                         reset_bn=False).fit(inputs)
    assert [t.module for t in merger.spaces_[0].taps] == ["features.2", "features.1"]
    assert [t.module for t in merger.spaces_[3].taps] == ["classifier.2", "classifier.0"]  # ends at the dropout
    pre, post = [], []
    with torch.no_grad():
        for model in models:
            x = model.features[1](model.features[0](inputs))  # BatchNorm output, before the ReLU
            pre.append(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))
            post.append(torch.relu(pre[-1]))
    stats = merger.statistics_[0]
    assert stats.n_samples_ == 2 * 16 * 8 * 8
    for k in range(2):
        torch.testing.assert_close(stats.covariance(k), _pooled_covariance(post[k], pre[k]))
    joint = torch.cov(torch.cat([torch.cat([post[0], pre[0]]), torch.cat([post[1], pre[1]])], 1).T)
    torch.testing.assert_close(stats.cross_covariance(1), joint[4:, :4])

    torch.manual_seed(0)
    mlps = [_InplaceMLP().double() for _ in range(2)]
    x = torch.randn(30, 5, dtype=torch.float64)
    merger = ModelMerger(mlps, PermutationAligner(), device="cpu", taps="pre_and_post_activation").fit(x)
    (space,), (stats,) = merger.spaces_, merger.statistics_
    assert [t.node for t in space.taps] == ["relu_", "linear"]
    with torch.no_grad():
        linear = mlps[1].fc0(x)
    torch.testing.assert_close(stats.covariance(1), _pooled_covariance(torch.relu(linear), linear))


def test_taps_are_validated_and_need_a_fit():
    models = [_archs.make_model("mlp", seed) for seed in range(2)]
    inputs = _archs.inputs("mlp", 64)
    with pytest.raises(ValueError, match="taps must be one of 'formed', 'consumers', 'both', 'pre_and_post_activation', got 'inputs'"):
        ModelMerger(models, device="cpu", taps="inputs").fit(inputs)
    spaces = find_spaces(models[0], inputs[:2])
    with pytest.raises(ValueError, match="spaces given by hand carry their own taps"):
        ModelMerger(models, device="cpu", spaces=spaces, taps="formed").fit(inputs)
    merger = ModelMerger(models, device="cpu").fit(inputs)
    with pytest.raises(ValueError, match=r"refit cannot change \['taps'\]"):
        merger.refit(inputs, taps="formed")
    assert clone(ModelMerger(models, taps="formed")).get_params()["taps"] == "formed"
    assert ModelMerger(models).get_params()["taps"] == "both"
    from skmerge import ReferenceFreeMerger, ZipItMerger
    assert ZipItMerger(models).get_params()["taps"] == ReferenceFreeMerger(models).get_params()["taps"] == "both"


def test_precision_follows_the_models_and_single_matches_double():
    models = [_archs.make_model("mlp", seed) for seed in range(3)]
    inputs = _archs.inputs("mlp", 300)
    auto = ModelMerger(models, CCAAligner(), device="cpu").fit(inputs)
    single = ModelMerger(models, CCAAligner(), device="cpu", precision="single").fit(inputs)
    assert {s.precision for s in auto.statistics_} == {"double"}  # float64 models
    assert {s.precision for s in single.statistics_} == {"single"}
    for a, b in zip(auto.merged_model_.state_dict().values(), single.merged_model_.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    float32 = [_archs.make_model("mlp", seed, dtype=torch.float32) for seed in range(2)]
    merger = ModelMerger(float32, CCAAligner(), device="cpu").fit(inputs.float())
    assert {s.precision for s in merger.statistics_} == {"single"}
    with pytest.raises(ValueError, match="precision must be"):
        ModelMerger(models, device="cpu", precision="float16").fit(inputs)


# ------------------------------------------- input models: modes, values, layout
def test_every_submodule_training_flag_is_restored():
    models = [_archs.make_model("vgg", seed=s) for s in range(2)]
    # A training model with a frozen BatchNorm, and an evaluation model with one training Dropout.
    models[0].train()
    models[0].features[1].eval()
    models[1].classifier[2].train()
    flags = [{name: m.training for name, m in model.named_modules()} for model in models]
    ModelMerger(models, CCAAligner(), device="cpu").fit(_archs.inputs("vgg", 64))
    for before, model in zip(flags, models):
        assert {name: m.training for name, m in model.named_modules()} == before
    assert models[0].training and not models[0].features[1].training
    assert not models[1].training and models[1].classifier[2].training


@pytest.mark.parametrize("where", ["parameter", "buffer"])
def test_non_finite_weights_are_refused_before_any_work(where):
    models = [_archs.make_model("vgg", seed=s) for s in range(3)]
    # Values that no statistic observes: the last layer's weight, a running variance.
    name = "classifier.3.weight" if where == "parameter" else "features.5.running_var"
    with torch.no_grad():
        tensor = dict(models[2].named_parameters(), **dict(models[2].named_buffers()))[name]
        tensor.view(-1)[3] = float("nan") if where == "parameter" else float("inf")
    calls = []
    for model in models:
        model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=rf"models\[2\] has non-finite values \(NaN or inf\) in "
                                         rf"{where} '{name.replace('.', '[.]')}'"):
        ModelMerger(models, CCAAligner(), device="cpu").fit(_archs.inputs("vgg", 64))
    assert not calls  # refused before any forward pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_the_finiteness_check_reads_sums_but_decides_entry_by_entry(dtype):
    """A finite sum proves a tensor finite; a sum that overflows falls back to the entrywise check."""
    from skmerge._model_checks import all_finite

    largest = torch.finfo(dtype if dtype.is_floating_point else torch.float32).max
    big = torch.full((64,), largest / 2, dtype=dtype)  # finite entries whose sum overflows
    assert all_finite(big) and all_finite(torch.randn(64).to(dtype)) and all_finite(torch.empty(0, dtype=dtype))
    for bad in ([float("nan")], [float("inf")], [float("inf"), float("-inf")]):  # inf - inf sums to NaN
        tensor = torch.randn(64).to(dtype)
        tensor[:len(bad)] = torch.tensor(bad).to(dtype)
        assert not all_finite(tensor)


def test_models_of_different_dtypes_are_refused_naming_the_tensor():
    mlp = _archs.make_model("mlp", seed=0, dtype=torch.float32)
    double = _archs.make_model("mlp", seed=1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layers\.0\.weight has dtype torch\.float64 in models\[1\] but torch\.float32"):
        ModelMerger([mlp, double], device="cpu").fit(_archs.inputs("mlp", 20, dtype=torch.float32))
    mixed = _archs.make_model("mlp", seed=2, dtype=torch.float32)
    mixed.layers[4].double()
    with pytest.raises(ValueError, match=r"models\[1\].*layers\.4\.weight.*float64"):
        ModelMerger([mlp, mixed], device="cpu").fit(_archs.inputs("mlp", 20, dtype=torch.float32))


def test_models_on_several_devices_or_meta_are_refused_naming_the_tensor():
    mlp = _archs.make_model("mlp", seed=0)
    meta = _archs.make_model("mlp", seed=1).to("meta")
    with pytest.raises(ValueError, match=r"models\[1\].*layers\.0\.weight.*meta device"):
        ModelMerger([mlp, meta], device="cpu").fit(_archs.inputs("mlp", 20))
    split = _archs.make_model("mlp", seed=2)
    split.layers[2].to("meta")
    with pytest.raises(ValueError, match=r"models\[1\].*layers\.2\.weight.*meta"):
        ModelMerger([mlp, split], device="cpu").fit(_archs.inputs("mlp", 20))
    with pytest.raises(ValueError, match="meta"):
        ModelMerger([mlp, mlp], device="meta").fit(_archs.inputs("mlp", 20))
    with pytest.raises(ValueError, match="meta"):
        ModelMerger([mlp, mlp], device="cpu").fit(_archs.inputs("mlp", 20).to("meta"))


def test_activations_near_1e20_in_float32_merge_like_double_precision():
    models = [_archs.make_model("mlp", seed=s, dtype=torch.float32) for s in range(2)]
    inputs = 1e20 * _archs.inputs("mlp", 200, dtype=torch.float32)
    auto = ModelMerger(models, CCAAligner(), device="cpu").fit(inputs)  # single-precision products
    double = ModelMerger(models, CCAAligner(), device="cpu", precision="double").fit(inputs)
    for key, value in double.merged_model_.state_dict().items():
        torch.testing.assert_close(auto.merged_model_.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_sparse_labels_are_named():
    import scipy.sparse

    models = [_archs.make_model("mlp", seed=s) for s in range(2)]
    inputs = _archs.inputs("mlp", 64)
    merger = ModelMerger(models, PermutationAligner(), device="cpu").fit(inputs)
    with pytest.raises(TypeError, match="y is sparse, but labels must be a dense"):
        merger.score(inputs, scipy.sparse.csr_matrix(np.ones((64, 1))))


def _factory(hidden=8, activation=nn.ReLU):
    """Builds its class anew at every call, as notebooks and some libraries do."""

    class V(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, hidden)
            self.act = activation()
            self.fc2 = nn.Linear(hidden, 3)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    return V()


def test_models_of_one_factory_class_are_merged():
    torch.manual_seed(0)
    a, b = _factory(), _factory()
    assert type(a) is not type(b) and type(a).__qualname__ == type(b).__qualname__
    inputs = torch.randn(64, 6)
    merger = ModelMerger([a, b], PermutationAligner(), device="cpu").fit(inputs)
    permuted, _ = permute_model(a, inputs[:2], seed=1)
    exact = ModelMerger([a, permuted], PermutationAligner(), device="cpu").fit(inputs)
    torch.testing.assert_close(_archs.outputs(exact.merged_model_, inputs), _archs.outputs(a, inputs))
    assert merger.merged_model_.state_dict().keys() == a.state_dict().keys()


def test_different_architectures_say_how_they_differ():
    torch.manual_seed(0)
    inputs = torch.randn(20, 6)
    with pytest.raises(ValueError, match=r"'act' is a torch\.nn\.[\w.]*Tanh in models\[1\] but a [\w.]*ReLU in models\[0\]"):
        ModelMerger([_factory(), _factory(activation=nn.Tanh)], device="cpu").fit(inputs)
    with pytest.raises(ValueError, match=r"models\[1\].*fc1\.weight.*\(9, 6\).*\(8, 6\)"):
        ModelMerger([_factory(), _factory(hidden=9)], device="cpu").fit(inputs)
    extra = _factory()
    extra.register_buffer("scale", torch.ones(3))
    with pytest.raises(ValueError, match=r"models\[1\].*extra.*'scale'"):
        ModelMerger([_factory(), extra], device="cpu").fit(inputs)
