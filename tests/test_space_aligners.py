"""ModelMerger(space_aligners=...): other aligners for the spaces a selector picks."""

import warnings

import pytest
import torch
from sklearn.base import clone

from skmerge import ModelMerger, ReferenceFreeMerger
from skmerge._blocks import BlockAligner
from skmerge.aligners import CCAAligner, IdentityAligner, PermutationAligner, ProcrustesAligner
from skmerge.graph import permute_model

from _modern import GPT2Like


def _gpt(seed):
    torch.manual_seed(seed)
    return GPT2Like(dim=16, heads=4, depth=2).double().eval()


def _data(n=256, seed=1):
    return GPT2Like.example_input(batch=n, seed=seed)


def _inner(aligner):
    """The aligner of one (space, model) pair, inside its per-head wrapper if it has one."""
    return aligner.aligner if isinstance(aligner, BlockAligner) else aligner


def _kinds(merger):
    return {space.name: type(_inner(row[1])).__name__ for space, row in zip(merger.spaces_, merger.aligners_)}


def _state_equal(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=atol, rtol=0) for k in sa)


def test_the_selected_spaces_get_their_aligner_and_the_others_the_default():
    models, x = [_gpt(0), _gpt(1)], _data()
    merger = ModelMerger(models, CCAAligner(), space_aligners=[("*mlp*", PermutationAligner())],
                         device="cpu").fit(x)
    kinds = _kinds(merger)
    mlp = [name for name in kinds if "mlp" in name]
    assert len(mlp) == 2 and all(kinds[name] == "PermutationAligner" for name in mlp)
    assert all(kind == "CCAAligner" for name, kind in kinds.items() if name not in mlp)


def test_first_matching_pair_wins_and_callables_select_too():
    models, x = [_gpt(0), _gpt(1)], _data()
    pairs = [(lambda space: space.dim == 64, IdentityAligner()), ("*mlp*", PermutationAligner()),
             ("*", ProcrustesAligner())]
    kinds = _kinds(ModelMerger(models, CCAAligner(), space_aligners=pairs, device="cpu").fit(x))
    assert {kind for name, kind in kinds.items() if "mlp" in name} == {"IdentityAligner"}  # 4 x 16 hidden
    assert {kind for name, kind in kinds.items() if "mlp" not in name} == {"ProcrustesAligner"}


def test_one_aligner_for_every_space_is_the_same_merge_as_that_aligner():
    models, x = [_gpt(0), _gpt(1)], _data()
    everywhere = ModelMerger(models, CCAAligner(), space_aligners=[("*", PermutationAligner())],
                             device="cpu").fit(x)
    plain = ModelMerger(models, PermutationAligner(), device="cpu").fit(x)
    assert _state_equal(everywhere.merged_model_, plain.merged_model_)


def test_merge_with_a_permuted_copy_stays_exact_with_mixed_aligners():
    model, x = _gpt(0), _data()
    permuted, _ = permute_model(model, x[:2], seed=2)
    merger = ModelMerger([model, permuted], CCAAligner(), device="cpu",
                         space_aligners=[("*mlp*", PermutationAligner()), ("*attn.q*", ProcrustesAligner())])
    with torch.no_grad():
        expected = model(x)
        got = merger.fit(x).merged_model_(x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-9


def test_refit_changes_the_space_aligners_without_a_pass():
    models, x = [_gpt(0), _gpt(1)], _data()
    merger = ModelMerger(models, CCAAligner(), device="cpu").fit(x)
    statistics = merger.statistics_
    merger.refit(space_aligners=[("*mlp*", PermutationAligner())])
    assert merger.statistics_ is statistics and merger.timings_["statistics"] == 0.0
    fresh = ModelMerger(models, CCAAligner(), space_aligners=[("*mlp*", PermutationAligner())],
                        device="cpu").fit(x)
    assert _state_equal(merger.merged_model_, fresh.merged_model_, atol=1e-12)
    assert _kinds(merger) == _kinds(fresh)


def test_parameters_are_stored_unchanged_and_clone():
    pairs = [("*mlp*", PermutationAligner())]
    merger = ModelMerger([_gpt(0), _gpt(1)], space_aligners=pairs)
    assert merger.get_params()["space_aligners"] is pairs
    copy = clone(merger)
    assert copy.space_aligners[0][0] == "*mlp*"
    assert isinstance(copy.space_aligners[0][1], PermutationAligner)
    assert copy.space_aligners[0][1] is not pairs[0][1]


@pytest.mark.parametrize("bad, error", [
    ("*mlp*", "list of \\(selector, aligner\\) pairs"),
    ({"*mlp*": PermutationAligner()}, "list of \\(selector, aligner\\) pairs"),
    ([("*mlp*",)], "must be a \\(selector, aligner\\) pair"),
    ([(3, PermutationAligner())], "selector must be a name pattern"),
    ([("*mlp*", "permutation")], "fit_from_stats"),
])
def test_malformed_space_aligners_are_refused_before_any_pass(bad, error):
    class Unreadable:
        def __iter__(self):
            raise AssertionError("the data was read")

        def __len__(self):
            return 1

    with pytest.raises(TypeError, match=error):
        ModelMerger([_gpt(0), _gpt(1)], space_aligners=bad, device="cpu").fit(Unreadable())


def test_a_selector_matching_no_space_is_an_error_naming_the_spaces():
    models, x = [_gpt(0), _gpt(1)], _data()
    calls = []
    merger = ModelMerger(models, space_aligners=[("*conv*", PermutationAligner())], device="cpu")
    with pytest.raises(ValueError, match=r"'\*conv\*' matches none of the 7 feature spaces \('wte"):
        merger.fit(x)
    assert not hasattr(merger, "statistics_")  # refused before the pass
    fitted = ModelMerger(models, device="cpu").fit(x)
    with pytest.raises(ValueError, match="matches none"):
        fitted.refit(space_aligners=[(lambda space: calls.append(space) or False, PermutationAligner())])
    assert len(calls) == 7


def test_inputs_are_not_modified():
    models, x = [_gpt(0), _gpt(1)], _data()
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelMerger(models, space_aligners=[("*mlp*", PermutationAligner())], device="cpu").fit(x)
    assert all(torch.equal(b[k], v) for m, b in zip(models, before) for k, v in m.state_dict().items())


def test_reference_free_merger_takes_space_aligners_too():
    model, x = _gpt(0), _data()
    copies = [model] + [permute_model(model, x[:2], seed=s)[0] for s in (2, 3)]
    merger = ReferenceFreeMerger(copies, CCAAligner(), space_aligners=[("*mlp*", PermutationAligner())],
                                 device="cpu")
    with torch.no_grad():
        expected = model(x)
        got = merger.fit(x).merged_model_(x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-6  # CCA's barycenter: iterative
    kinds = {space.name: {type(_inner(a)).__name__ for a in row} for space, row in
             zip(merger.spaces_, merger.aligners_)}
    assert all(kinds[name] == {"PermutationAligner"} for name in kinds if "mlp" in name)
    assert all(kinds[name] == {"CCAAligner"} for name in kinds if "mlp" not in name)
    with pytest.raises(ValueError, match="regularization=0"):
        ReferenceFreeMerger(copies, space_aligners=[("*mlp*", CCAAligner(regularization=0))],
                            device="cpu").fit(x)
