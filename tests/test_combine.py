"""ModelMerger(combine=...): Fisher-weighted averaging and RegMean after alignment."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from skmerge import CCAAligner, ModelMerger, PermutationAligner
from skmerge._fisher import aligned_fisher, fisher_average, fisher_transform
from skmerge._regmean import regmean_solve
from skmerge.combine import Fisher, RegMean
from skmerge.graph import ParamSlice, Space, permute_model
from skmerge.reference_free import ReferenceFreeMerger

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _archs  # noqa: E402

torch.set_num_threads(2)


def _make(name, seed, dtype=torch.float64):
    return _archs.make_model(name, seed, dtype, randomize_bn=False)


_quiet = _archs.quiet


def _aligned_models(merger, models):
    out = []
    for state in merger.aligned_state_dicts():
        model = copy.deepcopy(models[0])
        model.load_state_dict(state)
        out.append(model.eval())
    return out


# ---------------------------------------------------------------------- Fisher
def test_fisher_average_of_equal_zero_and_missing_fishers():
    rng = np.random.default_rng(0)
    states = [{"w": torch.as_tensor(rng.normal(size=(3, 4))), "b": torch.as_tensor(rng.normal(size=3)),
               "n": torch.tensor(7)} for _ in range(2)]
    fisher = {"w": torch.as_tensor(rng.uniform(size=(3, 4)))}
    weights = [0.25, 0.75]
    equal = fisher_average(states, [fisher, fisher], weights)
    torch.testing.assert_close(equal["w"], 0.25 * states[0]["w"] + 0.75 * states[1]["w"])
    torch.testing.assert_close(equal["b"], 0.25 * states[0]["b"] + 0.75 * states[1]["b"])  # no Fisher
    assert equal["n"] == 7
    zero = {"w": torch.zeros(3, 4, dtype=torch.float64)}
    torch.testing.assert_close(fisher_average(states, [zero, fisher], weights)["w"], states[1]["w"])
    torch.testing.assert_close(fisher_average(states, [zero, zero], weights)["w"],  # nothing known: average
                               0.25 * states[0]["w"] + 0.75 * states[1]["w"])
    other = {"w": torch.as_tensor(rng.uniform(size=(3, 4)))}
    expected = (0.25 * fisher["w"] * states[0]["w"] + 0.75 * other["w"] * states[1]["w"]) / (
        0.25 * fisher["w"] + 0.75 * other["w"])
    torch.testing.assert_close(fisher_average(states, [fisher, other], weights)["w"], expected)


def _fisher_by_loop(model, x, batch_size, seed=0):
    """Independent: labels drawn as the merger draws them, per-example gradients one at a time."""
    model = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        with torch.no_grad():
            probabilities = torch.softmax(model(batch).double(), dim=1)
        labels = torch.multinomial(probabilities, 1, generator=generator).reshape(-1)
        for xi, yi in zip(batch, labels):
            model.zero_grad()
            F.log_softmax(model(xi[None]), dim=1)[0, yi].backward()
            for name, p in model.named_parameters():
                total[name] += p.grad.square()
    return {name: value / len(x) for name, value in total.items()}


def test_fisher_merge_equals_the_fisher_average_of_the_permuted_models():
    models = [_make("mlp", seed) for seed in range(2)]
    x = _archs.inputs("mlp", 96, 0)
    weights = [0.6, 0.4]
    merger = _quiet(lambda: ModelMerger(models, PermutationAligner(), weights=weights, combine="fisher",
                                        batch_size=32, device="cpu").fit(x))
    aligned = _aligned_models(merger, models)
    # the Fisher of an aligned (permuted) model, computed on that model, is the permuted Fisher
    fishers = [_fisher_by_loop(m, x, 32) for m in aligned]
    merged = merger.merged_model_.state_dict()
    for name in fishers[0]:
        f0, f1 = fishers[0][name], fishers[1][name]
        t0, t1 = aligned[0].state_dict()[name], aligned[1].state_dict()[name]
        expected = torch.where(f0 + f1 > 0, (0.6 * f0 * t0 + 0.4 * f1 * t1) / (0.6 * f0 + 0.4 * f1),
                               0.6 * t0 + 0.4 * t1)
        torch.testing.assert_close(merged[name], expected, rtol=1e-9, atol=1e-12)
    assert set(merger.timings_) >= {"combine", "statistics"}


def test_fisher_of_a_permuted_copy_gives_the_model_and_equal_fishers_give_the_average():
    model = _make("vgg", 0)
    x = _archs.inputs("vgg", 64, 0)
    permuted = permute_model(model, x[:2], seed=2)[0]
    merger = _quiet(lambda: ModelMerger([model, permuted], PermutationAligner(), combine="fisher",
                                        reset_bn=False, device="cpu").fit(x))
    with torch.no_grad():
        torch.testing.assert_close(merger.merged_model_(x), model(x), rtol=0, atol=1e-10)
    # the aligned Fishers of the two copies agree: Fisher weighting changes nothing
    aligned = [aligned_fisher(f, s, merger.spaces_, merger.combination_._transforms(merger, k))
               for k, (f, s) in enumerate(zip(merger.combination_.fishers_, merger.aligned_state_dicts()))]
    for name in aligned[0]:
        torch.testing.assert_close(aligned[0][name], aligned[1][name], rtol=1e-6, atol=1e-12)


def test_the_fisher_transform_follows_the_gradients_of_a_reparametrized_layer():
    rng = np.random.default_rng(0)
    d = 4
    mapping = torch.as_tensor(rng.normal(size=(d, d))) + 3 * torch.eye(d, dtype=torch.float64)
    inverse = torch.linalg.inv(mapping)
    a, b = torch.as_tensor(rng.normal(size=(d, 3))), torch.as_tensor(rng.normal(size=(2, d)))
    x = torch.as_tensor(rng.normal(size=(3,)))
    # a linear network b @ a @ x and its reparametrization a' = M^T a, b' = b M^-T: the same function
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = (mapping.T @ a).requires_grad_(), (b @ inverse.T).requires_grad_()
    (b1 @ a1 @ x).sum().backward()
    (b2 @ a2 @ x).sum().backward()
    torch.testing.assert_close(a2.grad, inverse @ a1.grad)       # rows: g' = M^-1 g
    torch.testing.assert_close(b2.grad, b1.grad @ mapping)       # columns: g' = g M
    # the diagonal Fisher moves as the diagonal of M^-1 diag(F) M^-T (rows) and M^T diag(F) M (columns)
    space = Space(dim=d, producers=[ParamSlice("a", 0, torch.arange(d))],
                  consumers=[ParamSlice("b", 1, torch.arange(d))])
    fa, fb = torch.as_tensor(rng.uniform(size=(d, 3))), torch.as_tensor(rng.uniform(size=(2, d)))
    moved = aligned_fisher({"a": fa, "b": fb}, {"a": a, "b": b}, [space], [(mapping, inverse)])
    for c in range(3):
        torch.testing.assert_close(moved["a"][:, c], torch.diagonal(inverse @ torch.diag(fa[:, c]) @ inverse.T))
    for r in range(2):
        torch.testing.assert_close(moved["b"][r], torch.diagonal(mapping.T @ torch.diag(fb[r]) @ mapping))
    permutation = torch.tensor([2, 0, 3, 1])
    assert fisher_transform(permutation) is permutation  # moved by indexing, like the parameters


def test_fisher_needs_classifier_outputs():
    class Vector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x))).reshape(-1)

    torch.manual_seed(0)
    models = [Vector(), Vector()]
    with pytest.raises(ValueError, match=r"\(n_samples, n_classes\)"):
        _quiet(lambda: ModelMerger(models, combine="fisher", device="cpu").fit(torch.randn(32, 4)))


# --------------------------------------------------------------------- RegMean
def test_regmean_solve_is_least_squares_on_the_stacked_data():
    rng = np.random.default_rng(0)
    xs = [torch.as_tensor(rng.normal(size=(50, 5)) @ rng.normal(size=(5, 5))) for _ in range(3)]
    ws = [torch.as_tensor(rng.normal(size=(2, 5))) for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    solution = regmean_solve(ws, [x.T @ x for x in xs], weights, alpha=1.0)
    stacked_x = torch.cat([np.sqrt(w) * x for w, x in zip(weights, xs)])
    stacked_y = torch.cat([np.sqrt(w) * x @ wk.T for w, x, wk in zip(weights, xs, ws)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    torch.testing.assert_close(solution, expected, rtol=1e-9, atol=1e-10)
    # alpha = 0: a weighted average of every column, weighted by each model's input energy in it
    diagonal = regmean_solve(ws, [x.T @ x for x in xs], weights, alpha=0.0)
    energy = [w * (x * x).sum(0) for w, x in zip(weights, xs)]
    torch.testing.assert_close(diagonal, sum(e * wk for e, wk in zip(energy, ws)) / sum(energy))
    # an input that is zero for every model: its column is the weighted average
    dead = [torch.cat([x[:, :4], torch.zeros(50, 1, dtype=torch.float64)], 1) for x in xs]
    solution = regmean_solve(ws, [x.T @ x for x in dead], weights, alpha=1.0)
    torch.testing.assert_close(solution[:, 4], sum(w * wk[:, 4] for w, wk in zip(weights, ws)))


def test_regmean_solve_survives_an_eigensolver_that_does_not_converge(monkeypatch):
    rng = np.random.default_rng(1)
    x = [torch.as_tensor(rng.normal(size=(5, 4))) for _ in range(2)]  # rank 5 of 4 + 4 columns
    grams = [xi.T @ xi for xi in x]
    weights_k = [torch.as_tensor(rng.normal(size=(3, 4))) for _ in range(2)]
    expected = regmean_solve(weights_k, grams, [0.5, 0.5], 1.0)

    def failing(matrix):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)
    torch.testing.assert_close(regmean_solve(weights_k, grams, [0.5, 0.5], 1.0), expected,
                               rtol=1e-9, atol=1e-11)


def _aligned_inputs(model, aligner, layer, x):
    """The inputs of ``layer`` in ``model``, expressed in the aligned basis of their space."""
    seen = []
    probe = copy.deepcopy(model)
    handle = probe.get_submodule(layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        probe(x)
    handle.remove()
    inputs = seen[0]
    mapping = torch.eye(inputs.shape[1], dtype=inputs.dtype) if aligner is None else torch.as_tensor(
        aligner.mapping_).to(inputs.dtype)
    return torch.einsum("nc...,cd->nd...", inputs, mapping)


@pytest.mark.parametrize("aligner", [PermutationAligner(), CCAAligner()])
def test_regmean_layers_are_the_least_squares_fit_of_all_aligned_models(aligner):
    models = [_make("mlp", seed) for seed in range(3)]
    x = _archs.inputs("mlp", 200, 0)
    merger = _quiet(lambda: ModelMerger(models, aligner, combine=RegMean(alpha=1.0), device="cpu").fit(x))
    aligned = _aligned_models(merger, models)
    # the last layer reads the second hidden space: inputs differ per model
    rows, targets = [], []
    for model, row, new in zip(models, merger.aligners_[1], aligned):
        h = _aligned_inputs(model, row, "layers.4", x)
        rows.append(torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1))
        targets.append(new.layers[4](h).detach())
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    merged = merger.merged_model_.layers[4]
    torch.testing.assert_close(merged.weight, solution[:, :-1], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(merged.bias, solution[:, -1], rtol=1e-7, atol=1e-9)
    # the first layer reads the network input, the same for every model: the average of the aligned layers
    torch.testing.assert_close(merger.merged_model_.layers[0].weight,
                               sum(m.layers[0].weight for m in aligned) / 3, rtol=1e-7, atol=1e-9)


def test_regmean_of_a_convolution_fits_the_aligned_patches():
    models = [_make("vgg", seed) for seed in range(2)]
    x = _archs.inputs("vgg", 64, 0)
    merger = _quiet(lambda: ModelMerger(models, CCAAligner(), combine=RegMean(alpha=1.0), reset_bn=False,
                                        device="cpu").fit(x))
    aligned = _aligned_models(merger, models)
    conv = "features.4"  # reads features.0's space after a max-pool
    space = next(i for i, s in enumerate(merger.spaces_) if s.name == "features.0")
    rows, targets = [], []
    for model, row, new in zip(models, merger.aligners_[space], aligned):
        h = _aligned_inputs(model, row, conv, x)
        patches = F.unfold(h, 3, padding=1).transpose(1, 2).reshape(-1, h.shape[1] * 9)
        rows.append(torch.cat([patches, torch.ones(len(patches), 1, dtype=h.dtype)], 1))
        layer = new.get_submodule(conv)
        targets.append(patches @ layer.weight.reshape(layer.weight.shape[0], -1).T + layer.bias)
    solution = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets).detach()).solution.T
    merged = merger.merged_model_.get_submodule(conv)
    torch.testing.assert_close(merged.weight.reshape(merged.weight.shape[0], -1), solution[:, :-1],
                               rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(merged.bias, solution[:, -1], rtol=1e-6, atol=1e-8)
    layers = {path for path, m in models[0].named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert set(merger.combination_.layers_) == layers and len(layers) == 5


@pytest.mark.parametrize("combine", ["regmean", "fisher"])
def test_permuted_copies_stay_exact_and_inputs_are_untouched(combine):
    model = _make("resnet", 0)
    x = _archs.inputs("resnet", 64, 0)
    permuted = permute_model(model, x[:2], seed=1)[0]
    permuted.train()
    before = [_archs.state_copy(m) for m in (model, permuted)]
    merger = _quiet(lambda: ModelMerger([model, permuted], PermutationAligner(), combine=combine,
                                        reset_bn=False, device="cpu").fit(x))
    for state, m in zip(before, (model, permuted)):
        assert all(torch.equal(state[key], m.state_dict()[key]) for key in state)
    assert permuted.training and not model.training
    with torch.no_grad():
        torch.testing.assert_close(merger.merged_model_(x), model(x), rtol=0, atol=1e-9)


# ------------------------------------------------------ in the alignment pass
def _own_pass(combination, merger, models, x) -> dict:
    """The statistics of ``combination`` measured by a pass of its own over ``x``."""
    from skmerge._batches import as_loader

    own = clone(combination).fit_statistics(merger, models, as_loader(x, merger.batch_size), torch.float64)
    return own.statistics()


def _assert_same_statistics(a: dict, b: dict) -> None:
    for name in a:
        if name in ("fishers_", "grams_"):
            assert [sorted(d) for d in a[name]] == [sorted(d) for d in b[name]]
            for da, db in zip(a[name], b[name]):
                for key in da:
                    torch.testing.assert_close(da[key], db[key], rtol=1e-12, atol=1e-14)
        else:
            assert a[name] == b[name]


@pytest.mark.parametrize("arch", ["mlp", "vgg", "resnet"])
@pytest.mark.parametrize("combine", [RegMean(), Fisher()])
def test_the_alignment_pass_measures_the_combination_statistics(arch, combine):
    """The statistics streamed in the alignment pass are those of a pass of their own."""
    from skmerge._statistics_cache import clear_statistics_cache

    clear_statistics_cache()
    models = [_make(arch, seed) for seed in range(3)]
    x = _archs.inputs(arch, 40, 0)
    merger = _quiet(lambda: ModelMerger(models, PermutationAligner(), combine=clone(combine), batch_size=16,
                                        reset_bn=False, device="cpu").fit(x))
    _assert_same_statistics(merger.combination_.statistics(),
                            _own_pass(merger.combination_, merger, models, x))
    if isinstance(combine, RegMean):  # the first layer reads the network input itself
        first = next(p for p, m in models[0].named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
        assert first in merger.combination_.grams_[0]


def test_fisher_draws_its_labels_from_the_logits_of_the_alignment_pass(monkeypatch):
    """No second forward pass per batch: the merger's runner outputs are the logits Fisher samples from."""
    from skmerge._fisher import FisherSums

    seen = []
    original = FisherSums.add

    def spy(self, inputs, outputs=None):
        seen.append(outputs is not None and len(outputs) == 1 and outputs[0].shape == (len(inputs), 5))
        return original(self, inputs, outputs)

    monkeypatch.setattr(FisherSums, "add", spy)
    models = [_make("mlp", seed) for seed in range(2)]
    _quiet(lambda: ModelMerger(models, PermutationAligner(), combine="fisher", batch_size=16,
                               device="cpu").fit(_archs.inputs("mlp", 48, 0)))
    assert seen == [True] * 6  # 3 batches x 2 models


