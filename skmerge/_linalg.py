"""Dense factorizations and triangular products of the solve, on the faster CPU backend.

On CPUs, SciPy's LAPACK and BLAS (OpenBLAS in its wheels) compute the SVD,
the triangular solves and the triangular products of the CCA solve in less
time than ``torch.linalg`` (MKL in the CPU wheels); a product with a
triangular matrix (``trmm``) also takes half the flops of the full product
torch has to use. ``benchmarks/cost.py --parts polar`` times both backends
(the polar table of the benchmarks page). Tensors on other devices, other
dtypes and tensors that require gradients use ``torch.linalg``.

SciPy's OpenBLAS has its own thread pool; it gets ``torch.get_num_threads()``
threads during each call, so ``torch.set_num_threads`` keeps governing the
whole solve.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas

__all__ = ["svd", "triangular_multiply", "triangular_solve"]

_SCIPY_DTYPES = (torch.float32, torch.float64)


def _on_scipy(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in _SCIPY_DTYPES and not t.requires_grad for t in tensors)


def _on_blas(lower_factor: torch.Tensor, b: torch.Tensor) -> bool:
    return b.numel() > 0 and lower_factor.dtype == b.dtype and _on_scipy(lower_factor, b)


class _BlasThreads:
    """Gives SciPy's BLAS torch's thread count while any caller is inside (nesting and threads allowed).

    The thread count of a BLAS library is process-wide: the first caller in
    sets it, the last one out restores it, so concurrent solves never restore
    each other's setting midway.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._controller = None
        self._restore = None

    @contextmanager
    def __call__(self):
        with self._lock:
            if self._inside == 0:
                from threadpoolctl import ThreadpoolController  # a dependency of scikit-learn

                if self._controller is None:
                    self._controller = ThreadpoolController()
                self._restore = self._controller.limit(limits=torch.get_num_threads(), user_api="blas")
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    self._restore.restore_original_limits()
                    self._restore = None


_blas_threads = _BlasThreads()


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``a = u diag(s) vh`` with ``s`` descending, like ``torch.linalg.svd(a, full_matrices=False)``."""
    if not _on_scipy(a) or min(a.shape) == 0:
        return torch.linalg.svd(a, full_matrices=False)
    array = a.numpy()
    with _blas_threads():
        try:
            u, s, vh = scipy.linalg.svd(array, full_matrices=False, lapack_driver="gesdd", check_finite=False)
        except np.linalg.LinAlgError:  # gesdd can fail to converge where the slower gesvd does not
            u, s, vh = scipy.linalg.svd(array, full_matrices=False, lapack_driver="gesvd", check_finite=False)
    return torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)


def _blas_operands(lower_factor: torch.Tensor, b: torch.Tensor, left: bool, transpose: bool):
    """Fortran-ordered operands of ``op(L) B`` or ``B op(L)`` without copies.

    ``L`` (lower) is passed as itself when column-major, else as its transpose
    (upper, column-major); ``B`` likewise, computing the transposed product.
    Returns ``(a, lower, trans, b, side, transposed)``.
    """
    a, lower, trans = lower_factor.numpy(), True, transpose
    if not a.flags.f_contiguous:
        a, lower, trans = a.T, False, not trans  # L = (L^T)^T: the upper factor, transposed
    b_array, side, transposed = b.numpy(), 0 if left else 1, False
    if not b_array.flags.f_contiguous:
        # op(L) B = (B^T op(L)^T)^T: the product on the other side, with op transposed
        b_array, side, trans, transposed = b_array.T, 1 - side, not trans, True
    return a, lower, trans, b_array, side, transposed


def _blas_call(name: str, lower_factor: torch.Tensor, b: torch.Tensor, left: bool, transpose: bool) -> torch.Tensor:
    a, lower, trans, b_array, side, transposed = _blas_operands(lower_factor, b, left, transpose)
    (routine,) = blas.get_blas_funcs((name,), (a, b_array))
    with _blas_threads():
        out = routine(1.0, a, b_array, side=side, lower=int(lower), trans_a=int(trans))
    out = torch.from_numpy(out)
    return out.T if transposed else out


def triangular_solve(lower_factor: torch.Tensor, b: torch.Tensor, *, left: bool = True,
                     transpose: bool = False) -> torch.Tensor:
    """``op(L)^-1 B`` (``left``) or ``B op(L)^-1``, with ``op(L) = L^T`` when ``transpose``; ``L`` lower triangular."""
    if _on_blas(lower_factor, b):
        return _blas_call("trsm", lower_factor, b, left, transpose)
    factor = lower_factor.mT if transpose else lower_factor
    return torch.linalg.solve_triangular(factor, b, upper=transpose, left=left)


def triangular_multiply(lower_factor: torch.Tensor, b: torch.Tensor, *, left: bool = True,
                        transpose: bool = False) -> torch.Tensor:
    """``op(L) B`` (``left``) or ``B op(L)``, with ``op(L) = L^T`` when ``transpose``; ``L`` lower triangular.

    Half the flops of a full product (BLAS ``trmm``) on CPUs; only the lower
    triangle of ``L`` is read there, so ``L`` must be zero above its diagonal
    for the other devices' full product to agree.
    """
    if _on_blas(lower_factor, b):
        return _blas_call("trmm", lower_factor, b, left, transpose)
    factor = lower_factor.mT if transpose else lower_factor
    return factor @ b if left else b @ factor
