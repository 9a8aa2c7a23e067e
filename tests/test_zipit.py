"""ZipItMerger: greedy matching, merge/unmerge form, exactness, partial zipping, conventions."""

from __future__ import annotations

import copy
import doctest
import sys
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

import skmerge.zipit as zipit
from skmerge import CCAAligner, ModelMerger, PermutationAligner, ProcrustesAligner
from skmerge._merge_unmerge import combine_states, from_aligners, from_labels
from skmerge._zip_match import joint_correlation, zip_match
from skmerge.graph import permute_model
from skmerge.reference_free import JointCovariance
from skmerge.zipit import MultiHeadModel, ZipItMerger

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _archs  # noqa: E402
import _modern  # noqa: E402

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]


def _make(name, seed, dtype=torch.float64):
    return _archs.make_model(name, seed, dtype, randomize_bn=False)


_quiet = _archs.quiet


# ------------------------------------------------------------------ the matching
def _greedy_pairs(correlation, d):
    """Independent: two models, pairs across models only, best correlation first."""
    pairs = sorted(((float(correlation[i, d + j]), i, j) for i in range(d) for j in range(d)), reverse=True)
    used_a, used_b, match = set(), set(), {}
    for _, i, j in pairs:
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            match[j] = i
    return match


@pytest.mark.parametrize("seed", range(3))
def test_matching_across_models_only_is_the_greedy_bipartite_matching(seed):
    rng = np.random.default_rng(seed)
    d = 7
    x = rng.normal(size=(300, 2 * d)) + rng.normal(size=(300, 1))
    correlation = torch.as_tensor(np.corrcoef(x.T))
    labels, within = zip_match(correlation, torch.tensor([0] * d + [1] * d), d, alpha=0.0, beta=0.0)
    assert within == 0
    assert sorted(labels[:d].tolist()) == list(range(d))  # model 0 keeps one feature per group
    for j, i in _greedy_pairs(correlation, d).items():
        assert labels[d + j] == labels[i]


def test_within_model_merges_respect_the_budget_and_alpha_grows_groups():
    rng = np.random.default_rng(0)
    d = 8
    base = rng.normal(size=(400, d))
    # model 0 has duplicated features: merging them within the model is the best move
    a = np.concatenate([base[:, :4], base[:, :4] + 1e-3 * rng.normal(size=(400, 4))], axis=1)
    b = base + 0.5 * rng.normal(size=(400, d))
    correlation = torch.as_tensor(np.corrcoef(np.concatenate([a, b], axis=1).T))
    owners = torch.tensor([0] * d + [1] * d)
    for beta, allowed in [(0.0, 0), (0.25, 1), (0.5, 2), (1.0, 4)]:
        labels, within = zip_match(correlation, owners, d, alpha=0.3, beta=beta)
        assert len(set(labels.tolist())) == d
        groups = [set(np.flatnonzero(labels.numpy() == g)) for g in range(d)]
        pairs = sum(1 for g in groups for i in g for j in g if i < j < d)
        assert pairs == allowed, (beta, pairs)  # model 0's duplicates merged while its budget lasts
        assert allowed <= within <= 2 * allowed  # each model's budget bounds its within-model merges
        if beta == 0:  # every group holds at most one feature of each model
            assert all(len([i for i in g if i < d]) <= 1 and len([i for i in g if i >= d]) <= 1 for g in groups)
    # alpha = 0: a group formed by a merge takes no further feature of a model it holds
    labels, _ = zip_match(correlation, owners, d, alpha=0.0, beta=1.0)
    for g in range(d):
        members = np.flatnonzero(labels.numpy() == g)
        assert np.sum(members >= d) <= 1 and len(members) <= 3


def test_three_permuted_copies_zip_into_triples_with_alpha_zero():
    model = _make("mlp", 0)
    x = _archs.inputs("mlp", 512, 0)
    models = [model] + [permute_model(model, x[:2], seed=s)[0] for s in (1, 2)]
    merger = _quiet(lambda: ZipItMerger(models, alpha=0.0, device="cpu").fit(x))
    torch.testing.assert_close(merger.merged_model_(x), model(x), rtol=0, atol=1e-12)
    for labels in merger.labels_:  # every merged feature holds one feature of each model
        for row in labels:
            assert sorted(row.tolist()) == list(range(labels.shape[1]))


def test_joint_correlation_matches_numpy_and_pairs_dead_units():
    rng = np.random.default_rng(1)
    views = [rng.normal(size=(100, 3)) for _ in range(2)]
    views[0][:, 1] = 0.0  # dead units: constant zero in both models
    views[1][:, 2] = 0.0
    stats = JointCovariance(2).update(views)
    corr = joint_correlation(stats).numpy()
    live = [0, 2, 3, 4]
    expected = np.corrcoef(np.concatenate(views, axis=1)[:, live].T)
    np.testing.assert_allclose(corr[np.ix_(live, live)], expected, atol=1e-12)
    assert corr[1, 5] == 1.0 and corr[1, 0] == 0.0


