"""The solve's SciPy-backed factorizations agree with torch.linalg in every layout, and keep the thread settings."""

import itertools
import threading

import pytest
import torch
from threadpoolctl import threadpool_info

from skmerge._linalg import _blas_threads, svd, triangular_multiply, triangular_solve

DTYPES = [(torch.float32, 1e-4), (torch.float64, 1e-11)]


def _lower(n, dtype, layout):
    gen = torch.Generator().manual_seed(n)
    m = torch.randn(n, n, generator=gen, dtype=dtype)
    factor = torch.linalg.cholesky(m @ m.T / n + torch.eye(n, dtype=dtype))
    return {"row": factor.contiguous(), "column": factor.T.contiguous().T}[layout]


def _operand(shape, dtype, layout):
    b = torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=dtype)
    return b.contiguous() if layout == "row" else b.T.contiguous().T


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("factor_layout,b_layout", list(itertools.product(["row", "column"], repeat=2)))
@pytest.mark.parametrize("left,transpose", list(itertools.product([True, False], repeat=2)))
def test_triangular_products_match_dense_formulas(dtype, tol, factor_layout, b_layout, left, transpose):
    n, k = 37, 5
    factor = _lower(n, dtype, factor_layout)
    b = _operand((n, k) if left else (k, n), dtype, b_layout)
    op = factor.T if transpose else factor
    dense_inverse = torch.linalg.inv(op.double()).to(dtype)
    expected_solve = dense_inverse @ b if left else b @ dense_inverse
    expected_product = op @ b if left else b @ op
    solved = triangular_solve(factor, b, left=left, transpose=transpose)
    product = triangular_multiply(factor, b, left=left, transpose=transpose)
    assert solved.shape == expected_solve.shape and solved.dtype == dtype
    torch.testing.assert_close(solved, expected_solve, atol=tol, rtol=tol)
    torch.testing.assert_close(product, expected_product, atol=tol, rtol=tol)


def test_inputs_are_not_modified():
    factor = _lower(20, torch.float32, "row")
    b = _operand((20, 20), torch.float32, "column")
    factor_copy, b_copy = factor.clone(), b.clone()
    triangular_solve(factor, b)
    triangular_multiply(factor, b, left=False, transpose=True)
    svd(b)
    assert torch.equal(factor, factor_copy) and torch.equal(b, b_copy)


def test_torch_route_keeps_gradients():
    factor = _lower(10, torch.float64, "row").requires_grad_()
    b = torch.randn(10, 3, dtype=torch.float64)
    solved = triangular_solve(factor, b, transpose=True)
    solved.sum().backward()  # torch.linalg keeps the graph
    assert factor.grad is not None
    product = triangular_multiply(factor, b)
    assert product.requires_grad
    torch.testing.assert_close(product, factor @ b)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("shape", [(30, 30), (12, 40), (40, 12), (0, 5)])
def test_svd_is_a_thin_descending_factorization(dtype, tol, shape):
    a = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    u, s, vh = svd(a)
    expected = torch.linalg.svd(a, full_matrices=False)
    assert u.shape == expected.U.shape and vh.shape == expected.Vh.shape and s.dtype == dtype
    torch.testing.assert_close(s, expected.S, atol=tol, rtol=tol)
    if a.numel():
        torch.testing.assert_close((u * s) @ vh, a, atol=10 * tol, rtol=10 * tol)
        assert bool((s[:-1] >= s[1:]).all())
        torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=dtype), atol=10 * tol, rtol=0)


def _blas_threads_now():
    return sorted(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")


def test_blas_gets_torch_threads_and_gets_its_own_back():
    before = _blas_threads_now()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _blas_threads():
            inside = _blas_threads_now()
            with _blas_threads():  # nested: no second setting, no early restore
                assert _blas_threads_now() == inside
            assert _blas_threads_now() == inside
    finally:
        torch.set_num_threads(previous)
    assert set(inside) == {1}
    assert _blas_threads_now() == before


def test_concurrent_solves_agree_and_restore_the_setting():
    before = _blas_threads_now()
    factor = _lower(64, torch.float32, "row")
    b = _operand((64, 64), torch.float32, "row")
    expected = triangular_solve(factor, b)
    results, errors = [], []

    def work():
        try:
            for _ in range(20):
                results.append(torch.equal(triangular_solve(factor, b), expected))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 80 and all(results)
    assert _blas_threads_now() == before
