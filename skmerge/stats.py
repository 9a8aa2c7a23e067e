"""Streaming first and second moments for feature alignment.

The aligners and the model merger never need raw activations, only sample
counts, means and *comoments* (sums of centered products). This module
accumulates them batch by batch with the numerically stable pairwise update of
Chan, Golub and LeVeque: every batch is centered on its own mean, and two
partial results ``(n_a, mean_a, M_a)`` and ``(n_b, mean_b, M_b)`` combine as

.. math::

    n = n_a + n_b, \\quad
    \\delta = \\bar x_b - \\bar x_a, \\quad
    \\bar x = \\bar x_a + \\delta \\, n_b / n, \\quad
    M = M_a + M_b + \\delta_x \\delta_y^\\top \\, n_a n_b / n .

Unlike the textbook ``E[x x^T] - mu mu^T`` formula this does not lose all
significant digits when the features have a large offset relative to their
spread (post-ReLU activations, unnormalized inputs).

Precision: with ``precision="double"`` every batch is converted to float64
*before* its mean is subtracted, so the only rounding error of a float32 input
is the one already present in the float32 values themselves. With
``precision="single"`` each batch is centered and multiplied in float32 (the
merger's default for float32 models, several times faster on CPUs). Either
way the means and the accumulation across batches are float64, on the device
of the data, so the error does not grow with the number of batches.

Two containers are provided:

* :class:`CrossCovariance` -- two views ``X`` (n, p) and ``Y`` (n, q); what one
  aligner needs.
* :class:`ReferenceCovariance` -- ``n_views`` views against one reference view
  (star shape, "all-to-one" merging); memory ``O(n_views * d^2)``, never the
  joint ``(n_views * d)^2`` matrix. :meth:`ReferenceCovariance.pair` hands out
  the :class:`CrossCovariance` of one view against the reference.

Updates are *out of place*: ``update`` and ``merge`` bind new tensors instead
of modifying the old ones, so a :class:`CrossCovariance` returned by
:meth:`ReferenceCovariance.pair` (which shares the tensors, no copy) is a
consistent snapshot that later updates of its parent never change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["CrossCovariance", "ReferenceCovariance"]


# --------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------
def _checked_batch(data: Any, name: str, device: torch.device | None, grouped: bool = False) -> torch.Tensor:
    """Validate one 2-D batch (type, device, shape); its values are checked by :func:`_checked_mean`.

    ``device`` is the device of the accumulated statistics (``None`` before the
    first update). NumPy input is moved there; a tensor on another device is an
    error, because silently copying a GPU batch to another device is almost
    always a bug in the caller's data pipeline.

    Tensors of dtype float32 or float64 are returned as they are (no copy): the
    conversion to float64 happens when the batch is centered (one pass, one new
    tensor). Every other input comes back as a new float64 tensor.
    """
    if sp.issparse(data) or (isinstance(data, torch.Tensor) and data.layout != torch.strided):
        raise TypeError(f"{name} is sparse, but dense data is required; convert it with "
                        "'.toarray()' (or '.to_dense()' for a torch tensor).")
    if isinstance(data, torch.Tensor):
        if device is not None and data.device != device:
            raise ValueError(
                f"{name} is on device {data.device}, but the statistics (or the batch's other "
                f"views) are on {device}; move the batch or call .to() on the statistics first."
            )
        if data.is_meta:
            raise ValueError(f"{name} is on the meta device, which holds no values; pass real data.")
        if data.is_complex():
            raise ValueError(f"{name} is complex; only real-valued data is supported.")
        tensor = data.detach()
        if tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.to(torch.float64)
    else:
        array = np.asarray(data)
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == bool
        ):
            raise ValueError(f"{name} must be numeric, got dtype {array.dtype}.")
        if np.iscomplexobj(array):
            raise ValueError(f"{name} is complex; only real-valued data is supported.")
        array = np.ascontiguousarray(array, dtype=np.float64)
        if not array.flags.writeable:  # torch warns on read-only buffers
            array = array.copy()
        tensor = torch.from_numpy(array)
        if device is not None:
            tensor = tensor.to(device)
    if grouped and tensor.ndim == 3:  # (n_groups, group_size, n_features), internal
        return tensor
    if tensor.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n_samples, n_features), got shape {tuple(tensor.shape)}."
        )
    return tensor


def _checked_mean(tensor: torch.Tensor, name: str, precision: str = "double") -> torch.Tensor:
    """Float64 column means of a validated batch; raises if the batch is not finite.

    A NaN or infinite entry makes its column's sum NaN or infinite, so
    checking the ``d`` means replaces the elementwise check of all ``n * d``
    values (which cost as much as the centering and the conversion together).
    Only when a mean is not finite are the values themselves examined: a batch
    of finite values whose float64 sum overflows is accepted, as before.

    With ``precision="single"``, a float32 grouped batch (one group per image
    of a convolution input) is first summed over each group in float32, a few
    hundred values read along contiguous memory, and these partial sums are
    added in float64: several times faster than a float64 reduction over both
    axes, with an error of the order of float32 rounding, that of the products
    of this precision.
    """
    if tensor.numel() == 0:
        return torch.zeros(tensor.shape[-1], dtype=torch.float64, device=tensor.device)
    n_samples = math.prod(tensor.shape[:-1])
    if precision == "single" and tensor.dtype == torch.float32 and tensor.ndim == 3 and tensor.shape[0] > 1:
        mean = tensor.sum(dim=1).to(torch.float64).sum(0) / n_samples
        if bool(torch.isfinite(mean).all()):
            return mean
    # Converted to float64 before it is summed; a grouped batch is reduced over
    # each group's samples first (contiguous memory for a view of NCHW).
    total = tensor.sum(dim=1, dtype=torch.float64).sum(0) if tensor.ndim == 3 else (
        tensor.sum(dim=0, dtype=torch.float64))
    mean = total / n_samples
    if not bool(torch.isfinite(mean).all()) and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinity.")
    return mean


def _chan_merge(
    n_a: int,
    means_a: list[torch.Tensor],
    moments_a: dict[tuple[int, int], torch.Tensor],
    n_b: int,
    means_b: list[torch.Tensor],
    moments_b: dict[tuple[int, int], torch.Tensor],
    inplace: bool = False,
) -> tuple[int, list[torch.Tensor], dict[tuple[int, int], torch.Tensor]]:
    """Chan et al.'s pairwise combination of two partial results.

    ``means_*[i]`` is the mean of view ``i``; ``moments_*[(i, j)]`` is the
    comoment (sum of centered products) of view ``i`` with view ``j``. Returns
    new containers; the inputs are not modified, except the comoments of
    ``a`` with ``inplace`` (no second copy of every comoment).
    """
    if n_a == 0:
        return n_b, list(means_b), dict(moments_b)
    if n_b == 0:
        return n_a, list(means_a), dict(moments_a)
    n = n_a + n_b
    deltas = [mb - ma for ma, mb in zip(means_a, means_b)]
    means = [ma + d * (n_b / n) for ma, d in zip(means_a, deltas)]
    factor = n_a * n_b / n
    if inplace:
        moments = {(i, j): moments_a[i, j].addr_(deltas[i], deltas[j], alpha=factor).add_(moments_b[i, j])
                   for (i, j) in moments_a}
    else:
        moments = {  # M_a + M_b + factor * outer(delta_i, delta_j), two passes
            (i, j): torch.addr(moments_a[i, j], deltas[i], deltas[j], alpha=factor).add_(moments_b[i, j])
            for (i, j) in moments_a
        }
    return n, means, moments


def _checked_precision(precision: Any) -> str:
    if precision not in ("double", "single"):
        raise ValueError(f"precision must be 'double' or 'single', got {precision!r}.")
    return precision


def _centered(tensor: torch.Tensor, mean: torch.Tensor, precision: str) -> torch.Tensor:
    """The batch minus its mean, as a new ``(n_samples, d)`` matrix laid out for the products.

    "double": centering promotes float32 to float64 (exact) and the products
    are float64. "single": the batch is centered and multiplied in float32
    (several times faster on CPUs); the batch means and the accumulation
    across batches stay float64, so the rounding error is that of one batch's
    products and does not grow with the number of batches.

    The centering is the batch's only copy, written in the order the matrix
    product reads: a grouped view whose features are not its fastest axis
    (convolution inputs, NCHW) becomes a feature-major ``(d, n_samples)``
    block returned transposed, anything else a sample-major block. No other
    copy (no reshape of a strided view) is made afterwards.
    """
    dtype = torch.float32 if precision == "single" else torch.float64
    shift = mean.to(dtype)
    if tensor.ndim == 3 and tensor.stride(-1) != 1 and tensor.shape[-1] > 1:
        n_groups, group_size, n_features = tensor.shape
        out = torch.empty((n_features, n_groups, group_size), dtype=dtype, device=tensor.device)
        torch.sub(tensor, shift, out=out.permute(1, 2, 0))
        return out.view(n_features, n_groups * group_size).T
    out = torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
    torch.sub(tensor, shift, out=out)
    return out.view(math.prod(tensor.shape[:-1]), tensor.shape[-1])


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum over samples of a_s b_s^T`` for centered (n, p) and (n, q) matrices, in float64.

    Single-precision products overflow once the values pass ~1e19 (float32
    holds up to 3.4e38); such a batch's products are then computed in float64
    instead. Overflow in float64 too (values past ~1e154) is an error that
    says what to do, not an infinite covariance that breaks the solve later.
    """
    product = a.T @ b
    if product.dtype != torch.float64 and not bool(torch.isfinite(product).all()):
        product = a.T.to(torch.float64) @ b.to(torch.float64)
    product = product.to(torch.float64)
    if not bool(torch.isfinite(product).all()):
        scale = max(float(a.abs().max()), float(b.abs().max()))
        raise ValueError(
            f"The products of centered activations of magnitude up to {scale:.3g} overflow even "
            "in float64; rescale the input data (or the weights) so that activations stay "
            "far below 1e150.")
    return product


