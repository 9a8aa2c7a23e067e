"""hierarchical_merge: tree shape and weights, identical models, real merges, errors."""

import copy
import doctest

import numpy as np
import pytest
import torch

from skmerge import CCAAligner, IdentityAligner, ModelMerger, PermutationAligner
from skmerge.batchnorm import reset_bn_stats
from skmerge.hierarchical import hierarchical_merge

import _archs

torch.set_num_threads(1)


def _make(name, seed, dtype=torch.float64):
    return _archs.make_model(name, seed, dtype, randomize_bn=False)


@pytest.mark.parametrize("n_models, shape", [(2, [1]), (3, [1, 1]), (4, [2, 1]), (5, [2, 1, 1])])
def test_tree_shape_and_uniform_weights(n_models, shape):
    models = [_make("mlp", seed) for seed in range(n_models)]
    inputs = _archs.inputs("mlp", 64)
    merged, mergers = hierarchical_merge(models, inputs, IdentityAligner(), device="cpu")
    assert [len(level) for level in mergers] == shape
    assert merged is mergers[-1][0].merged_model_
    # identity alignment: the tree is exactly the uniform average of the leaves
    states = [m.state_dict() for m in models]
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, sum(s[key] for s in states) / n_models)
    if n_models == 5:  # ((01)(23)) then 4, i.e. weights 4 : 1
        np.testing.assert_allclose(mergers[-1][0].weights_, [0.8, 0.2])


@pytest.mark.parametrize("name", ["mlp", "vgg"])
@pytest.mark.parametrize("aligner", [CCAAligner(regularization=0.1), PermutationAligner()],
                         ids=["cca", "permutation"])
def test_identical_models_give_the_same_function(name, aligner):
    inputs = _archs.inputs(name, 64)
    # BatchNorm statistics of the data, as in a trained model
    model = reset_bn_stats(_make(name, seed=3), inputs, batch_size=64)
    models = [model] + [copy.deepcopy(model) for _ in range(3)]
    merged, _ = hierarchical_merge(models, inputs, aligner, batch_size=64, device="cpu")
    torch.testing.assert_close(_archs.outputs(merged, inputs), _archs.outputs(model, inputs), rtol=1e-6, atol=1e-6)


def test_merger_kwargs_are_passed_and_models_untouched():
    models = [_make("vgg", seed) for seed in range(3)]
    models[1].train()
    before = [copy.deepcopy(m.state_dict()) for m in models]
    inputs = _archs.inputs("vgg", 32)
    _, mergers = hierarchical_merge(models, inputs, PermutationAligner(), reset_bn=False,
                                    reference=1, device="cpu")
    for merger in (m for level in mergers for m in level):
        assert merger.reset_bn is False and merger.reference == 1
        assert isinstance(merger.aligner, PermutationAligner)
    assert mergers[0][0].aligner is not mergers[1][0].aligner  # cloned
    assert models[1].training
    for state, model in zip(before, models):
        for key, value in model.state_dict().items():
            assert torch.equal(state[key], value)


def test_bad_inputs():
    mlp = _make("mlp", 0)
    inputs = _archs.inputs("mlp", 8)
    with pytest.raises(ValueError, match="at least 2 models"):
        hierarchical_merge([mlp], inputs)
    with pytest.raises(TypeError, match="list or tuple"):
        hierarchical_merge(mlp, inputs)
    with pytest.raises(TypeError, match="weights"):
        hierarchical_merge([mlp, mlp], inputs, weights=[1, 2])
    with pytest.raises(TypeError, match="models"):
        hierarchical_merge([mlp, mlp], inputs, models=[mlp])
    with pytest.raises(ValueError, match="one architecture"):
        hierarchical_merge([mlp, mlp, _make("vgg", 0)], inputs)
    with pytest.raises(TypeError, match="fit_from_stats"):
        hierarchical_merge([mlp, mlp], inputs, aligner=object())


@pytest.fixture(scope="module")
def digits():
    return _archs.digits_mlps(4)


@pytest.mark.parametrize("n_models", [3, 4])
def test_real_merge_on_digits(digits, n_models):
    models, train, test = digits
    inputs, _ = train.tensors
    models = models[:n_models]
    accuracy = {}
    for name, aligner in [("cca", CCAAligner()), ("permutation", PermutationAligner())]:
        _, mergers = hierarchical_merge(models, inputs, aligner, device="cpu")
        accuracy["hierarchical " + name] = mergers[-1][0].score(*test.tensors)
        flat = ModelMerger(models, aligner, device="cpu").fit(inputs)
        accuracy["all-to-one " + name] = flat.score(*test.tensors)
    accuracy["identity"] = ModelMerger(models, IdentityAligner(), device="cpu").fit(inputs).score(
        *test.tensors)
    print(n_models, {key: round(value, 3) for key, value in accuracy.items()})
    assert accuracy["hierarchical cca"] > accuracy["identity"] + 0.2, accuracy
    assert accuracy["hierarchical permutation"] > accuracy["identity"] + 0.2, accuracy
    assert accuracy["hierarchical cca"] > 0.9, accuracy


def test_docstring_example_runs():
    import skmerge.hierarchical

    result = doctest.testmod(skmerge.hierarchical, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
