"""Tests of skmerge.aligners: Identity, Permutation and CCA aligners."""

import doctest
import io
import os
import pickle
import subprocess
import sys
import warnings

import joblib
import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

from skmerge.aligners import CCAAligner, IdentityAligner, PermutationAligner, SmallSampleWarning
from skmerge.aligners._base import _restore_device
from skmerge.stats import CrossCovariance

ALIGNERS = [IdentityAligner, PermutationAligner, CCAAligner]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _linear_data(n=400, p=6, q=6, seed=0, noise=0.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) @ rng.normal(size=(p, p)) + rng.normal(size=p)
    A = rng.normal(size=(p, q))
    y = X @ A
    if noise:
        y = y + noise * y.std(0) * rng.normal(size=y.shape)
    return X, y, A


def _noisy_small_sample(seed, n=30, d=24, noise=0.7):
    """n close to d, anisotropic X, y = X A + noise: shrinkage should help."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mixing = basis * np.sqrt(1.0 / np.arange(1, d + 1))
    A = rng.normal(size=(d, d)) / np.sqrt(d)
    X = rng.normal(size=(n + 4000, d)) @ mixing.T
    y = X @ A
    y = y + noise * y.std(0) * rng.normal(size=y.shape)
    return X[:n], y[:n], X[n:], y[n:]


def _reference_cca(X, y, r):
    """Straightforward numpy/scipy implementation of DESIGN section 1."""
    p = X.shape[1]
    full = np.cov(X.T, y.T)
    sxx, syy, sxy = full[:p, :p], full[p:, p:], full[:p, p:]

    def shrink(s):
        return (1 - r) * s + r * np.trace(s) / len(s) * np.eye(len(s))

    sxx, syy = shrink(sxx), shrink(syy)
    root_xx, root_yy = np.real(scipy.linalg.sqrtm(sxx)), np.real(scipy.linalg.sqrtm(syy))
    inv_xx, inv_yy = np.linalg.inv(root_xx), np.linalg.inv(root_yy)
    u, s, vt = np.linalg.svd(inv_xx @ sxy @ inv_yy, full_matrices=False)
    return inv_xx @ u @ vt @ root_yy, inv_yy @ vt.T @ u.T @ root_xx, s


def _variate_correlations(X, y, r):
    """Pearson correlation, on the data, of each pair of canonical variates X P_x[:, k], y P_y[:, k]."""
    p = X.shape[1]
    full = np.cov(X.T, y.T)

    def inv_root(s):
        s = (1 - r) * s + r * np.trace(s) / len(s) * np.eye(len(s))
        return np.linalg.inv(np.real(scipy.linalg.sqrtm(s)))

    inv_xx, inv_yy = inv_root(full[:p, :p]), inv_root(full[p:, p:])
    u, s, vt = np.linalg.svd(inv_xx @ full[:p, p:] @ inv_yy, full_matrices=False)
    a, b = X @ (inv_xx @ u), y @ (inv_yy @ vt.T)
    return np.array([np.corrcoef(a[:, k], b[:, k])[0, 1] for k in range(len(s))]), s


def _to_np(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


# --------------------------------------------------------------------------
# scikit-learn compatibility
# --------------------------------------------------------------------------
@parametrize_with_checks([IdentityAligner(), PermutationAligner(), CCAAligner()])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_sklearn_array_api_check_with_scipy_array_api():
    """The one estimator check skipped by the estimator checks of every aligner
    (it needs SCIPY_ARRAY_API set before scipy is imported) passes in a fresh
    interpreter."""
    code = (
        "from sklearn.utils.estimator_checks import check_array_api_input\n"
        "from skmerge.aligners import *\n"
        "for est in (IdentityAligner(), PermutationAligner(), CCAAligner(), ProcrustesAligner(),\n"
        "            OptimalTransportAligner(), OptimalTransportAligner(reg=0)):\n"
        "    check_array_api_input(type(est).__name__, est, array_namespace='numpy',\n"
        "                          expect_only_array_outputs=False)\n"
    )
    env = dict(os.environ, SCIPY_ARRAY_API="1", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("cls", ALIGNERS)
def test_clone_and_params(cls):
    est = cls() if cls is not CCAAligner else CCAAligner(regularization=0.25)
    X, y, _ = _linear_data()
    est.fit(X, y)
    cloned = clone(est)
    assert cloned.get_params() == est.get_params()
    assert not hasattr(cloned, "mapping_")
    with pytest.raises(NotFittedError):
        cloned.transform(X)


def test_parameters_stored_unchanged_and_checked_in_fit():
    est = CCAAligner(regularization=1.5)  # no error at construction
    assert est.regularization == 1.5
    X, y, _ = _linear_data(n=50)
    for bad in (1.5, -0.1, float("nan"), "big", None, True):
        with pytest.raises(ValueError, match="regularization must be a float in"):
            CCAAligner(regularization=bad).fit(X, y)
    with pytest.raises(ValueError, match="regularization must be"):
        CCAAligner(regularization=2).partial_fit(X, y)
    with pytest.raises(ValueError, match="regularization must be"):
        CCAAligner(regularization=-1).fit_from_stats(CrossCovariance().update(X, y))


# --------------------------------------------------------------------------
# exactness and agreement with an independent implementation
# --------------------------------------------------------------------------
def test_cca_recovers_invertible_linear_map():
    X, y, A = _linear_data()
    aligner = CCAAligner(regularization=0).fit(X, y)
    np.testing.assert_allclose(aligner.mapping_, A, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(aligner.transform(X), y, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(aligner.inverse_mapping_, np.linalg.inv(A), rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(aligner.inverse_transform(aligner.transform(X)), X, atol=1e-8)
    np.testing.assert_allclose(aligner.canonical_correlations_, 1.0, atol=1e-10)
    assert aligner.score(X, y) == pytest.approx(1.0)


def test_permutation_and_cca_recover_scaled_permutation():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 7)) + 2.0
    perm = rng.permutation(7)
    scales = rng.uniform(0.5, 3.0, size=7)
    y = X[:, perm] * scales
    permutation = PermutationAligner().fit(X, y)
    np.testing.assert_array_equal(permutation.permutation_, perm)
    np.testing.assert_array_equal(permutation.transform(X), X[:, perm])
    np.testing.assert_array_equal(permutation.inverse_mapping_, permutation.mapping_.T)
    np.testing.assert_array_equal(permutation.inverse_transform(permutation.transform(X)), X)
    assert permutation.permutation_.dtype == np.int64
    cca = CCAAligner(regularization=0).fit(X, y)
    np.testing.assert_allclose(cca.transform(X), y, atol=1e-8)
    np.testing.assert_allclose(cca.inverse_transform(cca.transform(X)), X, atol=1e-8)


@pytest.mark.parametrize("d, n", [(5, 60), (200, 1000)])
@pytest.mark.parametrize("r", [0.0, 0.1, 1.0])
def test_cca_agrees_with_reference_implementation(d, n, r):
    X, y, _ = _linear_data(n=n, p=d, q=d, seed=d, noise=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        aligner = CCAAligner(regularization=r).fit(X, y)
    mapping, inverse, correlations = _reference_cca(X, y, r)
    scale = np.abs(mapping).max()
    np.testing.assert_allclose(aligner.mapping_, mapping, atol=1e-7 * scale)
    np.testing.assert_allclose(aligner.inverse_mapping_, inverse, atol=1e-7 * np.abs(inverse).max())
    np.testing.assert_allclose(aligner.canonical_correlations_, _variate_correlations(X, y, r)[0], atol=1e-8)
    if r == 0:
        np.testing.assert_allclose(aligner.canonical_correlations_, correlations, atol=1e-8)
        assert np.all(np.diff(aligner.canonical_correlations_) <= 1e-12)  # descending


@pytest.mark.parametrize("r", [0.0, 0.3])
def test_canonical_correlations_are_those_of_the_variates_on_the_data(r):
    # Few noisy samples per feature: the shrunk problem's singular values pass 1.
    rng = np.random.default_rng(7)
    X = rng.normal(size=(60, 12)) @ rng.normal(size=(12, 12))
    y = X[:, ::-1] @ rng.normal(size=(12, 12)) + 3.0 * rng.normal(size=(60, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        aligner = CCAAligner(regularization=r).fit(X, y)
    expected, singular_values = _variate_correlations(X, y, r)
    np.testing.assert_allclose(aligner.canonical_correlations_, expected, rtol=1e-10, atol=1e-12)
    if r == 0:
        np.testing.assert_allclose(aligner.canonical_correlations_, singular_values, rtol=1e-10)
    else:
        assert singular_values[0] > 1  # what the attribute reported, clamped to 1.0, before
        assert np.all(aligner.canonical_correlations_ < 1)
    torch_fit = CCAAligner(regularization=r).fit(torch.from_numpy(X), torch.from_numpy(y))
    np.testing.assert_allclose(_to_np(torch_fit.canonical_correlations_), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d, n", [(5, 60), (200, 1000)])
def test_cca_full_regularization_is_scaled_procrustes(d, n):
    X, y, _ = _linear_data(n=n, p=d, q=d, seed=1, noise=1.0)
    aligner = CCAAligner(regularization=1.0).fit(X, y)
    rotation, _ = scipy.linalg.orthogonal_procrustes(X - X.mean(0), y - y.mean(0))
    scale = np.sqrt(np.trace(np.cov(y.T)) / np.trace(np.cov(X.T)))
    np.testing.assert_allclose(aligner.mapping_, scale * rotation, atol=1e-9 * scale)
    np.testing.assert_allclose(aligner.mapping_.T @ aligner.mapping_, scale**2 * np.eye(d), atol=1e-8)


@pytest.mark.parametrize("p, q", [(7, 4), (4, 7)])
def test_cca_full_regularization_rectangular_is_semi_orthogonal(p, q):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, p)) * 2.0
    y = rng.normal(size=(200, q)) + X[:, :1]
    aligner = CCAAligner(regularization=1.0).fit(X, y)
    sxy = np.cov(X.T, y.T)[:p, p:]
    u, _, vt = np.linalg.svd(sxy, full_matrices=False)
    sxx, syy = np.cov(X.T), np.cov(y.T)
    # ratio of *mean* variances (== sqrt(tr Syy / tr Sxx) when p == q)
    scale = np.sqrt((np.trace(syy) / q) / (np.trace(sxx) / p))
    np.testing.assert_allclose(aligner.mapping_, scale * u @ vt, atol=1e-10)
    gram = aligner.mapping_.T @ aligner.mapping_ if p > q else aligner.mapping_ @ aligner.mapping_.T
    np.testing.assert_allclose(gram, scale**2 * np.eye(min(p, q)), atol=1e-10)
    mapping, inverse, _ = _reference_cca(X, y, 1.0)
    np.testing.assert_allclose(aligner.inverse_mapping_, inverse, atol=1e-10)


def test_identity_mapping():
    X, y, _ = _linear_data(p=5, q=3)
    aligner = IdentityAligner().fit(X, y)
    np.testing.assert_array_equal(aligner.mapping_, np.eye(5, 3))
    np.testing.assert_array_equal(aligner.inverse_mapping_, np.eye(3, 5))
    np.testing.assert_array_equal(aligner.transform(X), X[:, :3])


# --------------------------------------------------------------------------
# regularization and model selection
# --------------------------------------------------------------------------
def test_grid_search_prefers_shrinkage_on_noisy_small_samples():
    X, y, X_test, y_test = _noisy_small_sample(seed=0)
    grid = [0.0, 0.03, 0.1, 0.3, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        search = GridSearchCV(CCAAligner(), {"regularization": grid}, cv=3).fit(X, y)
        unregularized = CCAAligner(regularization=0.0).fit(X, y).score(X_test, y_test)
    assert search.best_params_["regularization"] > 0
    assert search.score(X_test, y_test) > unregularized + 0.05


def test_auto_regularization_beats_none_on_small_samples():
    X, y, X_test, y_test = _noisy_small_sample(seed=1)
    auto = CCAAligner(regularization="auto").fit(X, y)
    with pytest.warns(SmallSampleWarning, match="regularization=0"):
        plain = CCAAligner(regularization=0).fit(X, y)
    r_x, r_y = auto.regularization_
    assert 0 < r_x <= 1 and 0 < r_y <= 1
    assert auto.score(X_test, y_test) > plain.score(X_test, y_test) + 0.05
    # with plenty of data, auto shrinks little
    X, y, _ = _linear_data(n=5000, p=5, q=5, noise=0.5)
    assert max(CCAAligner(regularization="auto").fit(X, y).regularization_) < 0.05
    assert CCAAligner(regularization=0.2).fit(X, y).regularization_ == (0.2, 0.2)


def test_no_small_sample_warning_with_enough_data_or_regularization():
    X, y, _ = _linear_data(n=40, p=6, q=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CCAAligner(regularization=0).fit(X, y)
        CCAAligner(regularization=0.1).fit(X[:8], y[:8])


def test_score_counts_constant_features_as_zero():
    X, y, _ = _linear_data(p=4, q=4)
    aligner = IdentityAligner().fit(y, y)
    y_dead = y.copy()
    y_dead[:, 0] = 3.0  # constant reference feature
    assert aligner.score(y, y_dead) == pytest.approx(3 / 4)
    assert aligner.score(y, y) == pytest.approx(1.0)
    # a PermutationAligner with p < q leaves reference features unmatched: they count as 0
    perm = PermutationAligner().fit(y[:, :2], y)
    assert perm.score(y[:, :2], y) == pytest.approx(2 / 4)
    assert np.isfinite(aligner.score(np.zeros_like(y), y))


# --------------------------------------------------------------------------
# streaming, statistics, persistence
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALIGNERS)
def test_partial_fit_and_fit_from_stats_equal_fit(cls):
    X, y, _ = _linear_data(n=300, p=6, q=4, noise=0.3)
    full = cls().fit(X, y)
    streamed = cls()
    for start in range(0, len(X), 70):
        streamed.partial_fit(X[start:start + 70], y[start:start + 70])
    assert streamed.stats_.n_samples_ == len(X)
    np.testing.assert_allclose(streamed.mapping_, full.mapping_, atol=1e-10)
    np.testing.assert_allclose(streamed.inverse_mapping_, full.inverse_mapping_, atol=1e-10)

    stats = CrossCovariance()
    for start in range(0, len(X), 100):
        stats.update(X[start:start + 100], y[start:start + 100])
    from_stats = cls().fit_from_stats(stats)
    assert isinstance(from_stats.mapping_, torch.Tensor)  # attributes on the stats' device
    assert from_stats.n_features_in_ == 6
    np.testing.assert_allclose(_to_np(from_stats.mapping_), full.mapping_, atol=1e-10)
    np.testing.assert_allclose(from_stats.transform(X), full.transform(X), atol=1e-9)
    # the aligner keeps its own snapshot of the statistics
    stats.update(X, y)
    assert from_stats.stats_.n_samples_ == len(X)


def test_partial_fit_rejects_changing_shapes():
    X, y, _ = _linear_data(p=5, q=3)
    aligner = CCAAligner().partial_fit(X[:50], y[:50])
    with pytest.raises(ValueError, match="X has 4 features, but CCAAligner is expecting 5"):
        aligner.partial_fit(X[:50, :4], y[:50])
    with pytest.raises(ValueError, match="y has 2 features, but earlier batches of the reference had 3"):
        aligner.partial_fit(X[:50], y[:50, :2])


@pytest.mark.parametrize("cls", ALIGNERS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_joblib_round_trip(cls, as_tensor):
    X, y, _ = _linear_data(p=6, q=5, noise=0.2)
    data = (torch.from_numpy(X), torch.from_numpy(y)) if as_tensor else (X, y)
    aligner = cls().fit(*data)
    buffer = io.BytesIO()
    joblib.dump(aligner, buffer)
    buffer.seek(0)
    loaded = joblib.load(buffer)
    assert type(loaded.mapping_) is type(aligner.mapping_)
    expected, got = aligner.transform(data[0]), loaded.transform(data[0])
    assert type(got) is type(expected)
    np.testing.assert_array_equal(_to_np(got), _to_np(expected))
    np.testing.assert_array_equal(
        _to_np(loaded.inverse_transform(expected)), _to_np(aligner.inverse_transform(expected))
    )
    assert loaded.stats_.n_samples_ == aligner.stats_.n_samples_
    loaded.partial_fit(*data)  # keeps streaming after loading


def test_pickle_records_device_and_falls_back_to_cpu():
    """An aligner pickled on a GPU loads on a CPU-only machine (simulated)."""
    X, y, _ = _linear_data()
    aligner = CCAAligner().fit(torch.from_numpy(X), torch.from_numpy(y))
    state = aligner.__getstate__()
    assert state["_skmerge_device"] == "cpu"
    assert all(v.device.type == "cpu" for v in state.values() if isinstance(v, torch.Tensor))
    state["_skmerge_device"] = "cuda:7"  # as if pickled on a GPU machine
    loaded = CCAAligner.__new__(CCAAligner)
    loaded.__setstate__(state)
    expected = "cuda:7" if torch.cuda.device_count() > 7 else "cpu"
    assert str(loaded.mapping_.device) == expected
    assert _restore_device("cpu") == torch.device("cpu")
    assert _restore_device(None) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert _restore_device("cuda:0") == torch.device("cpu")


# --------------------------------------------------------------------------
# numpy / torch type handling
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALIGNERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_torch_in_torch_out(cls, dtype):
    X, y, _ = _linear_data(p=5, q=4)
    Xt = torch.from_numpy(X * 10).to(dtype)
    yt = torch.from_numpy(y * 10).to(dtype)
    aligner = cls().fit(Xt, yt)
    for name in ("mapping_", "inverse_mapping_"):
        value = getattr(aligner, name)
        assert isinstance(value, torch.Tensor) and value.dtype == torch.float64
    assert aligner.n_features_in_ == 5
    out = aligner.transform(Xt)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == (dtype if dtype.is_floating_point else torch.float64)
    assert out.device == Xt.device and out.shape == (len(X), 4)
    back = aligner.inverse_transform(out)
    assert isinstance(back, torch.Tensor) and back.shape == (len(X), 5)
    # numpy input on a torch-fitted aligner gives numpy output
    out_np = aligner.transform(Xt.numpy())
    assert isinstance(out_np, np.ndarray)
    np.testing.assert_allclose(out_np, _to_np(out).astype(np.float64), rtol=1e-4, atol=1e-3)
    assert isinstance(aligner.score(Xt, yt), float)


@pytest.mark.parametrize("cls", ALIGNERS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_numpy_in_numpy_out(cls, dtype):
    X, y, _ = _linear_data(p=4, q=6)
    Xn, yn = (X * 10).astype(dtype), (y * 10).astype(dtype)
    aligner = cls().fit(Xn, yn)
    assert isinstance(aligner.mapping_, np.ndarray) and aligner.mapping_.dtype == np.float64
    assert isinstance(aligner.stats_, CrossCovariance)
    out = aligner.transform(Xn)
    assert isinstance(out, np.ndarray)
    assert out.dtype == (np.float32 if dtype == np.float32 else np.float64)
    # torch input on a numpy-fitted aligner gives torch output
    out_t = aligner.transform(torch.from_numpy(Xn))
    assert isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(_to_np(out_t), out, rtol=1e-5, atol=1e-4)


def test_torch_path_validates_like_numpy():
    X, y, _ = _linear_data(p=4, q=3)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    aligner = CCAAligner().fit(Xt, yt[:, 0])  # 1-D y: one reference feature
    assert aligner.mapping_.shape == (4, 1)
    aligner.fit(Xt, y)  # numpy y with tensor X
    assert isinstance(aligner.mapping_, torch.Tensor)
    with pytest.raises(ValueError, match="X has 3 features, but CCAAligner is expecting 4"):
        aligner.transform(Xt[:, :3])
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        CCAAligner().fit(Xt, yt[:-1])
    with pytest.raises(ValueError, match="Input X contains NaN or infinity"):
        CCAAligner().fit(torch.where(Xt > 1, torch.nan, Xt), yt)
    with pytest.raises(ValueError, match="Input y contains NaN or infinity"):
        CCAAligner().fit(Xt, torch.where(yt > 1, torch.inf, yt))
    with pytest.raises(ValueError, match="Input X contains NaN or infinity"):
        aligner.transform(torch.full((2, 4), torch.inf))
    with pytest.raises(ValueError, match=r"Found array with 1 sample\(s\)"):
        CCAAligner().fit(Xt[:1], yt[:1])
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        CCAAligner().fit(Xt[:0], yt[:0])
    with pytest.raises(ValueError, match="Expected 2D array, got 1D"):
        CCAAligner().fit(Xt[:, 0], yt)
    with pytest.raises(ValueError, match="requires y"):
        CCAAligner().fit(Xt, None)
    with pytest.raises(ValueError, match="is on meta"):
        CCAAligner().fit(Xt, yt.to("meta"))


# --------------------------------------------------------------------------
# robustness: rank deficiency, rectangular mappings, bad input
# --------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALIGNERS)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_rank_deficient_inputs_give_finite_mappings(cls, as_tensor):
    X, y, _ = _linear_data(p=6, q=6, noise=0.1)
    X[:, 2] = 0.0  # dead ReLU unit
    X[:, 4] = 7.5  # constant unit
    y[:, 1] = 0.0  # dead reference unit
    data = (torch.from_numpy(X), torch.from_numpy(y)) if as_tensor else (X, y)
    aligner = cls().fit(*data)
    for name in ("mapping_", "inverse_mapping_"):
        value = _to_np(getattr(aligner, name))
        assert np.all(np.isfinite(value)), name
        assert np.abs(value).max() < 1e3, name  # no 1/sqrt(eps) blow-ups
    assert np.all(np.isfinite(_to_np(aligner.transform(data[0]))))
    score = aligner.score(*data)
    assert np.isfinite(score)
    if cls is CCAAligner:
        # dead and constant units are mapped to zero instead of amplified
        np.testing.assert_allclose(_to_np(aligner.mapping_)[[2, 4]], 0.0, atol=1e-9)
        assert np.all(np.isfinite(_to_np(aligner.canonical_correlations_)))
    # fewer samples than features (singular covariances) stay finite too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        small = cls().fit(X[:4], y[:4])
    assert np.all(np.isfinite(_to_np(small.mapping_)))
    assert np.all(np.isfinite(_to_np(small.inverse_mapping_)))


def test_all_constant_inputs():
    X = np.ones((10, 3))
    y = np.full((10, 2), 4.0)
    for cls in ALIGNERS:
        aligner = cls().fit(X, y)
        assert np.all(np.isfinite(aligner.mapping_))
        assert aligner.score(X, y) == 0.0
    assert np.all(CCAAligner().fit(X, y).mapping_ == 0)


@pytest.mark.parametrize("cls", ALIGNERS)
@pytest.mark.parametrize("p, q", [(7, 4), (4, 7)])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_rectangular_mappings(cls, p, q, as_tensor):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, p))
    y = np.hstack([X, rng.normal(size=(200, max(q - p, 0)))])[:, :q][:, ::-1].copy()
    data = (torch.from_numpy(X), torch.from_numpy(y)) if as_tensor else (X, y)
    # Exact relations are recovered without shrinkage.
    aligner = (CCAAligner(regularization=0) if cls is CCAAligner else cls()).fit(*data)
    assert tuple(aligner.mapping_.shape) == (p, q)
    assert tuple(aligner.inverse_mapping_.shape) == (q, p)
    assert tuple(aligner.transform(data[0]).shape) == (200, q)
    assert tuple(aligner.inverse_transform(data[1]).shape) == (200, p)
    if cls is CCAAligner:
        assert aligner.canonical_correlations_.shape == (min(p, q),)
        np.testing.assert_allclose(_to_np(aligner.canonical_correlations_)[: min(p, q)], 1.0, atol=1e-8)
        # y's shared features are reproduced exactly
        shared = [j for j in range(q) if q - 1 - j < p]
        np.testing.assert_allclose(_to_np(aligner.transform(data[0]))[:, shared], y[:, shared], atol=1e-8)
    if cls is PermutationAligner:
        perm = _to_np(aligner.permutation_)
        assert perm.shape == (q,)
        matched = perm >= 0
        assert matched.sum() == min(p, q)
        out = _to_np(aligner.transform(data[0]))
        np.testing.assert_array_equal(out[:, matched], X[:, perm[matched]])
        np.testing.assert_array_equal(out[:, ~matched], 0.0)  # unmatched: zero column
        np.testing.assert_array_equal(_to_np(aligner.inverse_mapping_), _to_np(aligner.mapping_).T)
        # the reversed copies of X in y are found
        for j in np.flatnonzero(matched):
            if q - 1 - j < p:
                assert perm[j] == q - 1 - j


@pytest.mark.parametrize("cls", ALIGNERS)
def test_bad_inputs(cls):
    X, y, _ = _linear_data(n=20, p=4, q=3)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        cls().fit(X, y[:-1])
    X_nan = X.copy()
    X_nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        cls().fit(X_nan, y)
    y_inf = y.copy()
    y_inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="Input y contains infinity"):
        cls().fit(X, y_inf)
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        cls().fit(X[:0], y[:0])
    with pytest.raises(ValueError, match=r"Found array with 1 sample\(s\)"):
        cls().fit(X[:1], y[:1])
    with pytest.raises(ValueError, match="requires y to be passed"):
        cls().fit(X, None)
    aligner = cls().fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but .* is expecting 4 features"):
        aligner.transform(X[:, :3])
    with pytest.raises(ValueError, match="X has 4 features, but .* is expecting 3 features"):
        aligner.inverse_transform(X)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        aligner.transform(X_nan)
    with pytest.raises(ValueError, match="y has 2 features, but .* maps to 3 reference features"):
        aligner.score(X, y[:, :2])
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        aligner.score(X, y[:-1])
    with pytest.raises(ValueError, match="needs at least 2 samples"):
        cls().fit_from_stats(CrossCovariance().update(X[:1], y[:1]))
    with pytest.raises(TypeError, match="must be a skmerge.stats.CrossCovariance"):
        cls().fit_from_stats((X, y))


# --------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------
@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("cls", ALIGNERS)
def test_cuda_tensors_stay_on_device(cls):
    X, y, _ = _linear_data(p=6, q=5, noise=0.2)
    device = torch.device("cuda")
    Xt, yt = torch.from_numpy(X).float().to(device), torch.from_numpy(y).float().to(device)
    aligner = cls().fit(Xt, yt)
    assert aligner.mapping_.device.type == "cuda"
    assert aligner.stats_.device.type == "cuda"
    out = aligner.transform(Xt)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert aligner.inverse_transform(out).device.type == "cuda"
    cpu = cls().fit(X.astype(np.float32), y.astype(np.float32))
    np.testing.assert_allclose(_to_np(aligner.mapping_), cpu.mapping_, rtol=1e-6, atol=1e-6)
    # numpy input on a CUDA-fitted aligner
    assert isinstance(aligner.transform(X), np.ndarray)
    # streaming on the device, then fit_from_stats
    stats = CrossCovariance()
    for start in range(0, len(X), 100):
        stats.update(Xt[start:start + 100], yt[start:start + 100])
    assert cls().fit_from_stats(stats).mapping_.device.type == "cuda"
    # pickled on the GPU: CPU tensors in the pickle, device restored on load
    state = aligner.__getstate__()
    assert state["_skmerge_device"].startswith("cuda")
    assert all(v.device.type == "cpu" for v in state.values() if isinstance(v, torch.Tensor))
    loaded = pickle.loads(pickle.dumps(aligner))
    assert loaded.mapping_.device.type == "cuda"
    assert loaded.stats_.device.type == "cuda"
    torch.testing.assert_close(loaded.transform(Xt), out)


@pytest.mark.gpu
@requires_cuda
def test_cuda_pickle_loads_on_cpu_only_machine():
    """Unpickle a GPU-fitted aligner in a child process that sees no GPU."""
    X, y, _ = _linear_data()
    aligner = CCAAligner().fit(torch.from_numpy(X).cuda(), torch.from_numpy(y).cuda())
    payload = pickle.dumps(aligner)
    code = (
        "import pickle, sys, torch\n"
        "assert not torch.cuda.is_available()\n"
        "a = pickle.loads(sys.stdin.buffer.read())\n"
        "assert a.mapping_.device.type == 'cpu' and a.stats_.device.type == 'cpu'\n"
        "print(float(a.transform(torch.ones(2, a.n_features_in_, dtype=torch.float64)).sum()))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", code], input=payload, env=env, capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    expected = float(aligner.transform(torch.ones(2, 6, dtype=torch.float64).cuda()).sum())
    assert float(result.stdout.decode()) == pytest.approx(expected)


# --------------------------------------------------------------------------
# documentation examples
# --------------------------------------------------------------------------
def test_user_guide_examples_run():
    """Every example in docs/user_guide/aligners.rst runs and prints what it shows."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "docs", "user_guide", "aligners.rst")
    result = doctest.testfile(path, module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 20


def test_docstring_examples_run():
    import skmerge.aligners._cca
    import skmerge.aligners._identity
    import skmerge.aligners._permutation
    import skmerge.stats

    for module in (skmerge.stats, skmerge.aligners._cca, skmerge.aligners._identity,
                   skmerge.aligners._permutation):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


@pytest.mark.parametrize("regularization", [0.3, 1e-4, 1.0])
def test_cca_cholesky_whitening_gives_the_symmetric_root_mapping(regularization):
    # Shrinkage makes the covariances safely positive definite, so the solve
    # whitens with Cholesky factors; the mapping must be the one of the
    # symmetric inverse square roots written in the docstring.
    from skmerge.aligners import _cca

    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 7)) @ rng.normal(size=(7, 7)) + 5.0
    Y = np.maximum(X @ rng.normal(size=(7, 5)) + rng.normal(size=(400, 5)), 0.0)
    fitted = CCAAligner(regularization=regularization).fit(X, Y)
    cov = np.cov(np.hstack([X, Y]).T)
    s_xx, s_yy, s_xy = cov[:7, :7], cov[7:, 7:], cov[:7, 7:]

    def shrunk_roots(s):
        s = (1 - regularization) * s + regularization * np.trace(s) / len(s) * np.eye(len(s))
        evals, evecs = np.linalg.eigh(s)
        return (evecs * np.sqrt(evals)) @ evecs.T, (evecs / np.sqrt(evals)) @ evecs.T

    (root_x, inv_x), (root_y, inv_y) = shrunk_roots(s_xx), shrunk_roots(s_yy)
    u, _, vt = np.linalg.svd(inv_x @ s_xy @ inv_y, full_matrices=False)
    np.testing.assert_allclose(fitted.mapping_, inv_x @ u @ vt @ root_y, atol=1e-9)
    np.testing.assert_allclose(fitted.inverse_mapping_, inv_y @ vt.T @ u.T @ root_x, atol=1e-9)
    color, whiten = _cca._whitening(torch.as_tensor(s_xx), regularization)
    assert torch.allclose(torch.triu(color), color)  # the Cholesky path was taken