def _feature_index(features, n_features: int, device) -> torch.Tensor:
    """A LongTensor of feature positions from a slice or a sequence of ints."""
    if isinstance(features, slice):
        return torch.arange(n_features, device=device)[features]
    index = torch.as_tensor(features, dtype=torch.long, device=device).reshape(-1)
    if index.numel() and (int(index.min()) < -n_features or int(index.max()) >= n_features):
        raise IndexError(f"feature index out of range for {n_features} features.")
    return index


class _ComomentAccumulator:
    """Means and selected pairwise comoments of several views.

    Subclasses choose which ``(i, j)`` view pairs to keep (``_pairs``); the
    streaming update, merging, device moves and pickling live here once.
    """

    _pairs: tuple[tuple[int, int], ...] = ()
    _n_views: int = 0
    # Class default: objects pickled before the option existed load as "double".
    precision: str = "double"

    def _reset(self) -> None:
        self.n_samples_: int = 0
        self._means: list[torch.Tensor] | None = None
        self._moments: dict[tuple[int, int], torch.Tensor] | None = None

    # -- accumulation -----------------------------------------------------
    def _update_views(self, views: Sequence[Any], names: Sequence[str]) -> None:
        if len(views) != self._n_views:
            raise ValueError(f"Expected {self._n_views} views, got {len(views)}.")
        batch = self._batch()
        for k, (view, name) in enumerate(zip(views, names)):
            batch.add(k, view, name, grouped=False)
        batch.commit()

    def _add_batch(self, n_batch: int, means_b: list, moments_b: dict) -> None:
        if self._means is None:
            # Establish shapes and device even for an empty first batch.
            self.n_samples_, self._means, self._moments = n_batch, means_b, moments_b
        else:
            # A merger's own pass (``_accumulating``) holds no snapshot yet: the
            # comoments grow in place instead of being copied at every batch.
            self.n_samples_, self._means, self._moments = _chan_merge(
                self.n_samples_, self._means, self._moments, n_batch, means_b, moments_b,
                inplace=getattr(self, "_accumulating", False)
            )

    def _batch(self, commit_when_complete: bool = False) -> "_ViewByViewBatch":
        """Start a batch whose views are given one at a time (see :class:`_ViewByViewBatch`)."""
        return _ViewByViewBatch(self, commit_when_complete)

    def _merged(self, other: "_ComomentAccumulator") -> "_ComomentAccumulator":
        if type(other) is not type(self) or self._pairs != other._pairs:
            raise TypeError(
                f"Cannot merge {type(self).__name__} with {type(other).__name__}."
            )
        new = self._empty_like()
        if self._means is None or other._means is None:
            source = other if self._means is None else self
            new.n_samples_ = source.n_samples_
            new._means = None if source._means is None else list(source._means)
            new._moments = None if source._moments is None else dict(source._moments)
            return new
        shapes_a = [m.shape[0] for m in self._means]
        shapes_b = [m.shape[0] for m in other._means]
        if shapes_a != shapes_b:
            raise ValueError(f"Cannot merge statistics with feature counts {shapes_a} and {shapes_b}.")
        if self.device != other.device:
            raise ValueError(
                f"Cannot merge statistics on {self.device} and {other.device}; use .to() first."
            )
        new.n_samples_, new._means, new._moments = _chan_merge(
            self.n_samples_, self._means, self._moments,
            other.n_samples_, other._means, other._moments,
        )
        return new

    def _empty_like(self) -> "_ComomentAccumulator":
        # Same configuration (views, reference), no data. Not copy.copy: that
        # would go through __getstate__ and move tensors to the CPU.
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new._reset()
        return new

    def __copy__(self) -> "_ComomentAccumulator":
        # Updates rebind containers instead of mutating them, so a shallow copy
        # is an independent snapshot (and no tensor moves to the CPU, which the
        # default copy protocol would do through __getstate__).
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    # -- common queries ---------------------------------------------------
    @property
    def device(self) -> torch.device | None:
        """Device of the statistics (``None`` before the first update)."""
        return None if self._means is None else self._means[0].device

    def _check_fitted(self) -> None:
        if self._means is None:
            raise ValueError(f"This {type(self).__name__} has no data yet; call update() first.")

    def _covariance(self, i: int, j: int, ddof: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        self._check_fitted()
        denominator = self.n_samples_ - ddof
        if denominator <= 0:
            raise ValueError(
                f"Covariance with ddof={ddof} needs more than {ddof} samples, "
                f"got n_samples={self.n_samples_}."
            )
        moment = self._moments[i, j] if (i, j) in self._moments else self._moments[j, i].T
        if dtype is not None and dtype != moment.dtype:
            return moment.to(dtype).div_(denominator)  # one copy, in the asked precision
        return moment / denominator

    def to(self, device: torch.device | str) -> "_ComomentAccumulator":
        """Return the statistics on ``device`` (``self`` if already there).

        Parameters
        ----------
        device : torch.device or str
            Target device.

        Returns
        -------
        stats : same type
            ``self`` or a new object whose tensors live on ``device``.
        """
        device = torch.device(device)
        if self._means is None or self.device == device:
            return self
        new = self._empty_like()
        new.n_samples_ = self.n_samples_
        new._means = [m.to(device) for m in self._means]
        new._moments = {k: v.to(device) for k, v in self._moments.items()}
        return new

    def __add__(self, other: "_ComomentAccumulator") -> "_ComomentAccumulator":
        return self.merge(other)

    # -- pickling: always store CPU tensors so a GPU pickle loads anywhere --
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._means is not None:
            state["_means"] = [m.cpu() for m in self._means]
            state["_moments"] = {k: v.cpu() for k, v in self._moments.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        # Tensors stay on the CPU; owners (the aligners) move them back.
        self.__dict__.update(state)


class _ViewByViewBatch:
    """One batch of an accumulator's views, given one view at a time.

    Each view is validated and centered when it arrives, and its products with
    the views already given are computed at once; a centered view is kept only
    while a pair with a view still to come needs it. For star statistics given
    the reference first, only the reference's view and the current one are in
    memory, instead of every view of the batch (what lets the merger run the
    models one after the other). :meth:`commit` adds the batch to the
    accumulator, exactly as one ``update`` with all views would.
    """

    def __init__(self, owner: _ComomentAccumulator, commit_when_complete: bool = False) -> None:
        self.owner = owner
        # commit as soon as every view is given: its products are freed then, not
        # when the batches of every other space are complete too
        self.commit_when_complete = commit_when_complete
        self.committed = False
        self.n_samples: int | None = None
        self.means: dict[int, torch.Tensor] = {}
        self.moments: dict[tuple[int, int], torch.Tensor] = {}
        self._kept: dict[int, torch.Tensor] = {}
        self._device = owner.device

    def add(self, k: int, data: Any, name: str | None = None, grouped: bool = True) -> None:
        """Validate, center and multiply view ``k`` of this batch.

        ``data`` is ``(n_samples, d_k)``, or with ``grouped``
        ``(n_groups, group_size, d_k)`` (:meth:`skmerge.graph.Tap.extract_grouped`),
        whose samples are all ``n_groups * group_size`` rows; every view of a
        batch must have the same samples in the same order. Nothing reaches
        the accumulator before :meth:`commit`, so a failed batch leaves it
        unchanged.
        """
        name = name or f"views[{k}]"
        owner = self.owner
        if not 0 <= k < owner._n_views or k in self.means:
            raise ValueError(f"{name}: view {k} is out of range or was already given for this batch.")
        tensor = _checked_batch(data, name, self._device, grouped=grouped)
        if self._device is None:
            self._device = tensor.device  # the first view fixes the device of a first batch
        n_samples = math.prod(tensor.shape[:-1])
        if self.n_samples is None:
            self.n_samples, self._sample_shape = n_samples, tensor.shape[:-1]
        elif n_samples != self.n_samples:
            raise ValueError(f"Inconsistent numbers of samples: earlier views of this batch have "
                             f"{self.n_samples}, {name} has {n_samples}.")
        elif tensor.shape[:-1] != self._sample_shape:
            raise ValueError(f"{name} groups its samples as {tuple(tensor.shape[:-1])}, earlier views "
                             f"of this batch as {tuple(self._sample_shape)}.")
        if owner._means is not None and tensor.shape[-1] != owner._means[k].shape[0]:
            raise ValueError(f"{name} has {tensor.shape[-1]} features, but earlier batches had "
                             f"{owner._means[k].shape[0]}.")
        mean = _checked_mean(tensor, name, owner.precision)
        centered = _centered(tensor, mean, owner.precision)
        del tensor
        self.means[k] = mean
        given = self.means.keys()
        for i, j in owner._pairs:
            if k in (i, j) and i in given and j in given:
                left = centered if i == k else self._kept[i]
                right = centered if j == k else self._kept[j]
                self.moments[i, j] = _product(left, right)
        self._kept[k] = centered
        for view in list(self._kept):  # drop views no pending pair needs
            if not any(view in pair and not set(pair) <= given for pair in owner._pairs):
                del self._kept[view]
        if self.commit_when_complete and len(self.means) == owner._n_views:
            self.commit()

    def commit(self) -> None:
        """Add the batch to the accumulator (every view must have been given); once."""
        if self.committed:
            return
        missing = sorted(set(range(self.owner._n_views)) - self.means.keys())
        if missing:
            raise ValueError(f"Views {missing} of this batch were never given.")
        means = [self.means[k] for k in range(self.owner._n_views)]
        self.owner._add_batch(self.n_samples, means, self.moments)
        self._kept.clear()
        self.moments = {}
        self.committed = True


# --------------------------------------------------------------------------
# Public containers
# --------------------------------------------------------------------------
class CrossCovariance(_ComomentAccumulator):
    """Streaming centered (co)variances of two views ``X`` (n, p) and ``Y`` (n, q).

    The first call to :meth:`update` fixes the feature counts and the device;
    everything is accumulated in float64 with Chan et al.'s pairwise update,
    which stays accurate when features have large offsets.

    Parameters
    ----------
    precision : {"double", "single"}, default="double"
        Precision of each batch's centering and products. ``"double"``:
        float64 throughout. ``"single"``: a batch is centered and multiplied
        in float32 (several times faster on CPUs), while the batch means and the
        accumulation across batches stay float64; the error is that of one
        batch's float32 products (relative error below 1e-5, far below the
        sampling error of a covariance) and does not grow with the number of
        batches.

    Attributes
    ----------
    n_samples_ : int
        Total number of samples seen.
    mean_x_, mean_y_ : torch.Tensor of shape (p,) and (q,), float64
        Running means (``None`` before the first update).
    comoment_xx_, comoment_yy_, comoment_xy_ : torch.Tensor, float64
        Sums of centered products, of shapes (p, p), (q, q) and (p, q).
        Dividing by ``n_samples_ - ddof`` gives the covariances.

    See Also
    --------
    ReferenceCovariance : Many views against one reference view.
    skmerge.aligners.CCAAligner.fit_from_stats : Fit an aligner from these.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.stats import CrossCovariance
    >>> rng = np.random.default_rng(0)
    >>> X, Y = rng.normal(size=(100, 3)), rng.normal(size=(100, 2))
    >>> stats = CrossCovariance()
    >>> for start in range(0, 100, 32):
    ...     stats = stats.update(X[start:start + 32], Y[start:start + 32])
    >>> stats.n_samples_
    100
    >>> np.allclose(stats.covariance_xy().numpy(), np.cov(X.T, Y.T)[:3, 3:])
    True
    """

    _pairs = ((0, 0), (1, 1), (0, 1))
    _n_views = 2

    def __init__(self, precision: str = "double") -> None:
        self.precision = _checked_precision(precision)
        self._reset()

    def __repr__(self) -> str:
        if self._means is None:
            return "CrossCovariance(empty)"
        return (
            f"CrossCovariance(n_samples={self.n_samples_}, n_features_x={self.n_features_x}, "
            f"n_features_y={self.n_features_y}, device={self.device})"
        )

    def update(self, X: Any, Y: Any) -> "CrossCovariance":
        """Accumulate one batch.

        Parameters
        ----------
        X : ndarray or torch.Tensor of shape (n_samples, p)
            Batch of the first view.
        Y : ndarray or torch.Tensor of shape (n_samples, q)
            Batch of the second view, same rows.

        Returns
        -------
        self : CrossCovariance
            The updated statistics.

        Raises
        ------
        ValueError
            If a batch is not 2-D, the sample counts differ, a value is NaN or
            infinite, the feature counts differ from earlier batches, or a
            tensor is on another device than the statistics.
        """
        self._update_views((X, Y), ("X", "Y"))
        return self

    def merge(self, other: "CrossCovariance") -> "CrossCovariance":
        """Combine with statistics of other samples (e.g. another data shard).

        Parameters
        ----------
        other : CrossCovariance
            Statistics of the same two views on other samples.

        Returns
        -------
        merged : CrossCovariance
            New object; neither input is modified. ``a + b`` is the same.
        """
        return self._merged(other)

    # Named views of the internal storage.
    @property
    def mean_x_(self) -> torch.Tensor | None:
        return None if self._means is None else self._means[0]

    @property
    def mean_y_(self) -> torch.Tensor | None:
        return None if self._means is None else self._means[1]

    @property
    def comoment_xx_(self) -> torch.Tensor | None:
        return None if self._moments is None else self._moments[0, 0]

    @property
    def comoment_yy_(self) -> torch.Tensor | None:
        return None if self._moments is None else self._moments[1, 1]

    @property
    def comoment_xy_(self) -> torch.Tensor | None:
        return None if self._moments is None else self._moments[0, 1]

    @property
    def n_features_x(self) -> int | None:
        """Number of features of ``X`` (``None`` before the first update)."""
        return None if self._means is None else int(self._means[0].shape[0])

    @property
    def n_features_y(self) -> int | None:
        """Number of features of ``Y`` (``None`` before the first update)."""
        return None if self._means is None else int(self._means[1].shape[0])

    def select(self, x_features, y_features) -> "CrossCovariance":
        """Statistics of a subset of the features of each view.

        Parameters
        ----------
        x_features, y_features : slice, sequence of int or LongTensor
            Features of ``X`` and of ``Y`` to keep.

        Returns
        -------
        stats : CrossCovariance
            New object over the same samples (``ModelMerger`` uses it to solve a
            GroupNorm space group by group).
        """
        self._check_fitted()
        ix = _feature_index(x_features, self.n_features_x, self.device)
        iy = _feature_index(y_features, self.n_features_y, self.device)
        new = self._empty_like()
        new.n_samples_ = self.n_samples_
        new._means = [self._means[0][ix], self._means[1][iy]]
        new._moments = {
            (0, 0): self._moments[0, 0][ix][:, ix],
            (1, 1): self._moments[1, 1][iy][:, iy],
            (0, 1): self._moments[0, 1][ix][:, iy],
        }
        return new

    def covariance_xx(self, ddof: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Covariance of ``X``, shape (p, p), float64.

        Parameters
        ----------
        ddof : int, default=1
            Delta degrees of freedom; the divisor is ``n_samples_ - ddof``.
        dtype : torch.dtype, optional
            Return it in this precision (the accumulation stays float64).

        Returns
        -------
        cov : torch.Tensor of shape (p, p)
        """
        return self._covariance(0, 0, ddof, dtype)

    def covariance_yy(self, ddof: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Covariance of ``Y``, shape (q, q), float64. See :meth:`covariance_xx`."""
        return self._covariance(1, 1, ddof, dtype)

    def covariance_xy(self, ddof: int = 1, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Cross-covariance of ``X`` with ``Y``, shape (p, q), float64. See :meth:`covariance_xx`."""
        return self._covariance(0, 1, ddof, dtype)


class _MultiViewAccumulator(_ComomentAccumulator):
    """Shared by the accumulators of ``n_views`` views: validation, ``update``, views."""

    def __init__(self, n_views: int, reference: int = 0, precision: str = "double") -> None:
        self.precision = _checked_precision(precision)
        if isinstance(n_views, bool) or not isinstance(n_views, (int, np.integer)) or n_views < 1:
            raise ValueError(f"n_views must be a positive integer, got {n_views!r}.")
        if (
            isinstance(reference, bool)
            or not isinstance(reference, (int, np.integer))
            or not -n_views <= reference < n_views
        ):
            raise ValueError(f"reference must be an index in [0, {n_views}), got {reference!r}.")
        self.n_views = int(n_views)
        self.reference = int(reference) % self.n_views
        self._n_views = self.n_views
        self._pairs = self._kept_pairs()
        self._reset()

    def _kept_pairs(self) -> tuple[tuple[int, int], ...]:
        raise NotImplementedError

    def update(self, views: Sequence[Any]):
        """Accumulate one batch per view.

        Parameters
        ----------
        views : sequence of ndarray or torch.Tensor
            ``n_views`` arrays of shapes (n_samples, d_k), same rows.

        Returns
        -------
        self
        """
        if isinstance(views, (np.ndarray, torch.Tensor)) or not isinstance(views, Sequence):
            raise ValueError("views must be a sequence (list or tuple) with one batch per view.")
        self._update_views(views, [f"views[{k}]" for k in range(len(views))])
        return self

    @property
    def n_features_(self) -> list[int] | None:
        """Feature count of every view (``None`` before the first update)."""
        return None if self._means is None else [int(m.shape[0]) for m in self._means]

    @property
    def means_(self) -> list[torch.Tensor] | None:
        """Per-view means, float64 (``None`` before the first update)."""
        return None if self._means is None else list(self._means)

    def _view_index(self, k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not -self.n_views <= k < self.n_views:
            raise IndexError(f"view index must be in [0, {self.n_views}), got {k!r}.")
        return int(k) % self.n_views


class ReferenceCovariance(_MultiViewAccumulator):
    """Star-shaped streaming statistics of ``n_views`` views against a reference.

    For all-to-one merging every model's features are aligned to one reference
    model. This keeps, per view ``k``: its mean, its auto-comoment
    ``(d_k, d_k)`` and its cross-comoment with the reference ``(d_k, d_ref)``;
    the reference's auto-comoment is stored once. Memory is
    ``O(n_views * d^2)``, never the joint ``(n_views * d)^2`` matrix.

    Parameters
    ----------
    n_views : int
        Number of views (models), including the reference. At least 1.
    reference : int, default=0
        Index of the reference view.
    precision : {"double", "single"}, default="double"
        Precision of each batch's centering and products (see
        :class:`CrossCovariance`); the means and the accumulation across
        batches are float64 in both cases.

    Attributes
    ----------
    n_samples_ : int
        Total number of samples seen.
    means_ : list of torch.Tensor
        Per-view means, float64.
    auto_comoments_ : list of torch.Tensor
        Per-view sums of centered products with itself, shapes (d_k, d_k).
    cross_comoments_ : list of torch.Tensor
        Per-view sums of centered products with the reference, shapes
        (d_k, d_ref); the reference's entry is its auto-comoment.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.stats import ReferenceCovariance
    >>> rng = np.random.default_rng(0)
    >>> views = [rng.normal(size=(50, d)) for d in (4, 3, 5)]
    >>> stats = ReferenceCovariance(n_views=3, reference=0).update(views)
    >>> pair = stats.pair(2)        # view 2 (X) against the reference (Y)
    >>> tuple(pair.covariance_xy().shape)
    (5, 4)
    """

    def _kept_pairs(self) -> tuple[tuple[int, int], ...]:
        ref = self.reference
        return tuple((k, k) for k in range(self.n_views)) + tuple(
            (k, ref) for k in range(self.n_views) if k != ref
        )

    def __repr__(self) -> str:
        if self._means is None:
            return f"ReferenceCovariance(n_views={self.n_views}, reference={self.reference}, empty)"
        return (
            f"ReferenceCovariance(n_views={self.n_views}, reference={self.reference}, "
            f"n_samples={self.n_samples_}, n_features={self.n_features_}, device={self.device})"
        )

    def merge(self, other: "ReferenceCovariance") -> "ReferenceCovariance":
        """Combine with statistics of other samples; returns a new object.

        Parameters
        ----------
        other : ReferenceCovariance
            Same ``n_views`` and ``reference``, other samples.

        Returns
        -------
        merged : ReferenceCovariance
        """
        if isinstance(other, ReferenceCovariance) and (
            other.n_views != self.n_views or other.reference != self.reference
        ):
            raise ValueError(
                "Cannot merge ReferenceCovariance objects with different n_views/reference: "
                f"({self.n_views}, {self.reference}) and ({other.n_views}, {other.reference})."
            )
        return self._merged(other)

    @property
    def auto_comoments_(self) -> list[torch.Tensor] | None:
        if self._moments is None:
            return None
        return [self._moments[k, k] for k in range(self.n_views)]

    @property
    def cross_comoments_(self) -> list[torch.Tensor] | None:
        if self._moments is None:
            return None
        ref = self.reference
        return [self._moments[k, ref] for k in range(self.n_views)]

    def pair(self, k: int) -> CrossCovariance:
        """Statistics of view ``k`` (as ``X``) against the reference (as ``Y``).

        The returned object shares the tensors (no copy) and is a snapshot:
        later updates of ``self`` do not change it, and updating it does not
        change ``self``.

        Parameters
        ----------
        k : int
            View index; ``k == reference`` gives the reference against itself.

        Returns
        -------
        stats : CrossCovariance
        """
        k = self._view_index(k)
        self._check_fitted()
        ref = self.reference
        cross = CrossCovariance(precision=self.precision)
        cross.n_samples_ = self.n_samples_
        cross._means = [self._means[k], self._means[ref]]
        cross._moments = {
            (0, 0): self._moments[k, k],
            (1, 1): self._moments[ref, ref],
            (0, 1): self._moments[k, ref],
        }
        return cross

    def covariance(self, k: int, ddof: int = 1) -> torch.Tensor:
        """Covariance of view ``k``, shape (d_k, d_k), float64."""
        k = self._view_index(k)
        return self._covariance(k, k, ddof)

    def cross_covariance(self, k: int, ddof: int = 1) -> torch.Tensor:
        """Cross-covariance of view ``k`` with the reference, shape (d_k, d_ref), float64."""
        k = self._view_index(k)
        return self._covariance(k, self.reference, ddof)
