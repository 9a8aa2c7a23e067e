"""Tests of the Procrustes and optimal-transport aligners."""

import doctest
import io
import math
import os
import pickle
import warnings

import joblib
import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from skmerge import ModelMerger
from skmerge.aligners import (
    CCAAligner,
    OptimalTransportAligner,
    PermutationAligner,
    ProcrustesAligner,
)
from skmerge.graph import permute_model
from skmerge.models import get_model
from skmerge.stats import CrossCovariance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_ALIGNERS = [ProcrustesAligner, OptimalTransportAligner]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run on one intra-op thread: these small matrices gain nothing from
    more, and OpenMP spin-waiting makes them very slow when other processes
    load the cores. Restored afterwards, so other test modules are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _to_np(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _data(n=300, p=6, q=6, seed=0, noise=0.3):
    """Correlated X and y (y = X A + noise), anisotropic, with offsets."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) + rng.normal(size=p)
    y = X @ rng.normal(size=(p, q))
    y = y + noise * y.std(0) * rng.normal(size=y.shape) + 1.0
    return X, y


def _permuted_copy(n=400, d=7, seed=0):
    """y with distinct, well-separated features; X = y with its columns shuffled."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, d)) @ np.diag(rng.uniform(0.5, 3.0, size=d)) + 2.0
    perm = rng.permutation(d)
    return y[:, perm], y, perm


def _numpy_correlation_cost(X, y):
    p = X.shape[1]
    correlation = np.corrcoef(X.T, y.T)[:p, p:]
    return 1.0 - correlation


def _numpy_sinkhorn(cost, epsilon, n_iter=5000):
    """Textbook probability-domain Sinkhorn (u, v scalings of exp(-C / eps))."""
    p, q = cost.shape
    a, b = np.full(p, 1.0 / p), np.full(q, 1.0 / q)
    kernel = np.exp(-cost / epsilon)
    u, v = np.ones(p), np.ones(q)
    for _ in range(n_iter):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    return u[:, None] * kernel * v[None, :]


# --------------------------------------------------------------------------
# scikit-learn compatibility
# --------------------------------------------------------------------------
@parametrize_with_checks([
    ProcrustesAligner(), OptimalTransportAligner(), OptimalTransportAligner(reg="exact"),
])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize("est", [ProcrustesAligner(scale=False),
                                 OptimalTransportAligner(reg=0.1, max_iter=50, tol=1e-3)])
def test_clone_and_params(est):
    X, y = _data()
    est.fit(X, y)
    cloned = clone(est)
    assert cloned.get_params() == est.get_params()
    assert not hasattr(cloned, "mapping_")
    with pytest.raises(NotFittedError):
        cloned.transform(X)
    # reachable as aligner__* through the merger, for GridSearchCV
    params = ModelMerger([torch.nn.Linear(2, 2)] * 2, aligner=est).get_params(deep=True)
    assert {k for k in params if k.startswith("aligner__")} == {f"aligner__{k}" for k in est.get_params()}


@pytest.mark.parametrize("bad, match", [
    (dict(reg=-0.1), "reg must be a finite float >= 0"),
    (dict(reg=float("nan")), "reg must be a finite float >= 0"),
    (dict(reg=float("inf")), "reg must be a finite float >= 0"),
    (dict(reg="approx"), 'or "exact"'),
    (dict(reg=None), "reg must be"),
    (dict(reg=True), "reg must be"),
    (dict(max_iter=0), "max_iter must be an integer >= 1"),
    (dict(max_iter=2.5), "max_iter must be an integer >= 1"),
    (dict(max_iter=True), "max_iter must be an integer >= 1"),
    (dict(tol=-1e-3), "tol must be a finite float >= 0"),
    (dict(tol=float("nan")), "tol must be a finite float >= 0"),
])
def test_optimal_transport_bad_parameters(bad, match):
    est = OptimalTransportAligner(**bad)  # stored unchanged, checked in fit
    assert est.get_params()[next(iter(bad))] is next(iter(bad.values()))
    X, y = _data(n=40)
    with pytest.raises(ValueError, match=match):
        est.fit(X, y)
    with pytest.raises(ValueError, match=match):
        clone(est).partial_fit(X, y)
    with pytest.raises(ValueError, match=match):
        clone(est).fit_from_stats(CrossCovariance().update(X, y))


@pytest.mark.parametrize("bad", ["yes", 1, None, 0.5])
def test_procrustes_bad_scale(bad):
    X, y = _data(n=40)
    with pytest.raises(ValueError, match="scale must be True or False"):
        ProcrustesAligner(scale=bad).fit(X, y)


# --------------------------------------------------------------------------
# Procrustes: exactness and independent formulas
# --------------------------------------------------------------------------
@pytest.mark.parametrize("gain", [1.0, 3.0])
def test_procrustes_recovers_orthogonal_map(gain):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 5)) @ np.diag([5.0, 3.0, 2.0, 1.0, 0.5]) + 4.0
    Q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    y = gain * X @ Q
    aligner = ProcrustesAligner().fit(X, y)
    np.testing.assert_allclose(aligner.mapping_, gain * Q, atol=1e-10)
    np.testing.assert_allclose(aligner.inverse_mapping_, Q.T / gain, atol=1e-10)
    np.testing.assert_allclose(aligner.transform(X), y, atol=1e-9)
    np.testing.assert_allclose(aligner.inverse_transform(y), X, atol=1e-9)
    assert aligner.scale_ == pytest.approx(gain)
    rotation = ProcrustesAligner(scale=False).fit(X, y)
    np.testing.assert_allclose(rotation.mapping_, Q, atol=1e-10)
    assert rotation.scale_ == 1.0
    assert aligner.score(X, y) == pytest.approx(1.0)


