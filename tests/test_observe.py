"""The batch observer: statistics fed from inside the runner's forward passes."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import _archs
from skmerge._observe import BatchObserver, taps_by_key
from skmerge.graph import Tap
from skmerge.graph._find import analyze
from skmerge.graph._runner import GraphRunner, ModuleRunner, model_tensors
from skmerge.stats import ReferenceCovariance


class _Looped(nn.Module):
    """``lin`` applied ``repeats`` times (shared weights); ``head`` and ``side`` read the same tensor."""

    def __init__(self, repeats: int) -> None:
        super().__init__()
        self.repeats = repeats
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.side = nn.Linear(3, 2)

    def forward(self, x):
        for _ in range(self.repeats):
            x = torch.relu(self.lin(x))
        return self.head(x) + self.side(x)


def _observe(models, x):
    """Hand-written module taps (the inputs of modules), observed through the module runner."""
    taps = {"lin": [(0, Tap("lin", 1, dim=3))],
            "head": [(1, Tap("head", 1, dim=3))],
            "side": [(1, Tap("side", 1, dim=3))]}
    statistics = [ReferenceCovariance(len(models), reference=0) for _ in range(2)]
    spaces = [SimpleNamespace(name="input"), SimpleNamespace(name="hidden")]
    observer = BatchObserver(statistics, spaces, taps, ModuleRunner(models[0], list(taps)))
    for k, model in enumerate(models):
        observer.run(model_tensors(model), k, x)
    observer.commit()
    return statistics


def _inputs_of(model, path, x):
    seen = []
    handle = model.get_submodule(path).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen


def test_every_call_is_observed_and_a_tensor_read_twice_counts_once():
    torch.manual_seed(0)
    x = torch.randn(50, 3, dtype=torch.float64)
    models = [_Looped(2).double(), _Looped(2).double()]
    with torch.no_grad():
        statistics = _observe(models, x)
    # Space 0: both calls of the shared layer, 100 samples; space 1: "head"
    # and "side" read the same tensor, which is observed once (50 samples).
    assert statistics[0].n_samples_ == 100 and statistics[1].n_samples_ == 50
    for space, path in ((0, "lin"), (1, "head")):
        views = [torch.cat(_inputs_of(model, path, x)).numpy() for model in models]
        expected = np.cov(np.hstack(views).T)
        np.testing.assert_allclose(statistics[space].covariance(1).numpy(), expected[3:, 3:], atol=1e-12)
        np.testing.assert_allclose(statistics[space].cross_covariance(1).numpy(), expected[3:, :3], atol=1e-12)


def test_a_model_calling_a_module_fewer_times_than_the_reference_is_an_error():
    x = torch.randn(20, 3)
    models = [_Looped(2), _Looped(1)]
    taps = {"lin": [(0, Tap("lin", 1, dim=3))]}
    statistics = [ReferenceCovariance(2, reference=0)]
    spaces = [SimpleNamespace(name="input")]
    # the runner is built from each model's structure: model 1 loops once
    observer = BatchObserver(statistics, spaces, taps, ModuleRunner(models[0], list(taps)))
    observer.run(model_tensors(models[0]), 0, x)
    observer.runner = ModuleRunner(models[1], list(taps))
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"Model 1 reached \['lin'\] fewer times"):
        observer.run(model_tensors(models[1]), 1, x)


def test_a_tapped_module_that_never_runs_is_an_error():
    x = torch.randn(20, 3)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"\['lin'\] were never reached"):
        _observe([_Looped(0), _Looped(0)], x)


def test_non_finite_activations_name_the_space_and_the_model():
    x = torch.randn(20, 3)
    broken = _Looped(1)
    with torch.no_grad():
        broken.lin.weight.fill_(float("nan"))
        with pytest.raises(ValueError, match=r"space 1 \(hidden\) of model 1"):
            _observe([_Looped(1), broken], x)

@pytest.mark.parametrize("axis", [1, -1])  # -1 reads the (N, C) input as a view, 1 through a copy
def test_a_module_tap_reads_its_input_before_an_in_place_module_overwrites_it(axis):
    """The input of ``ReLU(inplace=True)`` is observed as it was, not as the ReLU leaves it."""
    def make(inplace):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 2)).double()

    x = torch.randn(40, 3, dtype=torch.float64)
    found = []
    for inplace in (False, True):
        models = [make(inplace), make(inplace)]
        taps = {"1": [(0, Tap("1", axis, dim=6))]}
        statistics = [ReferenceCovariance(2, reference=0)]
        observer = BatchObserver(statistics, [SimpleNamespace(name="hidden")], taps,
                                 ModuleRunner(models[0], list(taps)))
        with torch.no_grad():
            for k, model in enumerate(models):
                observer.run(model_tensors(model), k, x)
        observer.commit()
        found.append(statistics[0])
    with torch.no_grad():
        pre_activation = make(False)[0](x).numpy()
    assert (pre_activation < 0).any()  # the ReLU would change what is observed
    for stats in found:
        np.testing.assert_allclose(stats.means_[1].numpy(), pre_activation.mean(0), atol=1e-12)
        np.testing.assert_allclose(stats.covariance(1).numpy(), np.cov(pre_activation.T), atol=1e-12)



def test_graph_taps_equal_the_values_an_independent_interpreter_records():
    """The graph runner reports each tapped node's value with the given model's tensors."""
    models = [_archs.make_model("resnet", seed) for seed in (0, 1)]
    x = _archs.inputs("resnet", 16)
    traced, spaces = analyze(models[0], x[:2])
    statistics = [ReferenceCovariance(2, reference=0, precision="double") for _ in spaces]
    observer = BatchObserver(statistics, spaces, taps_by_key(spaces),
                             GraphRunner(traced, [t.node for s in spaces for t in s.taps], models[0]))
    for k, model in enumerate(models):
        observer.run(model_tensors(model), k, x)
    observer.commit()
    for space, stats in zip(spaces, statistics):
        views = [_archs.tap_samples(model, space, x) for model in models]
        expected = np.cov(np.hstack(views).T)
        d = space.dim
        np.testing.assert_allclose(stats.covariance(1).numpy(), expected[d:, d:], atol=1e-10)
        np.testing.assert_allclose(stats.cross_covariance(1).numpy(), expected[d:, :d], atol=1e-10)


def test_the_runner_never_touches_the_models():
    """No hook is registered on, and no flag is switched in, the models being observed."""
    model = _archs.make_model("vgg", 0)
    model.train()
    model.features[1].eval()
    flags = [m.training for m in model.modules()]
    x = _archs.inputs("vgg", 4)
    traced, spaces = analyze(model, x[:2])
    runner = GraphRunner(traced, [t.node for s in spaces for t in s.taps], model)
    before = _archs.state_copy(model)
    runner.run(model_tensors(model), (x,))
    assert [m.training for m in model.modules()] == flags
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    _archs.assert_same_state(before, model)


def _run_without_collector(models, x, listener):
    """Observe ``lin``'s and ``head``'s inputs in every model, Python's garbage collector off (so
    that only plain references decide what lives); returns the statistics and the observer."""
    import gc

    taps = {"lin": [(0, Tap("lin", 1, dim=3))], "head": [(1, Tap("head", 1, dim=3))]}
    statistics = [ReferenceCovariance(len(models), reference=0) for _ in range(2)]
    spaces = [SimpleNamespace(name="input"), SimpleNamespace(name="hidden")]
    observer = BatchObserver(statistics, spaces, taps, ModuleRunner(models[0], list(taps)), listener)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for k, model in enumerate(models):
            observer.run(model_tensors(model), k, x)
    finally:
        if enabled:
            gc.enable()
    return statistics, observer


def test_a_models_activations_are_freed_when_its_run_ends():
    """Nothing of the observer keeps a model's tapped tensors alive after its run, even before the
    garbage collector runs (with many models, held activations added up to a model's activations
    per model)."""
    import weakref

    torch.manual_seed(0)
    x = torch.randn(20, 3)
    models = [_Looped(1), _Looped(1)]
    refs = []

    class _Listener:
        def observe(self, k, key, tensor):
            refs.append(weakref.ref(tensor))

        def after_batch(self, k, inputs, outputs):
            pass

    statistics, observer = _run_without_collector(models, x, _Listener())
    alive = [r for r in refs if r() is not None]
    assert len(refs) == 4 and not alive
    observer.commit()
    assert statistics[1].n_samples_ == 20


def test_every_model_frees_each_activation_during_its_run():
    """The observer keeps no observed tensor alive while a model runs, the reference included (the
    deduplication of taps holds weak references): an activation is freed as soon as the forward
    pass is done with it, so a model's tapped activations are never all held at once."""
    import weakref

    torch.manual_seed(0)
    x = torch.randn(20, 3)
    models = [_Looped(2), _Looped(2)]
    runs: dict = {0: [], 1: []}
    alive_at_head = {}

    class _Listener:
        def observe(self, k, key, tensor):
            if key == "head":  # the intermediate read by lin's second call is done with by now
                alive_at_head[k] = runs[k][1]() is not None
            runs[k].append(weakref.ref(tensor))

        def after_batch(self, k, inputs, outputs):
            pass

    statistics, observer = _run_without_collector(models, x, _Listener())
    assert alive_at_head == {0: False, 1: False}
    observer.commit()
    reference = _observe([models[0], models[1]], x)  # the same statistics as an observer without a listener
    for ours, theirs in zip(statistics, reference):
        torch.testing.assert_close(ours.covariance(0, 1), theirs.covariance(0, 1))


def test_freed_memory_reused_by_another_tensor_is_not_taken_for_the_same_tensor():
    """Two taps of one space on different tensors that happen to occupy the same memory one after
    the other (the first freed before the second is made) are both observed."""
    from skmerge._observe import _same_storage, _storage_ref

    a = torch.randn(64, 8)
    ref = _storage_ref(a)
    assert _same_storage(ref, a.detach()) and _same_storage(ref, a[:, :4])
    assert not _same_storage(ref, torch.randn(64, 8))  # alive, but another storage
    del a
    b = torch.randn(64, 8)  # may or may not land at the same address: either way not "the same"
    assert not _same_storage(ref, b)
    assert _same_storage(None, b) is False


def test_a_tensor_without_storage_is_held_for_its_identity():
    """A tensor whose storage cannot be read (a wrapper subclass) is held while the run lasts, so its
    identity stays valid and a second tap reading it still counts it once."""
    from skmerge._observe import _same_storage, _storage_ref

    class _NoStorage(torch.Tensor):
        def untyped_storage(self):
            raise NotImplementedError("no storage")

    t = torch.randn(4, 3).as_subclass(_NoStorage)
    ref = _storage_ref(t)
    assert ref() is t and _same_storage(ref, t)