def test_cca_whitening_falls_back_to_the_pseudo_inverse_root_without_shrinkage():
    # Rank-deficient covariance (a dead unit) and r = 0: no Cholesky factor
    # exists; the symmetric pseudo-inverse root maps the dead direction to zero.
    from skmerge.aligners import _cca

    rng = np.random.default_rng(4)
    X = rng.normal(size=(200, 4))
    X[:, 2] = 0.0
    cov = torch.as_tensor(np.cov(X.T))
    color, whiten = _cca._whitening(cov, 0.0)
    expected_root, expected_inverse = _cca._sqrt_and_inv_sqrt(cov)
    assert torch.equal(color, expected_root) and torch.equal(whiten, expected_inverse)
    assert torch.all(whiten[2] == 0)


def test_cca_factors_the_shared_reference_once_and_never_serves_stale_roots(monkeypatch):
    from skmerge.aligners import _cca
    from skmerge.stats import ReferenceCovariance

    calls = []
    original = _cca._Whitener.__init__

    def counted(self, cov, r, dtype=torch.float64):
        calls.append(cov.shape)
        original(self, cov, r, dtype)

    monkeypatch.setattr(_cca._Whitener, "__init__", counted)
    rng = np.random.default_rng(0)
    views = [rng.normal(size=(300, 6)) for _ in range(4)]
    stats = ReferenceCovariance(4, reference=0).update(views)
    fitted = [CCAAligner().fit_from_stats(stats.pair(k)) for k in (1, 2, 3)]
    assert len(calls) == 3 + 1  # one S_xx per model, the reference's S_yy once
    for k, aligner in zip((1, 2, 3), fitted):
        direct = CCAAligner().fit(views[k], views[0])
        np.testing.assert_allclose(aligner.mapping_.numpy(), direct.mapping_, atol=1e-10)
    # New samples rebind the comoments: the next fit sees the new reference covariance.
    more = [rng.normal(size=(100, 6)) * 3 for _ in range(4)]
    stats.update(more)
    refit = CCAAligner().fit_from_stats(stats.pair(1))
    direct = CCAAligner().fit(np.vstack([views[1], more[1]]), np.vstack([views[0], more[0]]))
    np.testing.assert_allclose(refit.mapping_.numpy(), direct.mapping_, atol=1e-10)


