"""WeightMatchingMerger: exact on permuted copies without data, real merges, sklearn API, errors."""

import copy
import doctest
import os
import warnings

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

from skmerge import IdentityAligner, ModelMerger
from skmerge.batchnorm import reset_bn_stats
from skmerge.graph import apply_transforms, find_spaces, permute_model
from skmerge.graph._apply import gather_slice, permute_space_
from skmerge.weight_matching import MatchedPermutation, WeightMatchingMerger, weight_matching

import _archs

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _found(merger, k=1):
    return [row[k].permutation_ for row in merger.aligners_]


# ----------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet", "cat", "norm"])
def test_permuted_copy_is_undone_exactly_without_data(name):
    model = _archs.make_model(name, seed=0)
    inputs = _archs.inputs(name, 32)
    permuted, perms = permute_model(model, inputs[:2], seed=1)
    merger = WeightMatchingMerger([model, permuted], reset_bn=False, device="cpu",
                                  example_input=inputs[:2], random_state=0).fit()
    # random weights have no ties: the found permutations are the inverses of the random ones
    for perm, found in zip(perms, _found(merger)):
        assert torch.equal(perm[torch.as_tensor(found)], torch.arange(len(perm)))
    torch.testing.assert_close(_archs.outputs(merger.merged_model_, inputs), _archs.outputs(model, inputs),
                               rtol=1e-12, atol=1e-12)
    assert merger.n_iter_[0] == 0 and 2 <= merger.n_iter_[1] <= 10
    assert merger.n_samples_seen_ == 0 and merger.timings_["statistics"] == 0.0
    # the reference may be either model: the merge is then the permuted copy's function
    swapped = WeightMatchingMerger([model, permuted], reference=1, reset_bn=False, device="cpu",
                                   example_input=inputs[:2]).fit()
    torch.testing.assert_close(_archs.outputs(swapped.merged_model_, inputs), _archs.outputs(model, inputs),
                               rtol=1e-12, atol=1e-12)


def test_data_only_finds_spaces_and_resets_batchnorm():
    model = _archs.make_model("vgg", seed=0)
    inputs = _archs.inputs("vgg", 64)
    permuted, _ = permute_model(model, inputs[:2], seed=2)
    other = _archs.make_model("vgg", seed=3)
    free = WeightMatchingMerger([model, permuted, other], reset_bn=False, device="cpu",
                                example_input=inputs[:2], random_state=0).fit()
    with_data = WeightMatchingMerger([model, permuted, other], device="cpu", random_state=0).fit(inputs)
    for a, b in zip(_found(free, 2) + _found(free, 1), _found(with_data, 2) + _found(with_data, 1)):
        np.testing.assert_array_equal(a, b)
    assert not hasattr(with_data, "n_features_in_")  # 4-D inputs
    # with data, the BatchNorm statistics are re-estimated on it
    expected = reset_bn_stats(copy.deepcopy(free.merged_model_), inputs, batch_size=128)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(with_data.merged_model_.state_dict()[key], value)
    assert not torch.allclose(expected.features[1].running_mean,
                              free.merged_model_.features[1].running_mean)