# ----------------------------------------------------------- exactness on copies
@pytest.mark.parametrize("name, stop_at", [(name, None) for name in _archs.ARCHITECTURES if name != "resnet18"]
                         + [("vgg", 0), ("resnet", -1), ("norm", 1), ("cat", 0)])
def test_zipping_a_model_with_a_permuted_copy_is_exact(name, stop_at):
    model = _make(name, 0)
    x = _archs.inputs(name, 256, 0)
    permuted = permute_model(model, x[:2], seed=3)[0]
    merger = _quiet(lambda: ZipItMerger([model, permuted], stop_at=stop_at, reset_bn=False,
                                        device="cpu").fit(x))
    torch.testing.assert_close(merger.merged_model_(x), model(x), rtol=0, atol=1e-10)
    assert isinstance(merger.merged_model_, MultiHeadModel) == (stop_at is not None)
    # features merged within a model are dead units only (constant zero: merging them changes nothing)
    for stats, within in zip(merger.statistics_, merger.within_model_merges_):
        if stats is not None:
            assert within <= int((stats.covariance(0).diagonal() == 0).sum())


@pytest.mark.parametrize("name, stop_at", [("vit_mha", 1), ("gpt2_tied", None), ("resnext", 1),
                                           ("convnext", None)])
def test_permuted_copies_of_modern_models_zip_exactly(name, stop_at):
    cls = _modern.MODERN[name]
    torch.manual_seed(0)
    model = cls().double().eval()
    x = cls.example_input(64, 0, torch.float64)
    permuted = permute_model(model, x[:2], seed=3)[0]
    merger = _quiet(lambda: ZipItMerger([model, permuted], stop_at=stop_at, reset_bn=False,
                                        device="cpu").fit(x))
    torch.testing.assert_close(merger.merged_model_(x), model(x), rtol=0, atol=1e-9)


# ------------------------------------------------------ merge / unmerge matrices
@pytest.mark.parametrize("name, aligner", [("vgg", CCAAligner()), ("resnet", PermutationAligner()),
                                           ("norm", ProcrustesAligner()), ("mlp", CCAAligner())])
def test_all_to_one_merge_unmerge_reproduces_model_merger(name, aligner):
    models = [_make(name, seed) for seed in range(3)]
    x = _archs.inputs(name, 256, 0)
    weights = [0.5, 0.3, 0.2]
    merger = _quiet(lambda: ModelMerger(models, aligner, weights=weights, reset_bn=False,
                                        device="cpu").fit(x))
    parts = [from_aligners(row, weights, space.dim) for row, space in zip(merger.aligners_, merger.spaces_)]
    merged = combine_states([m.state_dict() for m in models], merger.spaces_, parts, weights)
    expected = merger.merged_model_.state_dict()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-12, atol=1e-12)
    # the merge matrices are [w_0 I, w_1 T_1, w_2 T_2]
    first = parts[0]
    torch.testing.assert_close(first[0].merge_, 0.5 * torch.eye(merger.spaces_[0].dim, dtype=torch.float64))
    torch.testing.assert_close(first[1].merge_, 0.3 * torch.as_tensor(merger.aligners_[0][1].mapping_).double())


def test_merged_feature_is_the_weighted_mean_of_its_members():
    labels = torch.tensor([[0, 0, 1], [1, 2, 2]])  # model 0 merges features 0 and 1 within itself
    parts = from_labels(labels, [0.75, 0.25])
    z = [torch.tensor([[1.0, 3.0, 5.0]], dtype=torch.float64), torch.tensor([[7.0, 9.0, 11.0]],
                                                                            dtype=torch.float64)]
    merged = sum(zk @ p.merge_ for zk, p in zip(z, parts))
    # feature 0: model 0's two members; 1: model 0's third (0.75) and model 1's first (0.25); 2: model 1's
    expected = torch.tensor([[2.0, 0.75 * 5 + 0.25 * 7, 10.0]], dtype=torch.float64)
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(merged @ parts[0].unmerge_, torch.tensor([[2.0, 2.0, 0.75 * 5 + 0.25 * 7]],
                                                                        dtype=torch.float64))
    torch.testing.assert_close(sum(p.share_ for p in parts), torch.ones(3, dtype=torch.float64))


# ------------------------------------------------------------- partial zipping
def _hidden(layers, x, upto):
    with torch.no_grad():
        for layer in list(layers)[:upto]:
            x = layer(x)
    return x