@pytest.mark.parametrize("cls", ALIGNERS)
def test_sparse_y_and_meta_tensors_are_named(cls):
    import scipy.sparse

    X, y, _ = _linear_data()
    for sparse in (scipy.sparse.csr_matrix(y), torch.from_numpy(y).to_sparse()):
        with pytest.raises(TypeError, match="Sparse data was passed for y, but dense data is required"):
            cls().fit(X, sparse)
        with pytest.raises(TypeError, match="Sparse data was passed for y"):
            cls().partial_fit(torch.from_numpy(X), sparse)
    meta = torch.empty(X.shape, device="meta")
    with pytest.raises(ValueError, match="X is on the meta device"):
        cls().fit(meta, meta)


def test_single_precision_solve_matches_the_double_one_on_a_well_conditioned_space():
    from skmerge.aligners import _cca
    from skmerge.stats import CrossCovariance

    rng = np.random.default_rng(5)
    X = rng.normal(size=(2000, 300)) * np.linspace(0.5, 2.0, 300)
    rotation, _ = np.linalg.qr(rng.normal(size=(300, 300)))
    # correlated in every direction (float32 cannot resolve canonical correlations
    # below ~1e-4 of the largest and treats them as zero)
    y = X @ rotation + 0.3 * rng.normal(size=(2000, 300))
    stats = CrossCovariance().update(torch.as_tensor(X), torch.as_tensor(y))
    double = CCAAligner(solver="double").fit_from_stats(stats)
    single = CCAAligner(solver="single").fit_from_stats(stats)
    for name in ("mapping_", "inverse_mapping_"):
        a, b = getattr(double, name), getattr(single, name)
        assert b.dtype == torch.float32  # in the precision of the solve
        assert float((a - b).norm() / a.norm()) < 1e-5
    # auto: float32 only for wide, shrunk spaces on a CPU
    cpu = torch.device("cpu")
    assert _cca._solve_dtype("auto", 1024, 1024, 0.3, 0.3, cpu) == torch.float32
    assert _cca._solve_dtype("auto", 512, 512, 0.3, 0.3, cpu) == torch.float64
    assert _cca._solve_dtype("auto", 4096, 4096, 0.0, 0.3, cpu) == torch.float64
    assert _cca._solve_dtype("auto", 4096, 4096, 0.3, 0.3, torch.device("cuda")) == torch.float64
    with pytest.raises(ValueError, match="solver"):
        CCAAligner(solver="fast").fit_from_stats(stats)
