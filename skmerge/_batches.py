"""Turn the many forms of user data into a stream of input batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils import check_array
from torch.utils.data import DataLoader, Dataset, TensorDataset


def as_loader(X, batch_size: int, y=None) -> DataLoader:
    """Wrap alignment or evaluation data in a :class:`~torch.utils.data.DataLoader`.

    Parameters
    ----------
    X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
        Inputs (first axis = samples), a dataset yielding ``x`` or ``(x, y, ...)``,
        or a ready loader, used as it is.
    batch_size : int
        Batch size for tensors, arrays and datasets.
    y : array-like, optional
        Labels paired with array or tensor inputs.

    Returns
    -------
    DataLoader
        Iterates in a fixed order (no shuffling).
    """
    if isinstance(X, DataLoader):
        return X
    if isinstance(X, Dataset):
        return DataLoader(X, batch_size=batch_size, shuffle=False)
    if isinstance(X, torch.Tensor):
        inputs = _checked_tensor(X)
    elif isinstance(X, (np.ndarray, list, tuple)) or hasattr(X, "__array__") or sp.issparse(X):
        # scikit-learn's validation: sparse, complex, object, non-finite and
        # empty inputs get its standard messages.
        inputs = torch.as_tensor(check_array(X, allow_nd=True, dtype="numeric", input_name="X"))
    else:
        raise TypeError(
            "X must be a torch.Tensor, a numpy array, a torch Dataset or a DataLoader; "
            f"got {type(X).__name__}."
        )
    tensors = [inputs]
    if y is not None:
        check_dense_labels(y)
        labels = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        if len(labels) != len(inputs):
            raise ValueError(
                f"X and y have different numbers of samples: {len(inputs)} and {len(labels)}."
            )
        tensors.append(labels)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)


def _checked_tensor(X: torch.Tensor) -> torch.Tensor:
    _check_has_values(X, "X")
    if X.layout != torch.strided:
        raise TypeError("X is a sparse tensor, but dense data is required; convert it with "
                        "X.to_dense().")
    if X.ndim < 2:
        raise ValueError(
            f"X must have at least 2 dimensions (n_samples, ...), got shape {tuple(X.shape)}; "
            "reshape a single feature with X.reshape(-1, 1)."
        )
    if X.is_complex():
        raise ValueError("Complex data not supported.")
    if X.is_floating_point() and not bool(torch.isfinite(X).all()):
        raise ValueError("X contains NaN or infinity.")
    return X


def _check_has_values(tensor: torch.Tensor, name: str) -> None:
    if tensor.is_meta:
        raise ValueError(f"{name} is on the meta device, which holds shapes but no values; "
                         "pass real data.")


def check_dense_labels(y) -> None:
    """Refuse sparse labels with a message that says so (numpy would make an object array)."""
    if sp.issparse(y) or (isinstance(y, torch.Tensor) and y.layout != torch.strided):
        raise TypeError("y is sparse, but labels must be a dense 1-D array; convert it with "
                        "y.toarray().ravel() (or y.to_dense() for a torch tensor).")


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(inputs, labels or None)`` from a batch of ``x`` or ``(x, y, ...)``."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("The data loader yielded an empty batch.")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        raise TypeError("Batches that are dicts are not supported; yield x or (x, y).")
    return batch, None


def iter_inputs(loader: DataLoader, device: torch.device, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """Yield the input part of each batch on ``device``, floating inputs cast to ``dtype``."""
    for batch in loader:
        inputs, _ = split_batch(batch)
        inputs = torch.as_tensor(inputs)
        _check_has_values(inputs, "The input data")
        if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
            raise ValueError("The input data contains NaN or infinity.")
        if inputs.is_floating_point():
            inputs = inputs.to(device=device, dtype=dtype)
        else:
            inputs = inputs.to(device=device)
        yield inputs


def loader_length(loader) -> int | None:
    """Number of batches, or None for a stream without ``__len__`` (progress bars without a total)."""
    try:
        return len(loader)
    except TypeError:
        return None
