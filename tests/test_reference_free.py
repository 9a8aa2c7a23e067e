"""ReferenceFreeMerger: joint statistics, leave-one-out targets, exactness, reference independence."""

from __future__ import annotations

import copy
import dataclasses
import doctest
import inspect
import pickle
import sys
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

import skmerge
import skmerge.reference_free as reference_free
from skmerge import CCAAligner, IdentityAligner, ModelMerger, PermutationAligner, ProcrustesAligner
from skmerge.diagnostics import correlation_matrix
from skmerge.graph import find_spaces, permute_model
from skmerge.reference_free import JointCovariance, ReferenceFreeMerger, _LeaveOneOutTargets

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _archs  # noqa: E402

torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]


def _make(name, seed, dtype=torch.float64):
    return _archs.make_model(name, seed, dtype, randomize_bn=False)


def _views(seed, n, dims=(5, 3, 4), offset=100.0):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 2))
    return [latent @ rng.normal(size=(2, d)) + rng.normal(size=(n, d)) * (1 + k) + offset
            for k, d in enumerate(dims)]


def _noisy_permuted_copies(sigma=0.5, n_models=4, seed=0):
    """Copies of one MLP with weight noise, each permuted at random: ambiguous matchings."""
    base = _make("mlp", seed)
    inputs = _archs.inputs("mlp", 512, seed)
    models = []
    for k in range(n_models):
        model = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(sigma * p.std() * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        models.append(permute_model(model, inputs[:2], seed=k + 1)[0] if k else model)
    return models, inputs


# ------------------------------------------------------------- joint statistics
def test_joint_covariance_matches_numpy_cov_of_the_concatenation():
    views = _views(0, 203)
    dims = [v.shape[1] for v in views]
    edges = np.cumsum([0] + dims)
    expected = np.cov(np.concatenate(views, axis=1).T)
    stats = JointCovariance(3, reference=1)
    for start in range(0, 203, 50):  # streamed, in unequal batches
        stats.update([v[start:start + 50] for v in views])
    assert stats.n_samples_ == 203 and stats.n_features_ == dims
    assert len(stats._moments) == 6  # the blocks (i, j) with i <= j
    for i in range(3):
        np.testing.assert_allclose(stats.means_[i].numpy(), views[i].mean(0), rtol=1e-12)
        for j in range(3):
            block = expected[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
            np.testing.assert_allclose(stats.covariance(i, j).numpy(), block, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.covariance(2).numpy(), np.cov(views[2].T), rtol=1e-9)
    # pair(i, j): view i as X, view j as Y; the reference by default
    pair = stats.pair(2, 0)
    np.testing.assert_allclose(pair.covariance_xy().numpy(), expected[8:, :5], rtol=1e-9)
    np.testing.assert_allclose(stats.pair(0).covariance_xy().numpy(), expected[:5, 5:8], rtol=1e-9)
    # merging two shards = one pass over all of it; float32 products stay close
    a = JointCovariance(3).update([v[:120] for v in views])
    b = JointCovariance(3).update([v[120:] for v in views])
    merged = a + b
    single = JointCovariance(3, precision="single").update(
        [torch.as_tensor(v, dtype=torch.float32) for v in views])
    for i in range(3):
        for j in range(i, 3):
            block = expected[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
            np.testing.assert_allclose(merged.covariance(i, j).numpy(), block, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(single.covariance(i, j).numpy(), block, rtol=1e-4, atol=1e-4)
    restored = pickle.loads(pickle.dumps(merged))
    assert torch.equal(restored.covariance(0, 2), merged.covariance(0, 2))
    assert "n_views=3" in repr(stats) and "empty" in repr(JointCovariance(2))


def test_joint_covariance_errors():
    views = _views(1, 20)
    with pytest.raises(ValueError, match="n_views"):
        JointCovariance(0)
    with pytest.raises(ValueError, match="reference"):
        JointCovariance(2, reference=2)
    with pytest.raises(ValueError, match="precision"):
        JointCovariance(2, precision="half")
    with pytest.raises(ValueError, match="Expected 3 views"):
        JointCovariance(3).update(views[:2])
    with pytest.raises(ValueError, match="sequence"):
        JointCovariance(1).update(views[0])
    with pytest.raises(ValueError, match="no data"):
        JointCovariance(3).covariance(0, 1)
    with pytest.raises(IndexError):
        JointCovariance(3).update(views).covariance(3)
    with pytest.raises(ValueError, match="different n_views"):
        JointCovariance(3).update(views).merge(JointCovariance(2).update(views[:2]))


# ---------------------------------------------------------- leave-one-out targets
def _captured(model, inputs, space):
    """A space's activations at its taps when ``model`` runs on ``inputs``."""
    return _archs.tap_samples(model, space, inputs)


def test_statistics_and_leave_one_out_targets_match_captured_activations():
    models = [_make("mlp", seed) for seed in range(4)]
    inputs = _archs.inputs("mlp", 300)
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    merger = ReferenceFreeMerger(models, CCAAligner(0.2), weights=weights, device="cpu",
                                 max_iter=3, batch_size=64).fit(inputs)
    space = merger.spaces_[0]
    acts = [_captured(model, inputs, space) for model in models]
    stats = merger.statistics_[0]
    assert stats.n_samples_ == 300
    joint = np.cov(np.concatenate(acts, axis=1).T)
    d = space.dim
    for i in range(4):
        for j in range(4):
            np.testing.assert_allclose(stats.covariance(i, j).numpy(), joint[i * d:(i + 1) * d, j * d:(j + 1) * d],
                                       rtol=1e-8, atol=1e-12)

    def direct(mappings, k):
        others = [j for j in range(4) if j != k]
        a = weights[others] / weights[others].sum()
        Y = sum(a_j * acts[j] @ mappings[j] for a_j, j in zip(a, others))
        # the target is rescaled to the others' average total variance
        raw = sum(a_j * np.trace(np.cov(acts[j].T)) for a_j, j in zip(a, others))
        return Y * np.sqrt(raw / np.trace(np.cov(Y.T)))

    def check(targets, mappings):
        for k in range(4):
            got, Y = targets.target(k), direct(mappings, k)
            np.testing.assert_allclose(got.covariance_xy().numpy(), np.cov(acts[k].T, Y.T)[:d, d:],
                                       rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(got.covariance_yy().numpy(), np.cov(Y.T), rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(got.covariance_xx().numpy(), np.cov(acts[k].T), rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(got.mean_y_.numpy(), Y.mean(0), rtol=1e-8, atol=1e-12)
            np.testing.assert_allclose(got.mean_x_.numpy(), acts[k].mean(0), rtol=1e-12)

    # the fitted mappings of every model (none is None)
    mappings = [torch.as_tensor(a.mapping_).numpy() for a in merger.aligners_[0]]
    targets = _LeaveOneOutTargets(stats, [torch.as_tensor(m) for m in mappings], weights)
    check(targets, mappings)
    # the incremental update after a change of one mapping
    rng = np.random.default_rng(0)
    mappings[2] = rng.normal(size=(d, d))
    targets.set_mapping(2, torch.as_tensor(mappings[2]))
    check(targets, mappings)


# --------------------------------------------------------------------- exactness
@pytest.mark.parametrize("architecture", ["GPT2Like", "TimmViT"])
@pytest.mark.parametrize("aligner", [PermutationAligner(), CCAAligner()], ids=["permutation", "cca"])
def test_transformers_with_permuted_heads_merge_into_the_model(architecture, aligner):
    # permute_model moves whole heads too: the heads must be matched to the
    # reference's before the blocks are aligned within
    import _modern

    cls = getattr(_modern, architecture)
    torch.manual_seed(0)
    model = cls().double().eval()
    inputs = cls.example_input(batch=192, seed=1, dtype=torch.float64)
    copies = [model] + [permute_model(model, inputs[:2], seed=s)[0] for s in (2, 3)]
    with torch.no_grad():
        expected = model(inputs)
    for reference in (0, 2):
        merger = ReferenceFreeMerger(copies, clone(aligner), reference=reference, device="cpu").fit(inputs)
        with torch.no_grad():
            got = merger.merged_model_(inputs)
        assert float((got - expected).abs().max() / expected.abs().max()) < 1e-9
        assert merger.converged_


@pytest.mark.parametrize("name", ["mlp", "norm", "resnet"])
@pytest.mark.parametrize("aligner", [PermutationAligner(), CCAAligner()], ids=["permutation", "cca"])
def test_permuted_copies_merge_into_the_model_for_every_reference(name, aligner):
    model = _make(name, seed=0)
    inputs = _archs.inputs(name, 256)
    spaces = find_spaces(model, inputs[:2])
    copies = [model] + [permute_model(model, spaces=spaces, seed=s)[0] for s in (1, 2)]
    expected = _archs.outputs(model, inputs)
    tolerance = 1e-10 if isinstance(aligner, PermutationAligner) else 1e-6
    for reference in range(3):
        merger = ReferenceFreeMerger(copies, clone(aligner), reference=reference, spaces=spaces,
                                     reset_bn=False, device="cpu").fit(inputs)
        torch.testing.assert_close(_archs.outputs(merger.merged_model_, inputs), expected,
                                   rtol=tolerance, atol=tolerance)
        # every model has an aligner, the reference included
        assert all(a is not None for row in merger.aligners_ for a in row)
        if isinstance(aligner, PermutationAligner):
            # permutations all along (applied by indexing), converged at once
            assert all(getattr(a, "permutation_", None) is not None for row in merger.aligners_ for a in row)
            assert merger.n_iter_ == 1 and merger.converged_
    if name == "norm":  # GroupNorm: the transforms stay block-diagonal
        index = next(i for i, s in enumerate(spaces) if s.block_size != s.dim)
        mapping = torch.as_tensor(merger.aligners_[index][1].mapping_)
        block = spaces[index].block_size
        groups = torch.arange(spaces[index].dim) // block
        assert torch.all(mapping[groups[:, None] != groups[None, :]] == 0)


def test_repair_works_in_the_common_basis():
    model = _make("mlp", seed=0)
    inputs = _archs.inputs("mlp", 256)
    copies = [model] + [permute_model(model, inputs[:2], seed=s)[0] for s in (1, 2)]
    merger = ReferenceFreeMerger(copies, PermutationAligner(), reference=2, repair=True,
                                 device="cpu").fit(inputs)
    assert "repair" in merger.timings_
    # the aligned copies agree exactly, so REPAIR has nothing to correct
    torch.testing.assert_close(_archs.outputs(merger.merged_model_, inputs), _archs.outputs(model, inputs),
                               rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------- reference independence
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_permutation_barycenter_does_not_depend_on_the_reference(seed):
    # Noisy permuted copies: all-to-one matchings to different references disagree,
    # the barycenter is the same from every start.
    models, inputs = _noisy_permuted_copies(seed=seed)
    outputs = {}
    for cls in (ModelMerger, ReferenceFreeMerger):
        outputs[cls] = [cls(models, PermutationAligner(), reference=r, device="cpu").fit(inputs)
                        .predict_logits(inputs) for r in range(len(models))]
    all_to_one = max(np.abs(o - outputs[ModelMerger][0]).max() for o in outputs[ModelMerger])
    barycenter = max(np.abs(o - outputs[ReferenceFreeMerger][0]).max() for o in outputs[ReferenceFreeMerger])
    assert all_to_one > 0.05
    assert barycenter < 1e-10


@pytest.fixture(scope="module")
def digits_models():
    return _archs.digits_mlps(4)


def test_cca_barycenter_depends_much_less_on_the_reference(digits_models):
    models, train, test = digits_models
    inputs, _ = train.tensors
    logits, accuracy = {}, {}
    for name, cls in [("all-to-one", ModelMerger), ("barycenter", ReferenceFreeMerger)]:
        mergers = [cls(models, CCAAligner(), reference=r, device="cpu").fit(inputs) for r in range(4)]
        logits[name] = np.stack([m.predict_logits(test.tensors[0]) for m in mergers])
        accuracy[name] = np.array([m.score(*test.tensors) for m in mergers])
    # spread of the merged model's outputs across the 4 references, relative to their size
    spread = {name: np.abs(out - out.mean(0)).mean() / np.abs(out).mean() for name, out in logits.items()}
    assert spread["barycenter"] < 0.5 * spread["all-to-one"], spread
    # ... at no cost in accuracy, far above plain averaging
    plain = ModelMerger(models, IdentityAligner(), device="cpu").fit(inputs).score(*test.tensors)
    assert accuracy["barycenter"].mean() >= accuracy["all-to-one"].mean() - 0.01, accuracy
    assert accuracy["barycenter"].min() > plain + 0.1, (accuracy, plain)


def test_grid_search_joblib_and_inherited_methods(digits_models, tmp_path):
    models, train, test = digits_models
    inputs, labels = train.tensors
    search = GridSearchCV(ReferenceFreeMerger(models[:3], CCAAligner(), device="cpu", max_iter=3),
                          {"aligner__regularization": [0.1, 0.5]}, cv=2)
    search.fit(inputs.numpy(), labels.numpy())
    best = search.best_estimator_
    assert search.best_params_["aligner__regularization"] in (0.1, 0.5)
    assert best.score(*test.tensors) > 0.8
    assert all(a is b for a, b in zip(best.models, models[:3]))  # clones share the models

    path = tmp_path / "merger.joblib"
    joblib.dump(best, path)
    loaded = joblib.load(path)
    np.testing.assert_array_equal(loaded.predict(test.tensors[0]), best.predict(test.tensors[0]))
    assert loaded.n_iter_ == best.n_iter_ and len(loaded.statistics_) == len(best.statistics_)

    # the merged model is the weighted mean of the aligned state dicts (no model kept as is)
    states = best.aligned_state_dicts()
    merged = best.merged_model_.state_dict()
    for key in merged:
        torch.testing.assert_close(sum(s[key] for s in states) / 3, merged[key])
    assert not all(torch.equal(states[0][key], models[0].state_dict()[key]) for key in merged)
    uniform = best.merge_with_weights([1, 1, 1])
    torch.testing.assert_close(_archs.outputs(uniform, test.tensors[0]), _archs.outputs(best.merged_model_, test.tensors[0]))
    # raw correlations against the starting reference, from the joint statistics
    assert correlation_matrix(best, space=0, model=1).shape == (64, 64)


# ------------------------------------------------------------------ conventions
def test_inputs_are_never_modified_and_modes_are_restored():
    models = [_make("vgg", seed) for seed in range(3)]
    models[1].train()
    before = [_archs.state_copy(m) for m in models]
    ReferenceFreeMerger(models, CCAAligner(), device="cpu", max_iter=2).fit(_archs.inputs("vgg", 64))
    for state, model in zip(before, models):
        after = model.state_dict()
        assert all(torch.equal(state[key], after[key]) for key in state)
    assert [m.training for m in models] == [False, True, False]


def test_clone_get_params_and_parameters_of_model_merger():
    models = [_make("mlp", seed) for seed in range(3)]
    merger = ReferenceFreeMerger(models, CCAAligner(0.1), max_iter=4, tol=1e-3, init="reference")
    params = merger.get_params(deep=True)
    assert params["max_iter"] == 4 and params["tol"] == 1e-3 and params["init"] == "reference"
    assert params["aligner__regularization"] == 0.1
    cloned = clone(merger)
    assert cloned.models is models and cloned.aligner is not merger.aligner
    assert cloned.get_params(deep=False).keys() == merger.get_params(deep=False).keys()
    # every ModelMerger parameter is a parameter here too (and defaults to the same value)
    ours = inspect.signature(ReferenceFreeMerger.__init__).parameters
    for name, parameter in inspect.signature(ModelMerger.__init__).parameters.items():
        assert name in ours, f"ReferenceFreeMerger lacks ModelMerger's parameter {name!r}"
        if parameter.default is not inspect.Parameter.empty and name != "aligner":
            assert ours[name].default == parameter.default, name
    assert skmerge.ReferenceFreeMerger is ReferenceFreeMerger


@pytest.mark.parametrize("params, match", [
    ({"max_iter": 0}, "max_iter"), ({"max_iter": 2.5}, "max_iter"), ({"max_iter": True}, "max_iter"),
    ({"tol": -1e-3}, "tol"), ({"tol": float("nan")}, "tol"), ({"tol": "small"}, "tol"),
    ({"init": "identity"}, "init"), ({"aligner": CCAAligner(regularization=0)}, "regularization=0"),
    ({"precision": "half"}, "precision"), ({"reference": 3}, "out of range"),
])
def test_bad_parameters_raise_clear_errors(params, match):
    models = [_make("mlp", seed) for seed in range(3)]
    with pytest.raises(ValueError, match=match):
        ReferenceFreeMerger(models, **{"device": "cpu", **params}).fit(_archs.inputs("mlp", 32))


def _fake_kernel(tmp_path, monkeypatch, meminfo_kib=64 * 2**20, vm_kib=2**20, cgroup=None,
                 rlimit=None):
    """Point skmerge._memory at fake /proc and /sys/fs/cgroup files; ``cgroup``: 'v1' or 'v2' limits."""
    import resource

    import skmerge._memory as memory

    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: {2 * meminfo_kib} kB\nMemAvailable:  {meminfo_kib} kB\n")
    (proc / "self" / "status").write_text(f"Name: python\nVmSize:\t{vm_kib} kB\n")
    lines = ["1:cpu:/"]
    if cgroup is not None:
        version, limits = cgroup  # limits: [(relative folder, limit, usage, inactive file cache)]
        for folder, limit, usage, cache in limits:
            group = root / ("memory" if version == "v1" else "") / folder
            group.mkdir(parents=True, exist_ok=True)
            if version == "v1":
                (group / "memory.limit_in_bytes").write_text(f"{limit}\n")
                (group / "memory.usage_in_bytes").write_text(f"{usage}\n")
                (group / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {cache}\n")
            else:
                (group / "memory.max").write_text(f"{limit}\n")
                (group / "memory.current").write_text(f"{usage}\n")
                (group / "memory.stat").write_text(f"anon 1\ninactive_file {cache}\n")
        leaf = max((f for f, *_ in limits), key=len)
        lines.append(f"4:memory:/{leaf}" if version == "v1" else f"0::/{leaf}")
    (proc / "self" / "cgroup").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(memory, "PROC", proc)
    monkeypatch.setattr(memory, "CGROUP", root)
    real = resource.getrlimit
    soft = resource.RLIM_INFINITY if rlimit is None else rlimit
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, soft) if which == resource.RLIMIT_AS
                        else real(which))
    return memory


GIB = 2**30


@pytest.mark.parametrize("case, expected", [
    (dict(), 64 * GIB),                                            # MemAvailable only
    (dict(rlimit=5 * GIB, vm_kib=2**20), 4 * GIB),                 # ulimit -v minus VmSize
    (dict(cgroup=("v2", [("", "max", 0, 0), ("job", 3 * GIB, 2 * GIB, GIB)])), 2 * GIB),
    (dict(cgroup=("v2", [("", GIB, GIB // 2, 0), ("job", "max", 0, 0)])), GIB // 2),  # the parent's
    (dict(cgroup=("v1", [("", 2**63 - 4096, 0, 0), ("a/b", 6 * GIB, 5 * GIB, 0)])), GIB),
])
def test_available_memory_respects_ulimit_and_cgroups(tmp_path, monkeypatch, case, expected):
    memory = _fake_kernel(tmp_path, monkeypatch, **case)
    assert memory.available_bytes("cpu") == expected


def test_memory_check_counts_the_solve_and_reads_the_limits(tmp_path, monkeypatch):
    models = [_make("mlp", seed) for seed in range(3)]
    inputs = _archs.inputs("mlp", 64)
    dims = [s.dim for s in find_spaces(models[0], inputs[:2])]
    statistics = reference_free._joint_bytes(3, dims)
    solve = reference_free._solve_bytes(3, dims)
    # The sweeps: every model's mapping and inverse per space, and one space's working set.
    assert solve == sum(8 * 6 * d * d for d in dims) + max(8 * 36 * d * d for d in dims)
    # Room for the statistics but not for the sweeps, under a cgroup limit and under ulimit -v.
    room = statistics + solve // 2
    for case in (dict(cgroup=("v2", [("job", 10 * GIB + room, 10 * GIB, 0)])),
                 dict(cgroup=("v1", [("job", 10 * GIB + room, 10 * GIB + 4096, 4096)])),
                 dict(rlimit=GIB + room, vm_kib=2**20)):
        _fake_kernel(tmp_path / str(len(list(tmp_path.iterdir()))), monkeypatch, **case)
        with pytest.raises(MemoryError, match="sweeps need"):
            ReferenceFreeMerger(models, device="cpu").fit(inputs)
        monkeypatch.undo()
    _fake_kernel(tmp_path / "enough", monkeypatch, rlimit=GIB + statistics + solve, vm_kib=2**20)
    assert ReferenceFreeMerger(models, PermutationAligner(), device="cpu").fit(inputs).n_iter_ >= 1


def test_other_errors_and_edge_cases(monkeypatch):
    models = [_make("mlp", seed) for seed in range(3)]
    inputs = _archs.inputs("mlp", 64)
    with pytest.raises(ValueError, match="at least 2 models"):
        ReferenceFreeMerger(models[:1], device="cpu").fit(inputs)
    with pytest.raises(ValueError, match="needs alignment data"):
        ReferenceFreeMerger(models, device="cpu").fit(None)
    with pytest.raises(TypeError, match="fit_from_stats"):
        ReferenceFreeMerger(models, aligner=object(), device="cpu").fit(inputs)
    # statistics that cannot fit in memory are refused before any forward pass, with the reason
    monkeypatch.setattr(reference_free, "available_bytes", lambda device: 1000)
    with pytest.raises(MemoryError, match="all pairs of its 3 models"):
        ReferenceFreeMerger(models, device="cpu").fit(inputs)
    monkeypatch.undo()
    # the estimate is the size of the statistics
    merger = ReferenceFreeMerger(models, ProcrustesAligner(), device="cpu", max_iter=2).fit(inputs)
    size = sum(t.numel() * t.element_size() for s in merger.statistics_
               for t in list(s._means) + list(s._moments.values()))
    assert reference_free._joint_bytes(3, [s.dim for s in merger.spaces_]) == size
    assert merger.n_iter_ == 2 and not merger.converged_  # continuous: the budget is spent
    # one model with all the weight: the targets average the others uniformly, and the
    # merged model is that model, permuted
    lopsided = ReferenceFreeMerger(models, PermutationAligner(), weights=[0, 1, 0], device="cpu").fit(inputs)
    torch.testing.assert_close(_archs.outputs(lopsided.merged_model_, inputs), _archs.outputs(models[1], inputs))
    # a space that is never observed keeps each model's basis (no aligner), with a warning
    spaces = find_spaces(models[0], inputs[:2])
    spaces[0] = dataclasses.replace(spaces[0], taps=())
    with pytest.warns(UserWarning, match="never observed"):
        blind = ReferenceFreeMerger(models, PermutationAligner(), spaces=spaces, device="cpu").fit(inputs)
    assert blind.aligners_[0] == [None, None, None]
    assert all(a is not None for a in blind.aligners_[1])


def _any_width_models():
    return _archs.any_width_models(3)


# As for ModelMerger (tests/test_merge.py): torch modules do not hash deterministically,
# and the default aligner is an estimator instance.
_EXPECTED_FAILED_CHECKS = {
    "check_estimators_overwrite_params": "torch modules (the models) do not hash deterministically",
    "check_parameters_default_constructible": "the default aligner is an estimator instance",
}


@parametrize_with_checks(
    [ReferenceFreeMerger(_any_width_models(), CCAAligner(), device="cpu", max_iter=3),
     ReferenceFreeMerger(_any_width_models(), PermutationAligner(), device="cpu")],
    expected_failed_checks=lambda estimator: _EXPECTED_FAILED_CHECKS,
)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny random data: small-sample warnings
        check(estimator)


def test_docs_and_docstrings_run():
    result = doctest.testfile(str(ROOT / "docs" / "user_guide" / "reference_free.rst"),
                              module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(reference_free, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0


# ------------------------------------------------------------------ distributed
SHARDS = (70, 50)


def _sharded_fit(rank=None):
    models = [_make("mlp", seed) for seed in range(3)]
    data = _archs.inputs("mlp", sum(SHARDS), seed=5) + 10.0
    if rank is not None:
        start = sum(SHARDS[:rank])
        data = data[start:start + SHARDS[rank]]
    merger = ReferenceFreeMerger(models, CCAAligner(), device="cpu", batch_size=SHARDS[0]).fit(data)
    return {"statistics": merger.statistics_, "n_seen": merger.n_samples_seen_,
            "state_dict": _archs.state_copy(merger.merged_model_)}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(_sharded_fit(rank), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_statistics_are_all_reduced_under_torch_distributed(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    from test_distributed import run_ranks  # its launcher: own sessions, timeouts, port retry

    run_ranks(lambda port: [[sys.executable, __file__, str(rank), str(port), str(tmp_path)]
                            for rank in range(2)], timeout=90)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    single = _sharded_fit()
    for got in ranks:
        assert got["n_seen"] == sum(SHARDS)
        for a, b in zip(got["statistics"], single["statistics"]):
            assert a.n_samples_ == b.n_samples_ and a._pairs == b._pairs
            for key in b._pairs:
                torch.testing.assert_close(a._moments[key], b._moments[key], rtol=1e-9, atol=1e-9)
        for key, value in single["state_dict"].items():
            torch.testing.assert_close(got["state_dict"][key], value, rtol=1e-7, atol=1e-9)


if __name__ == "__main__":  # one rank of the distributed test
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