def test_three_copies_and_groupnorm_blocks():
    model = _archs.make_model("norm", seed=0)
    inputs = _archs.inputs("norm", 16)
    spaces = find_spaces(model, inputs[:2])
    copies = [model] + [permute_model(model, spaces=spaces, seed=s)[0] for s in (4, 5)]
    merger = WeightMatchingMerger(copies, spaces=spaces, reset_bn=False, device="cpu").fit()
    torch.testing.assert_close(_archs.outputs(merger.merged_model_, inputs), _archs.outputs(model, inputs),
                               rtol=1e-12, atol=1e-12)
    # no input at all (spaces by hand): classes_ is set at the first prediction
    assert not hasattr(merger, "classes_")
    predicted = merger.predict(inputs)
    assert predicted.shape == (16,) and set(predicted) <= set(range(5))
    assert not hasattr(merger, "classes_")  # predict does not change the estimator
    # GroupNorm: permutations of another (non-copy) model stay inside the groups
    other = WeightMatchingMerger([model, _archs.make_model("norm", seed=1)], spaces=spaces, device="cpu").fit()
    gn_space = next(i for i, s in enumerate(spaces) if s.block_size != s.dim)
    perm, block = other.aligners_[gn_space][1].permutation_, spaces[gn_space].block_size
    np.testing.assert_array_equal(perm // block, np.arange(len(perm)) // block)


def test_weight_matching_function_and_helpers():
    model = _archs.make_model("resnet", seed=0)
    permuted, perms = permute_model(model, _archs.inputs("resnet", 2), seed=7)
    spaces = find_spaces(model, _archs.inputs("resnet", 2))
    found, n_iter, converged = weight_matching(model.state_dict(), permuted.state_dict(), spaces,
                                               random_state=1)
    assert converged and n_iter >= 2
    restored = apply_transforms(permuted.state_dict(), spaces, found)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=0)
    # gather_slice / permute_space_ agree with apply_transforms
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    for space, perm in zip(spaces, perms):
        permute_space_(state, space, perm)
    for key, value in permuted.state_dict().items():
        assert torch.equal(state[key], value), key
    sl = spaces[0].producers[0]
    assert gather_slice(model.state_dict()[sl.name], sl).shape[:2] == (spaces[0].dim, 1)


def test_matched_permutation_follows_the_aligner_convention():
    aligner = MatchedPermutation([2, 0, 1])
    X = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(aligner.transform(X), X @ aligner.mapping_)
    np.testing.assert_array_equal(aligner.inverse_transform(aligner.transform(X)), X)
    np.testing.assert_array_equal(aligner.inverse_mapping_, aligner.mapping_.T)
    assert torch.equal(aligner.transform(torch.as_tensor(X)), torch.as_tensor(X @ aligner.mapping_))
    assert aligner.n_features_in_ == 3 and "d=3" in repr(aligner)


# ------------------------------------------------------------------ real merge
def test_weight_matching_beats_identity_averaging_on_digits():
    models, train, test = _archs.digits_mlps(3)
    inputs, _ = train.tensors
    accuracy = {}
    for n in (2, 3):
        matched = WeightMatchingMerger(models[:n], example_input=inputs[:2], device="cpu",
                                       random_state=0).fit()
        accuracy["weight matching", n] = matched.score(*test.tensors)
        plain = ModelMerger(models[:n], IdentityAligner(), device="cpu").fit(inputs)
        accuracy["identity", n] = plain.score(*test.tensors)
    print(accuracy)
    for n in (2, 3):
        assert accuracy["weight matching", n] > accuracy["identity", n] + 0.1, accuracy
        assert accuracy["weight matching", n] > 0.85, accuracy


# ---------------------------------------------------------- scikit-learn API
def test_clone_get_params_and_joblib(tmp_path):
    model = _archs.make_model("mlp", seed=0)
    inputs = _archs.inputs("mlp", 16)
    permuted, _ = permute_model(model, inputs[:2], seed=1)
    other = _archs.make_model("mlp", seed=1)
    merger = WeightMatchingMerger([model, permuted, other], example_input=inputs[:2], device="cpu",
                                  max_iter=50, random_state=3)
    params = merger.get_params()
    assert params["max_iter"] == 50 and params["random_state"] == 3 and "aligner" not in params
    cloned = clone(merger)
    assert cloned.models is merger.models and cloned.get_params()["max_iter"] == 50
    cloned.set_params(max_iter=20)
    assert merger.max_iter == 50
    merger.fit()
    assert isinstance(merger.aligners_[0][1], MatchedPermutation) and merger.aligners_[0][0] is None
    path = tmp_path / "merger.joblib"
    joblib.dump(merger, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.predict_logits(inputs), merger.predict_logits(inputs))
    for a, b in zip(_found(loaded, 2), _found(merger, 2)):
        np.testing.assert_array_equal(a, b)
    # inherited machinery: aligned state dicts and reweighting
    states = merger.aligned_state_dicts()
    assert len(states) == 3
    only_copy = merger.merge_with_weights([0, 1, 0])
    torch.testing.assert_close(_archs.outputs(only_copy, inputs), _archs.outputs(model, inputs))
    assert merger.n_features_in_ == 12 and list(merger.classes_) == list(range(5))


