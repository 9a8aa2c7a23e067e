"""Joint and per-task accuracy, for models trained on different tasks (disjoint class subsets).

When each model was trained on its own classes (e.g. with
:func:`skmerge.datasets.split_disjoint_classes`), a merged model is judged
two ways (as in the ZipIt! paper):

* **joint** accuracy: the class with the largest output among *all* classes,
  on all test inputs (the merged model must also tell the tasks apart);
* **per-task** accuracy: on the test inputs of one task, the class with the
  largest output among that task's classes only (the task is known), and
  its mean over the tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["evaluate_tasks", "task_accuracies"]


def _as_numpy(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == object:
        raise ValueError(f"{name} must be numeric.")
    return array


def _checked_tasks(tasks, n_classes: int) -> list[np.ndarray]:
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence) or len(tasks) == 0:
        raise ValueError("tasks must be a non-empty list of class lists, e.g. "
                         "[subset.classes for subset in split_disjoint_classes(train, 2)].")
    out, seen = [], set()
    for t, classes in enumerate(tasks):
        classes = np.asarray(list(getattr(classes, "classes", classes)), dtype=np.int64)
        if classes.ndim != 1 or classes.size == 0:
            raise ValueError(f"tasks[{t}] must be a non-empty list of class indices, got {classes!r}.")
        if classes.min() < 0 or classes.max() >= n_classes:
            raise ValueError(f"tasks[{t}] has classes outside range({n_classes}) of the outputs: "
                             f"{classes.tolist()}.")
        if seen & set(classes.tolist()):
            raise ValueError(f"tasks must be disjoint; class(es) {sorted(seen & set(classes.tolist()))} "
                             f"appear in tasks[{t}] and an earlier task.")
        seen |= set(classes.tolist())
        out.append(classes)
    return out


def task_accuracies(outputs, labels, tasks) -> dict:
    """Joint accuracy, and accuracy within each task's classes on that task's inputs.

    Parameters
    ----------
    outputs : array-like or torch.Tensor of shape (n_samples, n_classes)
        Scores of every class (logits or probabilities: only their order counts).
    labels : array-like or torch.Tensor of shape (n_samples,)
        True class indices.
    tasks : sequence of sequence of int
        The classes of every task (disjoint), e.g.
        ``[s.classes for s in split_disjoint_classes(train, 2)]``; the
        subsets themselves are accepted too (their ``classes`` are read).

    Returns
    -------
    dict
        ``"joint"``: accuracy of the argmax over all classes on all samples;
        ``"per_task"``: list, per task, of the accuracy on the samples whose
        label is in the task with the argmax over the task's classes only
        (NaN for a task without samples); ``"task_mean"``: mean of the
        per-task accuracies (over the tasks with samples);
        ``"joint_per_task"``: list, per task, of the joint accuracy on that
        task's samples.

    Examples
    --------
    >>> import numpy as np
    >>> from skmerge.tasks import task_accuracies
    >>> outputs = np.array([[5., 0., 9., 0.], [0., 5., 9., 0.], [9., 0., 0., 5.]])
    >>> result = task_accuracies(outputs, [0, 1, 3], tasks=[[0, 1], [2, 3]])
    >>> result["joint"], result["per_task"]   # right within every task, wrong jointly
    (0.0, [1.0, 1.0])
    """
    outputs = _as_numpy(outputs, "outputs").astype(np.float64, copy=False)
    labels = _as_numpy(labels, "labels")
    if outputs.ndim != 2:
        raise ValueError(f"outputs must be 2-D (n_samples, n_classes), got shape {outputs.shape}.")
    if labels.ndim != 1 or len(labels) != len(outputs):
        raise ValueError(f"labels must be 1-D with one label per row of outputs ({len(outputs)}), got "
                         f"shape {labels.shape}.")
    if len(labels) == 0:
        raise ValueError("outputs and labels are empty.")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise ValueError("labels must be class indices (integers).")
        labels = labels.astype(np.int64)
    groups = _checked_tasks(tasks, outputs.shape[1])
    predicted = outputs.argmax(axis=1)
    per_task, joint_per_task = [], []
    for classes in groups:
        rows = np.isin(labels, classes)
        if not rows.any():
            per_task.append(float("nan"))
            joint_per_task.append(float("nan"))
            continue
        within = classes[outputs[rows][:, classes].argmax(axis=1)]
        per_task.append(float(np.mean(within == labels[rows])))
        joint_per_task.append(float(np.mean(predicted[rows] == labels[rows])))
    observed = [a for a in per_task if not np.isnan(a)]
    return {"joint": float(np.mean(predicted == labels)), "per_task": per_task,
            "task_mean": float(np.mean(observed)), "joint_per_task": joint_per_task}


def evaluate_tasks(model: torch.nn.Module, dataset, tasks, batch_size: int = 512, device=None) -> dict:
    """:func:`task_accuracies` of a model's outputs on a labelled data set.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier (for instance a merger's ``merged_model_``); evaluated in
        eval mode, its mode restored afterwards.
    dataset : torch.utils.data.Dataset
        Yields ``(input, label)``.
    tasks : sequence of sequence of int
        The classes of every task.
    batch_size : int, default=512
    device : str or torch.device, optional
        Device to run on; ``None`` keeps the model's device.

    Returns
    -------
    dict
        As :func:`task_accuracies`.
    """
    from .training import _logits_and_labels, _require_labels

    logits, labels = _logits_and_labels(model, dataset, batch_size, device)
    return task_accuracies(logits, _require_labels(labels), tasks)