@pytest.mark.parametrize("combine", ["regmean", "fisher"])
def test_a_one_shot_stream_is_enough_for_a_combination(combine):
    from torch.utils.data import DataLoader

    from test_concurrency_and_streams import _Stream

    models = [_make("mlp", seed) for seed in range(2)]
    x = _archs.inputs("mlp", 48, 0)
    streamed = _quiet(lambda: ModelMerger(models, PermutationAligner(), combine=combine, device="cpu")
                      .fit(DataLoader(_Stream(x, False), batch_size=16)))
    direct = _quiet(lambda: ModelMerger(models, PermutationAligner(), combine=combine, batch_size=16,
                                        device="cpu").fit(x))
    _same_state(direct.merged_model_, streamed.merged_model_)


class _StridedByHand(torch.nn.Module):
    """A convolution module that is also called with another stride, through F.conv2d."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.other = torch.nn.Conv2d(6, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.conv(x))
        y = self.other(h) + F.avg_pool2d(F.conv2d(h, self.other.weight, self.other.bias, stride=1,
                                                  padding=1), 1)
        z = F.conv2d(h, self.other.weight, None, stride=2, padding=1)  # not how the module is called
        return self.head(y.mean((2, 3)) + F.interpolate(z, size=y.shape[2:]).mean((2, 3)))


def test_a_layer_the_runner_cannot_report_gets_a_pass_of_its_own():
    torch.manual_seed(0)
    models = [_StridedByHand().double() for _ in range(2)]
    x = torch.randn(24, 1, 6, 6, dtype=torch.float64)
    merger = _quiet(lambda: ModelMerger(models, PermutationAligner(), combine="regmean", device="cpu",
                                        self_check=False).fit(x))
    from skmerge.graph._runner import runner_for

    runner = runner_for(models[0], x[:2], merger.spaces_)
    keys, unmapped = runner.layer_inputs({"conv": models[0].conv, "other": models[0].other,
                                          "head": models[0].head})
    assert unmapped == ["other"] and sorted(p for paths in keys.values() for p in paths) == ["conv", "head"]
    _assert_same_statistics(merger.combination_.statistics(),
                            _own_pass(merger.combination_, merger, models, x))


# ---------------------------------------------------------------- conventions
def test_parameters_clone_persistence_and_merge_with_weights(tmp_path):
    models = [_make("mlp", seed) for seed in range(2)]
    x = _archs.inputs("mlp", 128, 0)
    merger = ModelMerger(models, combine=RegMean(alpha=0.5), device="cpu")
    assert merger.get_params()["combine__alpha"] == 0.5
    assert clone(merger).combine is not merger.combine
    merger = _quiet(lambda: merger.fit(x))
    direct = _quiet(lambda: ModelMerger(models, combine=RegMean(alpha=0.5), weights=[1, 3],
                                        device="cpu").fit(x))
    torch.testing.assert_close(merger.merge_with_weights([0.25, 0.75]).state_dict()["layers.4.weight"],
                               direct.merged_model_.state_dict()["layers.4.weight"])
    joblib.dump(merger, tmp_path / "m.joblib")
    loaded = joblib.load(tmp_path / "m.joblib")
    assert loaded.combination_.grams_[0].keys() == merger.combination_.grams_[0].keys()
    reference_free = _quiet(lambda: ReferenceFreeMerger(models, PermutationAligner(), combine="fisher",
                                                        device="cpu").fit(x))
    assert isinstance(reference_free.combination_, Fisher)
    uniform = _quiet(lambda: ModelMerger(models, device="cpu").fit(x))
    assert not hasattr(uniform, "combination_")


def _same_state(a, b):
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.fixture
def statistics_passes(monkeypatch):
    """Counts how often the combinations (Fisher and RegMean) measure their statistics.

    In the alignment pass (``stream``) or in a pass of their own (``fit_statistics``).
    """
    from skmerge._statistics_cache import clear_statistics_cache

    count = [0]
    for cls in (Fisher, RegMean):
        for method in ("fit_statistics", "stream"):
            original = getattr(cls, method)

            def counted(self, *args, _original=original, **kwargs):
                count[0] += 1
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, method, counted)
    clear_statistics_cache()
    yield count
    clear_statistics_cache()


@pytest.mark.parametrize("combine", [RegMean(alpha=0.5), Fisher()])
def test_refit_reuses_the_statistics_of_combine_under_another_aligner(combine, statistics_passes):
    from skmerge._statistics_cache import clear_statistics_cache

    models = [_make("mlp", seed) for seed in range(3)]
    x = _archs.inputs("mlp", 96, 0)
    merger = _quiet(lambda: ModelMerger(models, PermutationAligner(), combine=clone(combine),
                                        device="cpu").fit(x))
    assert statistics_passes[0] == 1
    params = {"aligner": CCAAligner(0.3), "weights": [0.5, 0.25, 0.25]}
    if isinstance(combine, RegMean):
        params["combine__alpha"] = 0.8  # not a parameter of the Gram matrices
    _quiet(lambda: merger.refit(x, **params))
    assert statistics_passes[0] == 1 and merger.timings_["combine"] == 0.0
    assert merger.combination_.get_params() == merger.combine.get_params()
    clear_statistics_cache()
    expected = _quiet(lambda: ModelMerger(models, device="cpu", combine=clone(combine))
                      .set_params(**params).fit(x))
    assert statistics_passes[0] == 2
    _same_state(expected.merged_model_, merger.merged_model_)
    # back to uniform averaging: the combination goes
    _quiet(lambda: merger.refit(x, combine="uniform"))
    assert not hasattr(merger, "combination_")


def test_refit_to_a_combine_without_statistics_needs_data(statistics_passes):
    models = [_make("mlp", seed) for seed in range(2)]
    x = _archs.inputs("mlp", 96, 0)
    merger = _quiet(lambda: ModelMerger(models, PermutationAligner(), device="cpu").fit(x))
    with pytest.raises(ValueError, match="refit cannot use combine='regmean' without data"):
        merger.refit(combine="regmean")
    _quiet(lambda: merger.refit(x, combine="regmean"))
    assert statistics_passes[0] == 1 and isinstance(merger.combination_, RegMean)
    direct = _quiet(lambda: ModelMerger(models, PermutationAligner(), combine="regmean",
                                        device="cpu").fit(x))
    _same_state(direct.merged_model_, merger.merged_model_)
    # another Fisher seed is another estimate: measured again, on X
    _quiet(lambda: merger.refit(x, combine=Fisher(random_state=0)))
    _quiet(lambda: merger.refit(x, combine=Fisher(random_state=1)))
    assert statistics_passes[0] == 3


def test_grid_search_over_combine_measures_the_statistics_once_per_fold(statistics_passes):
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from skmerge._statistics_cache import clear_statistics_cache

    models = [_make("mlp", seed) for seed in range(2)]
    x, y = _archs.inputs("mlp", 120, 0), np.arange(120) % 5
    grid = {"combine__alpha": [0.2, 0.6, 1.0]}
    cv = StratifiedKFold(2)
    search = _quiet(lambda: GridSearchCV(ModelMerger(models, CCAAligner(0.3), combine=RegMean(),
                                                     device="cpu"), grid, cv=cv).fit(x, y))
    assert statistics_passes[0] == 2 + 1  # one per fold, and the refit on all the data
    uncached = []
    for alpha in grid["combine__alpha"]:
        scores = []
        for train, test in cv.split(x, y):
            clear_statistics_cache()
            m = _quiet(lambda: ModelMerger(models, CCAAligner(0.3), combine=RegMean(alpha),
                                           device="cpu").fit(x[train]))
            scores.append(m.score(x[test], y[test]))
        uncached.append(np.mean(scores))
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], uncached, rtol=0, atol=1e-12)


@pytest.mark.parametrize("combine, error, match", [
    ("median", ValueError, "combine must be"), (3, TypeError, "combine must be"),
    (RegMean(alpha=2.0), ValueError, "alpha"), (RegMean(max_features=0), ValueError, "max_features"),
    (Fisher(random_state="x"), ValueError, "random_state"),
])
def test_bad_combinations_raise_clear_errors(combine, error, match):
    models = [_make("mlp", seed) for seed in range(2)]
    with pytest.raises(error, match=match):
        ModelMerger(models, combine=combine, device="cpu").fit(_archs.inputs("mlp", 32))


def test_skipped_layers_are_averaged_and_named():
    models = [_make("norm", seed) for seed in range(2)]
    x = _archs.inputs("norm", 64, 0)
    merger = _quiet(lambda: ModelMerger(models, CCAAligner(), combine=RegMean(max_features=20),
                                        device="cpu").fit(x))
    skipped = merger.combination_.skipped_
    assert skipped and all("max_features=20" in why for why in skipped.values())
    uniform = _quiet(lambda: ModelMerger(models, CCAAligner(), device="cpu").fit(x))
    for path in skipped:
        torch.testing.assert_close(merger.merged_model_.get_submodule(path).weight,
                                   uniform.merged_model_.get_submodule(path).weight)


@parametrize_with_checks(
    [ModelMerger(_archs.any_width_models(), PermutationAligner(), combine="regmean", device="cpu"),
     ModelMerger(_archs.any_width_models(), PermutationAligner(), combine=Fisher(), device="cpu")],
    expected_failed_checks=lambda estimator: {
        "check_estimators_overwrite_params": "torch modules (the models) do not hash deterministically",
        "check_parameters_default_constructible": "the default aligner is an estimator instance"},
)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check(estimator)


def test_docs_run():
    import doctest

    root = Path(__file__).resolve().parents[1]
    result = doctest.testfile(str(root / "docs" / "user_guide" / "combine.rst"), module_relative=False,
                              optionflags=doctest.ELLIPSIS)
    assert result.attempted > 5 and result.failed == 0