def test_models_are_not_modified():
    model = _archs.make_model("resnet", seed=0).train()
    other = _archs.make_model("resnet", seed=1)
    before = [copy.deepcopy(m.state_dict()) for m in (model, other)]
    WeightMatchingMerger([model, other], example_input=_archs.inputs("resnet", 2), reset_bn=False,
                         device="cpu").fit()
    assert model.training and not other.training
    for state, m in zip(before, (model, other)):
        for key, value in m.state_dict().items():
            assert torch.equal(state[key], value)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs():
    mlp = _archs.make_model("mlp", seed=0)
    example = _archs.inputs("mlp", 2)
    with pytest.raises(ValueError, match="at least 2 models"):
        WeightMatchingMerger([mlp], example_input=example).fit()
    with pytest.raises(TypeError, match="list or tuple"):
        WeightMatchingMerger(mlp, example_input=example).fit()
    with pytest.raises(ValueError, match="one architecture"):
        WeightMatchingMerger([mlp, _archs.make_model("vgg", seed=0)], example_input=example).fit()
    with pytest.raises(ValueError, match="needs an input"):
        WeightMatchingMerger([mlp, mlp]).fit()
    with pytest.raises(ValueError, match="max_iter"):
        WeightMatchingMerger([mlp, mlp], example_input=example, max_iter=0).fit()
    with pytest.raises(ValueError, match="random_state|RandomState"):
        WeightMatchingMerger([mlp, mlp], example_input=example, random_state="x").fit()
    with pytest.raises(ValueError, match="out of range"):
        WeightMatchingMerger([mlp, mlp], example_input=example, reference=2).fit()
    with pytest.raises(ValueError, match="weights"):
        WeightMatchingMerger([mlp, mlp], example_input=example, weights=[1, -1]).fit()
    with pytest.raises(ValueError, match="example_input"):
        WeightMatchingMerger([mlp, mlp], example_input=example[:0]).fit()
    spaces = find_spaces(mlp, example)
    with pytest.raises(ValueError, match="self_check"):
        WeightMatchingMerger([mlp, mlp], spaces=spaces, self_check=True).fit()


def test_batchnorm_without_data_warns_and_max_iter_warns():
    vgg = _archs.make_model("vgg", seed=0)
    other = _archs.make_model("vgg", seed=1)
    example = _archs.inputs("vgg", 2)
    with pytest.warns(UserWarning, match="BatchNorm"):
        WeightMatchingMerger([vgg, other], example_input=example, device="cpu").fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WeightMatchingMerger([vgg, other], example_input=example, reset_bn=False, device="cpu").fit()
    with pytest.warns(ConvergenceWarning, match="max_iter"):
        merger = WeightMatchingMerger([vgg, other], example_input=example, reset_bn=False,
                                      device="cpu", max_iter=1).fit()
    assert merger.n_iter_[1] == 1


def test_docstring_example_runs():
    import skmerge.weight_matching

    result = doctest.testmod(skmerge.weight_matching, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_user_guide_page_examples_run_and_table_is_committed():
    """docs/user_guide/beyond.rst: its examples run, it includes the benchmark's table."""
    path = os.path.join(ROOT, "docs", "user_guide", "beyond.rst")
    result = doctest.testfile(path, module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 10
    with open(path) as handle:
        assert "literalinclude:: ../_generated/beyond_the_paper.txt" in handle.read()
    with open(os.path.join(ROOT, "docs", "_generated", "beyond_the_paper.txt")) as handle:
        table = handle.read()
    for name in ("WeightMatchingMerger", "hierarchical  CCAAligner", "all-to-one  IdentityAligner"):
        assert name in table
