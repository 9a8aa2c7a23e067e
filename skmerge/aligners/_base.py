"""Shared machinery of the aligners: validation, streaming, transforms, pickling.

Direction convention (one convention everywhere)::

    aligner.fit(X, y)       X: (n_samples, p) activations of the model to align
                            y: (n_samples, q) activations of the reference model
    aligner.transform(X)    -> X @ mapping_          (X in y's basis, no centering)
    aligner.inverse_transform(Z) -> Z @ inverse_mapping_

Subclasses implement only :meth:`BaseAligner._solve`, which turns a
:class:`~skmerge.stats.CrossCovariance` into the mapping; everything else
(fit from data, ``partial_fit``, ``fit_from_stats``, numpy/torch handling,
``score``, persistence) lives here.

NumPy versus torch: the type of ``X`` decides. NumPy input goes through
scikit-learn's ``validate_data`` (so the estimator checks see the usual
behaviour) and yields NumPy fitted attributes and outputs. A torch tensor is
validated here without converting it to NumPy (it may live on a GPU), the
statistics are accumulated and solved on its device, and fitted attributes
and outputs are tensors on that device. Mixed calls (NumPy ``X`` on an
aligner fitted from tensors, or the reverse) convert the small mapping, never
the data's type.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from skmerge.stats import CrossCovariance

__all__ = ["BaseAligner", "SmallSampleWarning"]


class SmallSampleWarning(UserWarning):
    """Few samples relative to the feature dimension and no regularization.

    Raised by :class:`~skmerge.aligners.CCAAligner` when
    ``n_samples < 2 * max(p, q)`` and ``regularization=0``: the covariance
    estimates are then (nearly) singular and unregularized CCA overfits.
    Use ``regularization="auto"`` or a value in (0, 1].
    """


def _is_tensor(data: Any) -> bool:
    return isinstance(data, torch.Tensor)


def _to_numpy(value: Any) -> Any:
    if _is_tensor(value):
        return value.detach().cpu().numpy()
    return value


def _to_torch(value: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    if _is_tensor(value):
        return value.to(device=device, dtype=dtype)
    array = np.asarray(value)
    if not array.flags.writeable:  # torch warns on read-only buffers
        array = array.copy()
    return torch.as_tensor(array).to(device=device, dtype=dtype)


def _output_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Floating dtype of the input; float64 for integer and boolean input."""
    return tensor.dtype if tensor.is_floating_point() else torch.float64


def _check_tensor(
    data: torch.Tensor,
    *,
    name: str,
    estimator: BaseEstimator,
    allow_1d: bool = False,
    min_samples: int = 1,
) -> torch.Tensor:
    """Mirror of ``check_array`` for torch tensors (no copy to the CPU).

    Messages follow scikit-learn's so users see one style of error.
    """
    cls = type(estimator).__name__
    if data.is_meta:
        raise ValueError(f"{name} is on the meta device, which holds no values; pass real data.")
    if data.layout != torch.strided:
        raise TypeError(f"Sparse data was passed for {name}, but dense data is required. Use "
                        "'.to_dense()' to convert it.")
    if data.is_complex():
        raise ValueError(f"Complex data not supported: {name} is a complex tensor.")
    if data.ndim == 1 and allow_1d:
        data = data.reshape(-1, 1)
    if data.ndim != 2:
        raise ValueError(
            f"Expected 2D array, got {data.ndim}D array instead: {name} has shape "
            f"{tuple(data.shape)}. Reshape your data to (n_samples, n_features)."
        )
    n, d = data.shape
    if n < min_samples:
        raise ValueError(
            f"Found array with {n} sample(s) (shape={tuple(data.shape)}) while a "
            f"minimum of {min_samples} is required by {cls}."
        )
    if d < 1:
        raise ValueError(
            f"Found array with 0 feature(s) (shape={tuple(data.shape)}) while a "
            f"minimum of 1 is required by {cls}."
        )
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        raise ValueError(f"Input {name} contains NaN or infinity.")
    return data


def _restore_device(name: str | None) -> torch.device:
    """The device recorded at pickling time if it exists here, else the CPU."""
    if name is None:
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    try:
        torch.empty(0, device=device)
    except Exception:  # backend not compiled in, no such device index, ...
        return torch.device("cpu")
    return device