@pytest.mark.parametrize("p, q", [(6, 6), (40, 40), (7, 4), (4, 7)])
def test_procrustes_equals_full_regularization_cca(p, q):
    X, y = _data(n=500, p=p, q=q, seed=p + q, noise=1.0)
    procrustes = ProcrustesAligner().fit(X, y)
    cca = CCAAligner(regularization=1).fit(X, y)
    np.testing.assert_allclose(procrustes.mapping_, cca.mapping_, atol=1e-10)
    np.testing.assert_allclose(procrustes.inverse_mapping_, cca.inverse_mapping_, atol=1e-10)


@pytest.mark.parametrize("p, q", [(6, 6), (7, 4), (4, 7)])
@pytest.mark.parametrize("scale", [True, False])
def test_procrustes_agrees_with_numpy_svd(p, q, scale):
    X, y = _data(n=200, p=p, q=q, seed=3, noise=0.8)
    full = np.cov(X.T, y.T)
    sxx, syy, sxy = full[:p, :p], full[p:, p:], full[:p, p:]
    u, _, vt = np.linalg.svd(sxy, full_matrices=False)
    c = np.sqrt((np.trace(syy) / q) / (np.trace(sxx) / p)) if scale else 1.0
    aligner = ProcrustesAligner(scale=scale).fit(X, y)
    np.testing.assert_allclose(aligner.mapping_, c * u @ vt, atol=1e-10)
    np.testing.assert_allclose(aligner.inverse_mapping_, np.linalg.pinv(c * u @ vt), atol=1e-10)
    gram = aligner.mapping_.T @ aligner.mapping_ if p >= q else aligner.mapping_ @ aligner.mapping_.T
    np.testing.assert_allclose(gram, c**2 * np.eye(min(p, q)), atol=1e-10)  # semi-orthogonal
    if p == q:
        rotation, _ = scipy.linalg.orthogonal_procrustes(X - X.mean(0), y - y.mean(0))
        np.testing.assert_allclose(aligner.mapping_, c * rotation, atol=1e-10)