def test_partial_zipping_at_the_last_layer_is_the_heads_ensemble_on_the_zipped_trunk():
    models = [_make("mlp", seed) for seed in range(3)]
    x = _archs.inputs("mlp", 512, 0)
    weights = [0.5, 0.3, 0.2]
    full = _quiet(lambda: ZipItMerger(models, weights=weights, device="cpu").fit(x))
    partial = _quiet(lambda: ZipItMerger(models, weights=weights, stop_at=-1, device="cpu").fit(x))
    assert partial.zipped_ == [True, True]
    # the trunk is the fully zipped model's hidden layers; each head reads it through its unmerge matrix
    trunk = _hidden(full.merged_model_.layers, x, 4)
    heads = [m.layers[4](trunk @ part.unmerge_.to(trunk.dtype)) for m, part in zip(models, full.aligners_[1])]
    ensemble = sum(w * h for w, h in zip(weights, heads))
    with torch.no_grad():
        out = partial.merged_model_(x)
        separate = partial.merged_model_.head_outputs(x)
        torch.testing.assert_close(out, ensemble, rtol=1e-10, atol=1e-10)
        for got, expected in zip(separate, heads):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        # linear output layers: the mean of the heads' logits is the full zip's output
        torch.testing.assert_close(out, full.merged_model_(x), rtol=1e-10, atol=1e-10)


def test_partial_zipping_in_the_middle_keeps_each_models_later_layers():
    models = [_make("mlp", seed) for seed in range(2)]
    x = _archs.inputs("mlp", 512, 0)
    partial = _quiet(lambda: ZipItMerger(models, stop_at="layers.0", device="cpu").fit(x))
    assert partial.zipped_ == [True, False] and partial.labels_[1] is None
    assert partial.aligners_[1] == [None, None]
    states = partial.aligned_state_dicts()  # each model in the merged basis of the zipped space
    torch.testing.assert_close(states[1]["layers.2.weight"],
                               models[1].layers[2].weight @ partial.aligners_[0][1].unmerge_.T)
    zipped = partial.merged_model_.heads[0]
    trunk = _hidden(zipped.layers, x, 2)
    expected = []
    for model, part in zip(models, partial.aligners_[0]):
        with torch.no_grad():
            expected.append(_hidden(model.layers[2:], trunk @ part.unmerge_.to(trunk.dtype), 3))
    with torch.no_grad():
        torch.testing.assert_close(partial.merged_model_(x), 0.5 * (expected[0] + expected[1]),
                                   rtol=1e-10, atol=1e-10)
    # the trunk's tensors are stored once; the heads' are each model's own
    first, second = partial.merged_model_.heads
    assert first.layers[0].weight is second.layers[0].weight
    assert first.layers[2].weight is not second.layers[2].weight
    torch.testing.assert_close(first.layers[4].bias, models[0].layers[4].bias)


def test_the_cut_brings_in_what_the_zipped_layers_read():
    model = _make("resnet", 0)
    x = _archs.inputs("resnet", 128, 0)
    merger = _quiet(lambda: ZipItMerger([model, _make("resnet", 1)], stop_at=0, device="cpu").fit(x))
    names = [s.name for s, z in zip(merger.spaces_, merger.zipped_) if z]
    # the stream of stage 1 is written by every block of stage 1, which reads its inner spaces
    assert names == [s.name for s in merger.spaces_ if s.name.startswith(("conv1", "layer1."))]
    assert all(s.startswith(("conv1", "layer1.")) for s in names) and len(names) < len(merger.spaces_)
    assert has_shared_trunk(merger.merged_model_, "conv1.weight")


def has_shared_trunk(model, name):
    tensors = [head.get_parameter(name) for head in model.heads]
    return all(t is tensors[0] for t in tensors)


def test_attention_spaces_of_one_layer_are_zipped_together():
    cls = _modern.MODERN["bert"]
    torch.manual_seed(0)
    models = [cls().double().eval() for _ in range(2)]
    x = cls.example_input(64, 0, torch.float64)
    merger = _quiet(lambda: ZipItMerger(models, stop_at=1, device="cpu").fit(x))
    families = {}
    for space, zipped in zip(merger.spaces_, merger.zipped_):
        if space.block_family is not None:
            families.setdefault(space.block_family, set()).add(zipped)
    assert all(len(states) == 1 for states in families.values()), families


