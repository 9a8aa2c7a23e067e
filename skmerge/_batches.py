"""Turn the many forms of user data into a stream of input batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
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
    if isinstance(X, (np.ndarray, torch.Tensor)) or hasattr(X, "__array__"):
        inputs = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)
        if inputs.ndim == 0:
            raise ValueError("X must have a first axis of samples; got a scalar.")
        tensors = [inputs]
        if y is not None:
            labels = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
            if len(labels) != len(inputs):
                raise ValueError(
                    f"X and y have different numbers of samples: {len(inputs)} and {len(labels)}."
                )
            tensors.append(labels)
        return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)
    raise TypeError(
        "X must be a torch.Tensor, a numpy array, a torch Dataset or a DataLoader; "
        f"got {type(X).__name__}."
    )


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
        if inputs.is_floating_point():
            inputs = inputs.to(device=device, dtype=dtype)
        else:
            inputs = inputs.to(device=device)
        yield inputs