class BaseAligner(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Base class of the aligners: linear maps from X's features to y's.

    Subclasses implement ``_solve(stats) -> dict`` returning at least
    ``mapping_`` (p, q) and ``inverse_mapping_`` (q, p) as float64 tensors on
    ``stats.device``, and optionally ``_check_params()``.
    """

    # -- hooks for subclasses --------------------------------------------
    def _check_params(self) -> None:
        """Validate constructor parameters (called by every fit method)."""

    def _solve(self, stats: CrossCovariance) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    # -- scikit-learn plumbing -------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True  # y is the reference's activations
        tags.target_tags.single_output = True  # 1-D y: a reference with one feature
        tags.target_tags.multi_output = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "mapping_")

    @property
    def _n_features_out(self) -> int:
        # Used by get_feature_names_out: one output per reference feature.
        return int(self.mapping_.shape[1])

    # -- input validation ------------------------------------------------
    def _validate_fit_data(self, X: Any, y: Any, reset: bool):
        """Validate a fitting batch; returns ``(X, y, as_numpy)`` with 2-D y."""
        if y is None:
            raise ValueError(
                f"This {type(self).__name__} estimator requires y to be passed, but the "
                "target y is None. y holds the reference model's activations."
            )
        if sp.issparse(y) or (_is_tensor(y) and y.layout != torch.strided):
            # scikit-learn's message for a sparse X; its validation would accept a sparse y.
            raise TypeError("Sparse data was passed for y, but dense data is required. Use "
                            "'.toarray()' (or '.to_dense()' for a torch tensor) to convert it.")
        if not _is_tensor(X):
            X, y = validate_data(
                self, X, _to_numpy(y), reset=reset, multi_output=True, y_numeric=True,
                ensure_min_samples=2, dtype=[np.float64, np.float32],
            )
            return X, (y.reshape(-1, 1) if y.ndim == 1 else y), True
        X = _check_tensor(X, name="X", estimator=self, min_samples=2)
        if not _is_tensor(y):
            y = check_array(y, ensure_2d=False, dtype="numeric", input_name="y", estimator=self)
            y = _to_torch(y, X.device)
        elif y.device != X.device:
            raise ValueError(f"X is on {X.device} but y is on {y.device}; put them on one device.")
        y = _check_tensor(y, name="y", estimator=self, allow_1d=True, min_samples=2)
        if y.shape[0] != X.shape[0]:
            raise ValueError(
                "Found input variables with inconsistent numbers of samples: "
                f"[{X.shape[0]}, {y.shape[0]}]"
            )
        if reset:
            self.n_features_in_ = int(X.shape[1])
            if hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        return X, y, False

    def _validate_input(self, X: Any, n_features: int, name: str, check_names: bool):
        """Validate data to be mapped; numpy stays numpy, tensors stay tensors."""
        if _is_tensor(X):
            X = _check_tensor(X, name=name, estimator=self)
        elif check_names:
            X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        else:
            X = check_array(X, dtype=[np.float64, np.float32], input_name=name, estimator=self)
        if X.shape[1] != n_features:
            raise ValueError(
                f"{name} has {X.shape[1]} features, but {type(self).__name__} is "
                f"expecting {n_features} features as input."
            )
        return X

    @staticmethod
    def _apply(X: Any, matrix: Any) -> Any:
        """``X @ matrix`` in the type, device and floating dtype of ``X``."""
        if _is_tensor(X):
            dtype = _output_dtype(X)
            return X.to(dtype) @ _to_torch(matrix, X.device, dtype)
        return X @ np.asarray(_to_numpy(matrix), dtype=X.dtype)

    # -- fitting -----------------------------------------------------------
    def fit(self, X: Any, y: Any) -> "BaseAligner":
        """Fit the mapping from ``X``'s features to ``y``'s.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, p)
            Activations of the model to align.
        y : array-like or torch.Tensor of shape (n_samples, q) or (n_samples,)
            Activations of the reference model, same samples; a 1-D ``y`` is a
            reference with one feature.

        Returns
        -------
        self : object
            Fitted aligner. NumPy ``X`` gives NumPy fitted attributes; a torch
            ``X`` gives tensors on its device.
        """
        self._check_params()
        X, y, as_numpy = self._validate_fit_data(X, y, reset=True)
        stats = CrossCovariance().update(X, y)
        return self._fit_stats(stats, as_numpy)

    def partial_fit(self, X: Any, y: Any) -> "BaseAligner":
        """Accumulate one batch into ``stats_`` and re-solve.

        The first call (or a call after :meth:`fit`, which it continues)
        creates ``stats_`` on the batch's device. Solving after every batch
        costs one ``O(d^3)`` factorization; to stream many batches of wide
        layers, accumulate a :class:`~skmerge.stats.CrossCovariance` yourself
        and call :meth:`fit_from_stats` once.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, p)
            Batch of the model to align.
        y : array-like or torch.Tensor of shape (n_samples, q) or (n_samples,)
            Batch of the reference model.

        Returns
        -------
        self : object
            Fitted aligner.
        """
        self._check_params()
        first = not hasattr(self, "stats_")
        X, y, as_numpy = self._validate_fit_data(X, y, reset=first)
        if first:
            stats = CrossCovariance()
        else:
            stats = copy.copy(self.stats_)  # never mutate a user's object
            if y.shape[1] != stats.n_features_y:
                raise ValueError(
                    f"y has {y.shape[1]} features, but earlier batches of the reference "
                    f"had {stats.n_features_y}."
                )
        stats.update(X, y)
        return self._fit_stats(stats, as_numpy)

    def fit_from_stats(self, stats: CrossCovariance) -> "BaseAligner":
        """Fit from already accumulated statistics, without raw activations.

        This is what :class:`~skmerge.ModelMerger` and distributed users call:
        accumulate (and, across workers, :meth:`~skmerge.stats.CrossCovariance.merge`)
        a :class:`~skmerge.stats.CrossCovariance` with ``X`` = the model to
        align and ``Y`` = the reference, then solve here.

        Parameters
        ----------
        stats : CrossCovariance
            Statistics with at least 2 samples.

        Returns
        -------
        self : object
            Fitted aligner; fitted attributes are torch tensors on
            ``stats.device``, float64 (float32 for the wide spaces that CCA and
            Procrustes solve in single precision). ``stats_`` is a shallow copy of ``stats`` (no
            tensor is copied; later updates of ``stats`` do not affect it).
        """
        if not isinstance(stats, CrossCovariance):
            raise TypeError(f"stats must be a skmerge.stats.CrossCovariance, got {type(stats).__name__}.")
        self._check_params()
        stats = copy.copy(stats)
        if hasattr(self, "feature_names_in_"):
            del self.feature_names_in_
        return self._fit_stats(stats, as_numpy=False)

    def _fit_stats(self, stats: CrossCovariance, as_numpy: bool) -> "BaseAligner":
        if stats.n_samples_ < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 samples to estimate covariances, "
                f"got n_samples={stats.n_samples_}."
            )
        with torch.no_grad():
            fitted = self._solve(stats)
        self.n_features_in_ = stats.n_features_x
        self.stats_ = stats
        for name, value in fitted.items():
            setattr(self, name, _to_numpy(value) if as_numpy else value)
        return self

    # -- mapping -------------------------------------------------------------
    def transform(self, X: Any) -> Any:
        """Express ``X`` in the reference's basis: ``X @ mapping_`` (no centering).

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, p)
            Activations of the model to align.

        Returns
        -------
        Z : ndarray or torch.Tensor of shape (n_samples, q)
            Same type as ``X`` (tensor on ``X``'s device), floating dtype of
            ``X`` (float64 for integer input).
        """
        check_is_fitted(self)
        X = self._validate_input(X, self.n_features_in_, "X", check_names=True)
        return self._apply(X, self.mapping_)

    def inverse_transform(self, X: Any) -> Any:
        """Map reference-basis data back: ``X @ inverse_mapping_``.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, q)
            Data in the reference's basis (e.g. the output of :meth:`transform`).

        Returns
        -------
        X_original : ndarray or torch.Tensor of shape (n_samples, p)
            Same type, device and floating dtype rules as :meth:`transform`.
        """
        check_is_fitted(self)
        X = self._validate_input(X, int(self.mapping_.shape[1]), "X", check_names=False)
        return self._apply(X, self.inverse_mapping_)

    def score(self, X: Any, y: Any) -> float:
        """Held-out alignment quality: mean per-feature Pearson correlation.

        Computes ``Z = transform(X)`` and returns the average over the
        reference's features ``j`` of ``corr(Z[:, j], y[:, j])``. A feature
        that is constant on either side (a dead unit, or a reference feature
        the mapping does not reach) counts as correlation 0, so a mapping can
        never score higher by switching features off. Greater is better; 1 is
        a perfect linear match up to per-feature offset and scale.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (n_samples, p)
            Activations of the model to align (at least 2 samples).
        y : array-like or torch.Tensor of shape (n_samples, q) or (n_samples,)
            Activations of the reference model on the same samples.

        Returns
        -------
        score : float
            In [-1, 1].
        """
        Z = self.transform(X)
        device = Z.device if _is_tensor(Z) else torch.device("cpu")
        Z = _to_torch(Z, device, torch.float64)
        if _is_tensor(y):
            y = _check_tensor(y.to(device), name="y", estimator=self, allow_1d=True)
        else:
            y = check_array(y, ensure_2d=False, dtype="numeric", input_name="y", estimator=self)
            y = _to_torch(y.reshape(y.shape[0], -1), device)
        y = y.to(torch.float64)
        if y.shape[1] != Z.shape[1]:
            raise ValueError(
                f"y has {y.shape[1]} features, but {type(self).__name__} maps to "
                f"{Z.shape[1]} reference features."
            )
        if y.shape[0] != Z.shape[0]:
            raise ValueError(
                "Found input variables with inconsistent numbers of samples: "
                f"[{Z.shape[0]}, {y.shape[0]}]"
            )
        if Z.shape[0] < 2:
            raise ValueError(f"score needs at least 2 samples, got {Z.shape[0]}.")
        return float(_columnwise_correlation(Z, y).mean())

    # -- persistence: CPU tensors in the pickle, device restored on load -------
    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        device = None
        for key, value in state.items():
            if _is_tensor(value):
                device = value.device
                state[key] = value.cpu()
        stats = state.get("stats_")
        if isinstance(stats, CrossCovariance) and stats.device is not None:
            device = device or stats.device  # stats_ pickles itself to the CPU
        state["_skmerge_device"] = None if device is None else str(device)
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        device = _restore_device(state.pop("_skmerge_device", None))
        for key, value in state.items():
            if _is_tensor(value):
                state[key] = value.to(device)
        if isinstance(state.get("stats_"), CrossCovariance):
            state["stats_"] = state["stats_"].to(device)
        super().__setstate__(state)


def _constant_mask(var: torch.Tensor, mean: torch.Tensor, eps: float) -> torch.Tensor:
    """Features whose spread is rounding noise around their mean.

    A constant column accumulated in floating point keeps a residual of about
    ``eps * |mean|``; anything below ``1000 * eps * |mean|`` (or exactly zero)
    is treated as constant. Scale-free, so tiny-but-real features survive.
    """
    std = var.clamp_min(0).sqrt()
    return (std <= 1e3 * eps * mean.abs()) | (var <= 0)


def _correlation_scale(var: torch.Tensor, mean: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / std`` per feature, 0 for constant features (so correlations are 0, not NaN)."""
    constant = _constant_mask(var, mean, eps)
    safe = torch.where(constant, torch.ones_like(var), var)
    return torch.where(constant, torch.zeros_like(var), safe.rsqrt())


def _columnwise_correlation(Z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of ``Z[:, j]`` with ``y[:, j]`` for every j (0 if constant)."""
    eps = float(torch.finfo(torch.float64).eps)
    mean_z, mean_y = Z.mean(0), y.mean(0)
    zc, yc = Z - mean_z, y - mean_y
    var_z, var_y = (zc * zc).mean(0), (yc * yc).mean(0)
    cov = (zc * yc).mean(0)
    return cov * _correlation_scale(var_z, mean_z, eps) * _correlation_scale(var_y, mean_y, eps)


def check_regularization(value: Any, name: str = "regularization", allow_auto: bool = True):
    """Validate a shrinkage parameter: a real in [0, 1] or ``"auto"``."""
    if allow_auto and isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        choices = 'a float in [0, 1] or "auto"' if allow_auto else "a float in [0, 1]"
        raise ValueError(f"{name} must be {choices}, got {value!r}.")
    return float(value)