def test_procrustes_of_permuted_copy_is_the_permutation():
    """Full-rank covariances: the polar factor of S_xy = P^T S_yy is P^T."""
    X, y, perm = _permuted_copy()
    aligner = ProcrustesAligner().fit(X, y)
    expected = np.zeros((7, 7))
    expected[np.arange(7), perm] = 1.0  # X[:, i] == y[:, perm[i]]
    np.testing.assert_allclose(aligner.mapping_, expected, atol=1e-10)
    np.testing.assert_allclose(aligner.transform(X), y, atol=1e-9)
    assert aligner.scale_ == pytest.approx(1.0)


def test_procrustes_dead_units_are_mapped_to_zero():
    X, y = _data(p=6, q=6, noise=0.1)
    X[:, 2] = 0.0  # dead unit
    X[:, 4] = 3.5  # constant unit
    aligner = ProcrustesAligner().fit(X, y)
    np.testing.assert_allclose(aligner.mapping_[[2, 4]], 0.0, atol=1e-12)
    np.testing.assert_allclose(aligner.inverse_mapping_[:, [2, 4]], 0.0, atol=1e-12)
    assert np.all(np.isfinite(aligner.mapping_)) and np.all(np.isfinite(aligner.inverse_mapping_))
    assert aligner.singular_values_.shape == (6,)
    constant = ProcrustesAligner().fit(np.ones((10, 3)), np.full((10, 2), 4.0))
    assert np.all(constant.mapping_ == 0) and constant.scale_ == 0.0
    assert constant.score(np.ones((10, 3)), np.full((10, 2), 4.0)) == 0.0


# --------------------------------------------------------------------------
# Optimal transport: exactness and independent formulas
# --------------------------------------------------------------------------
def test_optimal_transport_tiny_reg_recovers_permuted_copy():
    X, y, perm = _permuted_copy()
    aligner = OptimalTransportAligner(reg=1e-3).fit(X, y)
    expected = np.zeros((7, 7))
    expected[np.arange(7), perm] = 1.0
    np.testing.assert_allclose(aligner.mapping_, expected, atol=1e-8)
    np.testing.assert_allclose(aligner.inverse_mapping_, expected.T, atol=1e-8)
    np.testing.assert_allclose(aligner.transform(X), y, atol=1e-7)
    np.testing.assert_allclose(aligner.inverse_transform(y), X, atol=1e-7)
    assert aligner.permutation_ is None  # soft plan, even if (nearly) hard
    np.testing.assert_allclose(aligner.transport_plan_.sum(), 1.0, atol=1e-12)