# -------------------------------------------------------------- conventions
def test_weights_and_merge_with_weights():
    models = [_make("vgg", seed) for seed in range(2)]
    x = _archs.inputs("vgg", 128, 0)
    merger = _quiet(lambda: ZipItMerger(models, device="cpu").fit(x))
    direct = _quiet(lambda: ZipItMerger(models, weights=[3, 1], device="cpu").fit(x))
    again = merger.merge_with_weights([0.75, 0.25], x)
    with torch.no_grad():
        torch.testing.assert_close(again(x), direct.merged_model_(x), rtol=1e-9, atol=1e-9)
    partial = _quiet(lambda: ZipItMerger(models, stop_at=1, device="cpu").fit(x))
    heads = partial.merge_with_weights([1, 0])
    assert isinstance(heads, MultiHeadModel) and heads.head_weights.tolist() == [1.0, 0.0]


def test_refit_matches_again_without_a_pass():
    from skmerge._statistics_cache import clear_statistics_cache

    models = [_make("mlp", seed) for seed in range(2)]
    x = _archs.inputs("mlp", 128, 0)
    merger = _quiet(lambda: ZipItMerger(models, beta=0.0, device="cpu").fit(x))
    statistics = merger.statistics_
    _quiet(lambda: merger.refit(x, beta=1.0, alpha=0.1, weights=[1, 3]))
    assert merger.statistics_ is statistics and merger.timings_["statistics"] == 0.0
    clear_statistics_cache()
    direct = _quiet(lambda: ZipItMerger(models, beta=1.0, alpha=0.1, weights=[1, 3], device="cpu").fit(x))
    assert merger.within_model_merges_ == direct.within_model_merges_
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(merger.labels_, direct.labels_))
    for key, value in direct.merged_model_.state_dict().items():
        torch.testing.assert_close(merger.merged_model_.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="stop_at"):
        merger.refit(x, stop_at=1)


def test_inputs_are_never_modified_and_persistence(tmp_path):
    models = [_make("vgg", seed) for seed in range(2)]
    models[1].train()
    before = [_archs.state_copy(m) for m in models]
    x = _archs.inputs("vgg", 64, 0)
    merger = _quiet(lambda: ZipItMerger(models, stop_at=1, device="cpu").fit(x))
    for state, model in zip(before, models):
        assert all(torch.equal(state[key], model.state_dict()[key]) for key in state)
    assert [m.training for m in models] == [False, True]
    joblib.dump(merger, tmp_path / "zip.joblib")
    loaded = joblib.load(tmp_path / "zip.joblib")
    with torch.no_grad():
        torch.testing.assert_close(loaded.merged_model_(x), merger.merged_model_(x))
    first, second = loaded.merged_model_.heads
    assert first.features[0].weight is second.features[0].weight  # still one trunk
    assert merger.predict(x).shape == (64,) and 0 <= merger.score(x, merger.predict(x)) <= 1


def test_clone_and_parameters():
    models = [_make("mlp", seed) for seed in range(2)]
    merger = ZipItMerger(models, alpha=0.1, beta=0.5, stop_at="layers.2")
    cloned = clone(merger)
    assert cloned.models is models
    assert cloned.get_params() == {**merger.get_params(), "models": models}
    assert copy.deepcopy(merger).get_params()["stop_at"] == "layers.2"


@pytest.mark.parametrize("params, error, match", [
    ({"alpha": 1.5}, ValueError, "alpha"), ({"beta": -0.1}, ValueError, "beta"),
    ({"alpha": "high"}, ValueError, "alpha"), ({"stop_at": 2.5}, TypeError, "stop_at"),
    ({"stop_at": 7}, ValueError, "out of range"), ({"stop_at": "nowhere"}, ValueError, "layers.0"),
    ({"reset_bn": "sometimes"}, ValueError, "reset_bn"), ({"reference": 2}, ValueError, "out of range"),
])
def test_bad_parameters_raise_clear_errors(params, error, match):
    models = [_make("mlp", seed) for seed in range(2)]
    with pytest.raises(error, match=match):
        ZipItMerger(models, device="cpu", **params).fit(_archs.inputs("mlp", 32))


def test_needs_data_and_two_models():
    models = [_make("mlp", seed) for seed in range(2)]
    with pytest.raises(ValueError, match="alignment data"):
        ZipItMerger(models, device="cpu").fit(None)
    with pytest.raises(ValueError, match="at least 2"):
        ZipItMerger(models[:1], device="cpu").fit(_archs.inputs("mlp", 32))


@parametrize_with_checks(
    [ZipItMerger(_archs.any_width_models(), device="cpu"),
     ZipItMerger(_archs.any_width_models(), stop_at=0, device="cpu")],
    expected_failed_checks=lambda estimator: {
        "check_estimators_overwrite_params": "torch modules (the models) do not hash deterministically"},
)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)


def test_docs_and_docstrings_run():
    result = doctest.testfile(str(ROOT / "docs" / "user_guide" / "zipit.rst"),
                              module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0
    result = doctest.testmod(zipit, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0
