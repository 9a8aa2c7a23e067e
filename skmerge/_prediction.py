"""Classifier methods of the estimators whose result is a merged network."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score
from sklearn.utils.validation import check_is_fitted

from ._batches import as_loader, check_dense_labels, iter_inputs, split_batch


class MergedModelClassifierMixin:
    """``predict_logits``, ``predict_proba``, ``predict``, ``score`` and ``score_tasks`` of ``merged_model_``.

    The estimator provides ``merged_model_``, ``device_`` and ``batch_size``,
    and optionally ``n_features_in_`` and ``classes_``.
    """

    @torch.no_grad()
    def predict_logits(self, X) -> np.ndarray:
        """Outputs (logits) of the merged model, as a numpy array.

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
            Inputs, or batches of ``(x, y)``.

        Returns
        -------
        numpy.ndarray of shape (n_samples, n_outputs)
        """
        check_is_fitted(self, "merged_model_")
        n_features = getattr(self, "n_features_in_", None)
        if (n_features is not None and isinstance(X, (torch.Tensor, np.ndarray)) and X.ndim == 2
                and X.shape[1] != n_features):
            raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                             f"{n_features} features as input.")
        model = self.merged_model_
        dtype = next(model.parameters()).dtype
        loader = as_loader(X, self.batch_size)
        outputs = [model(inputs).float().cpu() for inputs in iter_inputs(loader, self.device_, dtype)]
        if not outputs:
            raise ValueError("X is empty.")
        return torch.cat(outputs).numpy()

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of the merged model's outputs.

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader

        Returns
        -------
        numpy.ndarray of shape (n_samples, n_classes)
        """
        return torch.softmax(torch.from_numpy(self.predict_logits(X)), dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        """Class index with the largest output of the merged model.

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader

        Returns
        -------
        numpy.ndarray of shape (n_samples,)
        """
        indices = self.predict_logits(X).argmax(axis=1)
        # classes_ is arange(n_outputs); a data-free fit (weight matching) may lack it.
        classes = getattr(self, "classes_", None)
        return indices if classes is None else classes[indices]

    def score(self, X, y=None, sample_weight=None) -> float:
        """Accuracy of the merged model.

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
            Inputs, or a dataset/loader of ``(x, y)`` batches when ``y`` is None.
        y : array-like of shape (n_samples,), optional
            True labels; taken from the batches of ``X`` when None.
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        float
        """
        if y is None:
            y = labels_of(as_loader(X, self.batch_size))
        check_dense_labels(y)
        return float(accuracy_score(np.asarray(torch.as_tensor(y).cpu()), self.predict(X),
                                    sample_weight=sample_weight))

    def score_tasks(self, X, tasks, y=None) -> dict:
        """Joint and per-task accuracy of the merged model (models trained on different tasks).

        Parameters
        ----------
        X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
            Inputs, or a dataset/loader of ``(x, y)`` batches when ``y`` is None.
        tasks : sequence of sequence of int
            The classes of every task, e.g. the ``classes`` of
            :func:`skmerge.datasets.split_disjoint_classes`.
        y : array-like of shape (n_samples,), optional
            True labels; taken from the batches of ``X`` when None.

        Returns
        -------
        dict
            ``joint``, ``per_task``, ``task_mean`` and ``joint_per_task``, as
            :func:`skmerge.tasks.task_accuracies` returns them.
        """
        from .tasks import task_accuracies

        if y is None:
            y = labels_of(as_loader(X, self.batch_size))
        check_dense_labels(y)
        return task_accuracies(self.predict_logits(X), np.asarray(torch.as_tensor(y).cpu()), tasks)


def labels_of(loader) -> torch.Tensor:
    """All labels of a loader of ``(x, y)`` batches, on the CPU."""
    labels = []
    for batch in loader:
        _, y = split_batch(batch)
        if y is None:
            raise ValueError("score needs labels: pass y, or X yielding (x, y) batches.")
        labels.append(torch.as_tensor(y).cpu())
    return torch.cat(labels)