@pytest.mark.parametrize("reg", [0, "exact"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimal_transport_exact_equals_permutation_aligner(reg, seed):
    X, y = _data(n=200, p=12, q=12, seed=seed, noise=2.0)  # noisy: a non-trivial assignment
    ot = OptimalTransportAligner(reg=reg).fit(X, y)
    permutation = PermutationAligner().fit(X, y)
    np.testing.assert_array_equal(ot.permutation_, permutation.permutation_)
    np.testing.assert_array_equal(ot.mapping_, permutation.mapping_)
    np.testing.assert_array_equal(ot.inverse_mapping_, permutation.inverse_mapping_)
    np.testing.assert_array_equal(ot.transport_plan_, permutation.mapping_ / 12)
    assert ot.permutation_.dtype == np.int64 and ot.n_iter_ == 1 and ot.epsilon_ == 0.0


@pytest.mark.parametrize("p, q", [(5, 5), (4, 7), (6, 3)])
@pytest.mark.parametrize("reg", [0.1, 0.3])
def test_sinkhorn_agrees_with_probability_domain_numpy(p, q, reg):
    X, y = _data(n=300, p=p, q=q, seed=p * q, noise=1.0)
    cost = _numpy_correlation_cost(X, y)
    epsilon = reg * cost.max()
    expected = _numpy_sinkhorn(cost, epsilon)
    aligner = OptimalTransportAligner(reg=reg, max_iter=5000, tol=1e-13).fit(X, y)
    assert aligner.epsilon_ == pytest.approx(epsilon, rel=1e-12)
    np.testing.assert_allclose(aligner.transport_plan_, expected, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(aligner.mapping_, expected / expected.sum(0), rtol=1e-8)
    np.testing.assert_allclose(aligner.inverse_mapping_, (expected / expected.sum(1)[:, None]).T,
                               rtol=1e-8)
    # marginals, and the convex-combination normalizations
    np.testing.assert_allclose(aligner.transport_plan_.sum(1), 1 / p, rtol=1e-10)
    np.testing.assert_allclose(aligner.transport_plan_.sum(0), 1 / q, rtol=1e-10)
    np.testing.assert_allclose(aligner.mapping_.sum(0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(aligner.inverse_mapping_.sum(0), 1.0, rtol=1e-12)
    assert 1 < aligner.n_iter_ < 5000


@pytest.mark.parametrize("p, q", [(4, 6), (6, 4), (3, 5)])
def test_exact_transport_with_unequal_widths(p, q):
    """The LP plan's cost equals the optimal assignment between replicated features."""
    X, y = _data(n=200, p=p, q=q, seed=7, noise=1.5)
    aligner = OptimalTransportAligner(reg="exact").fit(X, y)
    plan = aligner.transport_plan_
    assert aligner.permutation_ is None
    np.testing.assert_allclose(plan.sum(1), 1 / p, atol=1e-12)
    np.testing.assert_allclose(plan.sum(0), 1 / q, atol=1e-12)
    assert plan.min() >= 0
    cost = _numpy_correlation_cost(X, y)
    # uniform marginals with L = lcm(p, q): copy each X feature L/p times and
    # each y feature L/q times; an optimal assignment of the copies is an optimal plan
    L = math.lcm(p, q)
    replicated = np.repeat(np.repeat(cost, L // p, axis=0), L // q, axis=1)
    rows, cols = linear_sum_assignment(replicated)
    assert (plan * cost).sum() == pytest.approx(replicated[rows, cols].sum() / L, abs=1e-12)
    # soft plans at small reg approach the exact cost from above
    soft = OptimalTransportAligner(reg=0.01, max_iter=20_000).fit(X, y)
    assert (plan * cost).sum() <= (soft.transport_plan_ * cost).sum() + 1e-12
    assert (soft.transport_plan_ * cost).sum() == pytest.approx((plan * cost).sum(), abs=0.01)


def test_optimal_transport_duplicated_features_barycentric_maps():
    """X holds two copies of each reference feature (p = 2q): the mapping
    averages the copies and the inverse hands each copy its feature back."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=(300, 4)) * [1.0, 2.0, 3.0, 4.0]
    X = np.hstack([y, y])[:, [0, 4, 1, 5, 2, 6, 3, 7]]
    aligner = OptimalTransportAligner(reg="exact").fit(X, y)
    expected = np.kron(np.eye(4), [[0.5], [0.5]])
    np.testing.assert_allclose(aligner.mapping_, expected, atol=1e-12)
    np.testing.assert_allclose(aligner.inverse_mapping_, 2 * expected.T, atol=1e-12)
    np.testing.assert_allclose(aligner.transform(X), y, atol=1e-12)
    np.testing.assert_allclose(aligner.inverse_transform(y), X, atol=1e-12)
    soft = OptimalTransportAligner(reg=0.01).fit(X, y)
    np.testing.assert_allclose(soft.mapping_, expected, atol=1e-8)
    np.testing.assert_allclose(soft.inverse_transform(soft.transform(X)), X, atol=1e-6)


def test_optimal_transport_zero_variance_features():
    X, y = _data(p=5, q=5)
    X[:, 1] = 0.0
    y[:, 3] = 7.0
    for reg in (0.05, "exact"):
        aligner = OptimalTransportAligner(reg=reg).fit(X, y)
        for name in ("mapping_", "inverse_mapping_", "transport_plan_"):
            assert np.all(np.isfinite(getattr(aligner, name))), name
        np.testing.assert_allclose(aligner.transport_plan_.sum(), 1.0, atol=1e-12)
    constant = OptimalTransportAligner().fit(np.ones((10, 3)), np.full((10, 2), 4.0))
    np.testing.assert_allclose(constant.transport_plan_, 1 / 6)  # all costs equal: uniform
    assert constant.score(np.ones((10, 3)), np.full((10, 2), 4.0)) == 0.0


def test_optimal_transport_convergence_warning():
    X, y = _data(n=200, p=8, q=8, noise=1.0)
    with pytest.warns(ConvergenceWarning, match="did not converge in max_iter=2"):
        aligner = OptimalTransportAligner(reg=0.01, max_iter=2).fit(X, y)
    assert aligner.n_iter_ == 2
    np.testing.assert_allclose(aligner.mapping_.sum(0), 1.0)  # still a usable soft map
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converged = OptimalTransportAligner(reg=0.2).fit(X, y)
        OptimalTransportAligner(reg="exact").fit(X, y)
    assert converged.n_iter_ < converged.max_iter


# --------------------------------------------------------------------------
# streaming, statistics, persistence, types
# --------------------------------------------------------------------------
@pytest.mark.parametrize("est", [ProcrustesAligner(), OptimalTransportAligner(),
                                 OptimalTransportAligner(reg=0)])
def test_partial_fit_and_fit_from_stats_equal_fit(est):
    X, y = _data(n=300, p=6, q=6)
    full = clone(est).fit(X, y)
    streamed = clone(est)
    with warnings.catch_warnings():
        # Sinkhorn on the first, small batches may stop at max_iter
        warnings.simplefilter("ignore", ConvergenceWarning)
        for start in range(0, len(X), 70):
            streamed.partial_fit(X[start:start + 70], y[start:start + 70])
    np.testing.assert_allclose(streamed.mapping_, full.mapping_, atol=1e-10)
    stats = CrossCovariance()
    for start in range(0, len(X), 100):
        stats.update(X[start:start + 100], y[start:start + 100])
    from_stats = clone(est).fit_from_stats(stats)
    assert isinstance(from_stats.mapping_, torch.Tensor)
    np.testing.assert_allclose(_to_np(from_stats.mapping_), full.mapping_, atol=1e-10)
    np.testing.assert_allclose(_to_np(from_stats.inverse_mapping_), full.inverse_mapping_, atol=1e-10)
    np.testing.assert_allclose(from_stats.transform(X), full.transform(X), atol=1e-9)


@pytest.mark.parametrize("est", [ProcrustesAligner(), OptimalTransportAligner(),
                                 OptimalTransportAligner(reg=0)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_joblib_round_trip(est, as_tensor):
    X, y = _data(p=6, q=6)
    data = (torch.from_numpy(X), torch.from_numpy(y)) if as_tensor else (X, y)
    aligner = clone(est).fit(*data)
    buffer = io.BytesIO()
    joblib.dump(aligner, buffer)
    buffer.seek(0)
    loaded = joblib.load(buffer)
    assert type(loaded.mapping_) is type(aligner.mapping_)
    expected, got = aligner.transform(data[0]), loaded.transform(data[0])
    assert type(got) is type(expected)
    np.testing.assert_array_equal(_to_np(got), _to_np(expected))
    np.testing.assert_array_equal(_to_np(loaded.inverse_transform(expected)),
                                  _to_np(aligner.inverse_transform(expected)))
    for name in ("transport_plan_", "permutation_", "scale_", "n_iter_"):
        if getattr(aligner, name, None) is not None:
            np.testing.assert_array_equal(_to_np(getattr(loaded, name)), _to_np(getattr(aligner, name)))
    loaded.partial_fit(*data)


@pytest.mark.parametrize("est", [ProcrustesAligner(), OptimalTransportAligner(),
                                 OptimalTransportAligner(reg=0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_in_torch_out(est, dtype):
    X, y = _data(p=5, q=5)
    Xt, yt = torch.from_numpy(X).to(dtype), torch.from_numpy(y).to(dtype)
    aligner = clone(est).fit(Xt, yt)
    for name in ("mapping_", "inverse_mapping_", "transport_plan_", "singular_values_"):
        value = getattr(aligner, name, None)
        if value is not None:
            assert isinstance(value, torch.Tensor) and value.dtype == torch.float64, name
    if getattr(aligner, "permutation_", None) is not None:
        assert isinstance(aligner.permutation_, torch.Tensor)
        assert aligner.permutation_.dtype == torch.int64
    out = aligner.transform(Xt)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and out.shape == (len(X), 5)
    assert isinstance(aligner.inverse_transform(out), torch.Tensor)
    out_np = aligner.transform(X)
    assert isinstance(out_np, np.ndarray)
    np.testing.assert_allclose(out_np, _to_np(out).astype(np.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("est", [ProcrustesAligner(), OptimalTransportAligner(),
                                 OptimalTransportAligner(reg=0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_in_numpy_out(est, dtype):
    X, y = _data(p=4, q=6)
    aligner = clone(est).fit(X.astype(dtype), y.astype(dtype))
    for name in ("mapping_", "inverse_mapping_", "transport_plan_", "singular_values_"):
        value = getattr(aligner, name, None)
        if value is not None:
            assert isinstance(value, np.ndarray) and value.dtype == np.float64, name
    assert aligner.mapping_.shape == (4, 6) and aligner.inverse_mapping_.shape == (6, 4)
    out = aligner.transform(X.astype(dtype))
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    out_t = aligner.transform(torch.from_numpy(X.astype(dtype)))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(_to_np(out_t), out, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cls", NEW_ALIGNERS)
def test_bad_inputs(cls):
    X, y = _data(n=20, p=4, q=3)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        cls().fit(X, y[:-1])
    X_nan = X.copy()
    X_nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        cls().fit(X_nan, y)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        cls().fit(torch.from_numpy(X_nan), torch.from_numpy(y))
    with pytest.raises(ValueError, match=r"Found array with 1 sample\(s\)"):
        cls().fit(X[:1], y[:1])
    with pytest.raises(ValueError, match="requires y to be passed"):
        cls().fit(X, None)
    aligner = cls().fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but .* is expecting 4 features"):
        aligner.transform(X[:, :3])
    with pytest.raises(ValueError, match="y has 2 features, but .* maps to 3 reference features"):
        aligner.score(X, y[:, :2])
    with pytest.raises(ValueError, match="needs at least 2 samples"):
        cls().fit_from_stats(CrossCovariance().update(X[:1], y[:1]))
    with pytest.raises(TypeError, match="must be a skmerge.stats.CrossCovariance"):
        cls().fit_from_stats((X, y))


# --------------------------------------------------------------------------
# inside a ModelMerger
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_and_permuted_copy():
    torch.manual_seed(0)
    model = get_model("mlp", in_features=8, num_classes=3, hidden=(16, 16)).double().eval()
    inputs = torch.randn(600, 8, dtype=torch.float64)
    permuted, perms = permute_model(model, inputs[:2], seed=1)
    with torch.no_grad():
        assert torch.allclose(permuted(inputs), model(inputs))
    return model, permuted, inputs


@pytest.mark.parametrize("aligner, atol", [
    (ProcrustesAligner(), 1e-9),
    (ProcrustesAligner(scale=False), 1e-9),
    (OptimalTransportAligner(reg=1e-3), 1e-6),
    (OptimalTransportAligner(reg="exact"), 1e-12),
])
def test_merging_a_permuted_copy_reproduces_the_model(mlp_and_permuted_copy, aligner, atol):
    """Averaging a model with its permuted copy gives the model back when the
    aligner finds the permutation (ReLU commutes only with permutations)."""
    model, permuted, inputs = mlp_and_permuted_copy
    merger = ModelMerger([model, permuted], aligner=aligner, device="cpu").fit(inputs)
    with torch.no_grad():
        expected, got = model(inputs), merger.merged_model_(inputs)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    for row in merger.aligners_:
        mapping = _to_np(row[1].mapping_)  # a permutation matrix: one 1 per column
        np.testing.assert_allclose(np.sort(mapping, axis=0)[-1], 1.0, atol=max(atol, 1e-8))
        np.testing.assert_allclose(np.abs(mapping).sum(0), 1.0, atol=max(atol, 1e-8))
    if isinstance(aligner, OptimalTransportAligner) and aligner.reg == "exact":
        assert all(row[1].permutation_ is not None for row in merger.aligners_)


def _soft_plan_warnings(models, inputs, **params) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ModelMerger(models, device="cpu", verbose=False, **params).fit(inputs)
    return [w for w in caught if "soft plans" in str(w.message)]


def _two_mlps(batch_norm: bool):
    def make(seed):
        torch.manual_seed(seed)
        norm = [torch.nn.BatchNorm1d(16)] if batch_norm else []
        return torch.nn.Sequential(torch.nn.Linear(8, 16), *norm, torch.nn.ReLU(),
                                   torch.nn.Linear(16, 3)).double().eval()
    return [make(0), make(1)], torch.randn(300, 8, dtype=torch.float64)


def test_soft_plans_without_batchnorm_warn_to_repair():
    """A soft plan averages features that are not perfectly correlated, which shrinks them; with
    nothing to renormalize the merge (no BatchNorm, no REPAIR) the merger says so."""
    models, inputs = _two_mlps(batch_norm=False)
    caught = _soft_plan_warnings(models, inputs, aligner=OptimalTransportAligner())
    assert len(caught) == 1 and "repair=True" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's fit
    assert not _soft_plan_warnings(models, inputs, aligner=OptimalTransportAligner(), repair=True)
    assert not _soft_plan_warnings(models, inputs, aligner=OptimalTransportAligner(reg="exact"))
    assert not _soft_plan_warnings(models, inputs, aligner=CCAAligner())


def test_soft_plans_with_batchnorm_or_sharp_plans_do_not_warn(mlp_and_permuted_copy):
    models, inputs = _two_mlps(batch_norm=True)
    assert not _soft_plan_warnings(models, inputs, aligner=OptimalTransportAligner())
    # on a permuted copy a small reg finds the permutation: nothing is averaged
    model, permuted, inputs = mlp_and_permuted_copy
    assert not _soft_plan_warnings([model, permuted], inputs, aligner=OptimalTransportAligner(reg=1e-3))


# --------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("est", [ProcrustesAligner(), OptimalTransportAligner(),
                                 OptimalTransportAligner(reg=0)])
def test_cuda_tensors_stay_on_device(est):
    X, y = _data(p=6, q=6)
    Xt, yt = torch.from_numpy(X).float().cuda(), torch.from_numpy(y).float().cuda()
    aligner = clone(est).fit(Xt, yt)
    assert aligner.mapping_.device.type == "cuda"
    assert aligner.transform(Xt).device.type == "cuda"
    cpu = clone(est).fit(X.astype(np.float32), y.astype(np.float32))
    np.testing.assert_allclose(_to_np(aligner.mapping_), cpu.mapping_, rtol=1e-6, atol=1e-6)
    loaded = pickle.loads(pickle.dumps(aligner))
    assert loaded.mapping_.device.type == "cuda"


# --------------------------------------------------------------------------
# documentation
# --------------------------------------------------------------------------
def test_user_guide_examples_run():
    """Every example in docs/user_guide/more_aligners.rst runs and prints what it shows."""
    path = os.path.join(ROOT, "docs", "user_guide", "more_aligners.rst")
    result = doctest.testfile(path, module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 10


def test_docstring_examples_run():
    import skmerge.aligners._optimal_transport
    import skmerge.aligners._procrustes

    for module in (skmerge.aligners._procrustes, skmerge.aligners._optimal_transport):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_benchmark_table_is_committed():
    """docs/user_guide/more_aligners.rst includes the table the benchmark writes."""
    path = os.path.join(ROOT, "docs", "_generated", "more_aligners.txt")
    with open(path) as handle:
        table = handle.read()
    for name in ("IdentityAligner", "PermutationAligner", "CCAAligner", "ProcrustesAligner",
                 "OptimalTransportAligner"):
        assert name in table
    with open(os.path.join(ROOT, "docs", "user_guide", "more_aligners.rst")) as handle:
        assert "literalinclude:: ../_generated/more_aligners.txt" in handle.read()
