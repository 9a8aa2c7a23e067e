"""Hierarchical pairwise merging: a balanced binary tree of two-model merges."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.base import clone
from torch import nn

from .aligners import CCAAligner
from .merge import ModelMerger

__all__ = ["hierarchical_merge"]

_RESERVED = ("models", "weights", "aligner")


def hierarchical_merge(models, X, aligner=CCAAligner(), **merger_kwargs):
    """Merge models pairwise, level by level, instead of all to one reference.

    The models are the leaves of a balanced binary tree: neighbours are merged
    in pairs (``models[0]`` with ``models[1]``, ``models[2]`` with
    ``models[3]``, ...), then the merged models in pairs, and so on until one
    model is left; at a level with an odd number of models the last one
    passes up unchanged. Each pair is merged by a
    :class:`~skmerge.ModelMerger` with a clone of ``aligner``, fitted on
    ``X``, the left model as the reference and averaging weights proportional
    to the number of leaves under each side, so that the result is a uniform
    average of all leaves (e.g. 3 models: ``(m0 + m1) / 2`` then weights
    2 : 1 with ``m2``).

    When it helps: all-to-one merging expresses every model in the basis of a
    single reference, so the result depends on which model that is, and each
    model's alignment to it sees nothing of the others. In the tree every
    alignment is between two models only, and from the second level on it is
    between two *merged* models, whose features already average several
    networks, so no single model's basis dominates. It costs ``N - 1`` merges
    (one pass over ``X`` each, with two models) instead of one pass with ``N``
    models, and the result depends on the order of ``models`` (which models are
    paired).

    Parameters
    ----------
    models : sequence of torch.nn.Module
        Two or more models of one architecture; never modified.
    X : torch.Tensor, numpy.ndarray, Dataset or DataLoader
        Alignment data, passed to every :meth:`ModelMerger.fit`.
    aligner : estimator, default=CCAAligner()
        Aligner of every pairwise merge (cloned for each).
    **merger_kwargs
        Other :class:`~skmerge.ModelMerger` parameters (``reset_bn``,
        ``batch_size``, ``device``, ``spaces``, ``verbose``, ...), the same for
        every merge; ``reference=1`` makes the right model of each pair the
        reference. ``models``, ``weights`` and ``aligner`` are set here.

    Returns
    -------
    merged_model : torch.nn.Module
        The root of the tree: a model of the same architecture, in evaluation
        mode (BatchNorm statistics re-estimated on ``X`` at every level when
        ``reset_bn`` is True, the default).
    mergers : list of list of ModelMerger
        ``mergers[level]`` holds the fitted pairwise mergers of that level,
        left to right (level 0 merges the input models); ``mergers[-1][0]``
        produced ``merged_model``.

    Raises
    ------
    TypeError
        If ``models`` is not a sequence of modules, or ``merger_kwargs`` names
        ``models``, ``weights`` or ``aligner``.
    ValueError
        If fewer than 2 models are given (and every error of
        :class:`~skmerge.ModelMerger`).

    Examples
    --------
    >>> import torch
    >>> from skmerge import PermutationAligner
    >>> from skmerge.hierarchical import hierarchical_merge
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> models = [torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                               torch.nn.Linear(16, 3)) for _ in range(3)]
    >>> merged, mergers = hierarchical_merge(models, torch.randn(256, 4), PermutationAligner(),
    ...                                      device="cpu")
    >>> [len(level) for level in mergers], mergers[-1][0].weights_.round(3).tolist()
    ([1, 1], [0.667, 0.333])
    """
    if isinstance(models, nn.Module) or not isinstance(models, Sequence):
        raise TypeError("models must be a list or tuple of torch.nn.Module objects, "
                        f"got {type(models).__name__}.")
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"hierarchical_merge needs at least 2 models, got {len(models)}.")
    # Fail before the first merge: one architecture, a usable aligner.
    ModelMerger(models)._validated_models()
    if not hasattr(aligner, "fit_from_stats"):
        raise TypeError("aligner must be a skmerge aligner with fit_from_stats, got "
                        f"{type(aligner).__name__}.")
    reserved = sorted(set(merger_kwargs) & set(_RESERVED))
    if reserved:
        raise TypeError(f"hierarchical_merge sets {', '.join(reserved)} itself; do not pass "
                        f"{'it' if len(reserved) == 1 else 'them'} in merger_kwargs.")

    level = [(model, 1) for model in models]  # (model, number of leaves under it)
    mergers: list[list[ModelMerger]] = []
    while len(level) > 1:
        fitted, upper = [], []
        for (left, n_left), (right, n_right) in zip(level[0::2], level[1::2]):
            merger = ModelMerger([left, right], clone(aligner), weights=[n_left, n_right],
                                 **merger_kwargs).fit(X)
            fitted.append(merger)
            upper.append((merger.merged_model_, n_left + n_right))
        if len(level) % 2:
            upper.append(level[-1])  # the odd one out passes up
        mergers.append(fitted)
        level = upper
    return mergers[-1][0].merged_model_, mergers
