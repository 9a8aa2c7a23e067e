"""The benchmarks' ridge CCA (the reference code's regularization) against independent formulas."""

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from skmerge.aligners import CCAAligner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _reference_cca import GAMMAS, RidgeCCAAligner  # noqa: E402


def _data(n=400, p=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) @ rng.normal(size=(p, p))
    y = x @ rng.normal(size=(p, p)) + 0.5 * rng.normal(size=(n, p))
    return x, y


@pytest.mark.parametrize("gamma", [1e-3, 0.1, 10.0])
def test_ridge_cca_matches_the_formula_with_scipy_square_roots(gamma):
    x, y = _data()
    xc, yc = x - x.mean(0), y - y.mean(0)
    n = len(x)
    s_xx = xc.T @ xc / (n - 1) + gamma * np.eye(6)
    s_yy = yc.T @ yc / (n - 1) + gamma * np.eye(6)
    s_xy = xc.T @ yc / (n - 1)
    inv_x = np.linalg.inv(scipy.linalg.sqrtm(s_xx).real)
    inv_y = np.linalg.inv(scipy.linalg.sqrtm(s_yy).real)
    u, _, vh = np.linalg.svd(inv_x @ s_xy @ inv_y)
    expected = inv_x @ u @ vh @ scipy.linalg.sqrtm(s_yy).real
    aligner = RidgeCCAAligner(gamma=gamma).fit(x, y)
    np.testing.assert_allclose(aligner.mapping_, expected, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(aligner.mapping_ @ aligner.inverse_mapping_, np.eye(6), atol=1e-8)


def test_ridge_cca_without_ridge_is_plain_cca_and_recovers_an_invertible_map():
    x, _ = _data()
    a = np.random.default_rng(1).normal(size=(6, 6))
    ridge = RidgeCCAAligner(gamma=0.0).fit(x, x @ a)
    np.testing.assert_allclose(ridge.mapping_, a, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ridge.mapping_, CCAAligner(regularization=0.0).fit(x, x @ a).mapping_,
                               rtol=1e-8, atol=1e-8)


def test_a_huge_ridge_gives_the_polar_factor_of_the_cross_covariance():
    x, y = _data()
    s_xy = np.cov(x.T, y.T)[:6, 6:]
    u, _, vh = np.linalg.svd(s_xy)
    aligner = RidgeCCAAligner(gamma=1e9).fit(torch.as_tensor(x), torch.as_tensor(y))
    np.testing.assert_allclose(aligner.mapping_.numpy(), u @ vh, atol=1e-6)
    assert GAMMAS[0] == 1e-6 and GAMMAS[-1] == 1e7 and len(GAMMAS) == 14


def test_ridge_cca_rejects_a_negative_gamma():
    x, y = _data()
    with pytest.raises(ValueError, match="gamma"):
        RidgeCCAAligner(gamma=-1.0).fit(x, y)
