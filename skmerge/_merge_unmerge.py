"""Merged models as weighted combinations of every model's features (merge and unmerge matrices).

Per feature space and model ``k``, a :class:`MergeUnmerge` says how model
``k``'s features enter the merged features and how model ``k``'s consumers
read them back, in skmerge's row convention (features ``z`` are row
vectors):

* merge: the merged features are ``z = sum_k (z_k @ mapping_k) * share_k``
  (``share_k[g]``: model ``k``'s part in merged feature ``g``; the parts of
  one merged feature sum to one over the models);
* unmerge: model ``k``'s features are approximated by ``z @ unmerge_k``.

The merged model's parameters are then, for every model, its parameters
transformed as :func:`~skmerge.graph.apply_transforms` does (producers get
``mapping_k.T`` on their rows, consumers ``unmerge_k.T`` on their columns),
summed over the models with the weight ``share_k[g]`` for the entries that
produce merged feature ``g`` and the model's averaging weight elsewhere
(parameters that produce no feature space: the output layer). All-to-one
averaging is the case ``mapping_k = T_k`` (an aligner's mapping),
``unmerge_k = T_k^-1`` and ``share_k = w_k`` for every feature, i.e. merge
matrices ``[w_0 I, w_1 T_1, ..., w_n T_n]``; ZipIt! (:mod:`skmerge.zipit`)
averages groups of matched features, within models too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .graph import Space, apply_transforms
from .graph._apply import _locate, _scatter_, gather_slice

__all__ = ["MergeUnmerge", "combine_states", "from_aligners", "from_labels", "producer_values"]


class MergeUnmerge:
    """One model's part in one merged feature space.

    Parameters
    ----------
    mapping : torch.Tensor of shape (d, d_merged)
        Model features to merged features, before the shares: ``z_k @ mapping``.
    unmerge : torch.Tensor of shape (d_merged, d)
        Merged features to the model's features: ``z @ unmerge``.
    share : torch.Tensor of shape (d_merged,)
        The model's part in each merged feature.

    Attributes
    ----------
    mapping_, inverse_mapping_ : torch.Tensor
        ``mapping`` and ``unmerge`` as float64 (the names of the aligners, so
        that the transform applied to the weights is read the same way).
    share_ : torch.Tensor
        ``share`` as float64.
    """

    def __init__(self, mapping, unmerge, share):
        self.mapping_ = torch.as_tensor(mapping).to(torch.float64)
        self.inverse_mapping_ = torch.as_tensor(unmerge).to(torch.float64)
        self.share_ = torch.as_tensor(share).to(torch.float64)
        d, merged = self.mapping_.shape
        if self.inverse_mapping_.shape != (merged, d) or self.share_.shape != (merged,):
            raise ValueError(f"inconsistent shapes: mapping {tuple(self.mapping_.shape)}, unmerge "
                             f"{tuple(self.inverse_mapping_.shape)}, share {tuple(self.share_.shape)}")

    @property
    def merge_(self) -> torch.Tensor:
        """``(d, d_merged)``: the merge matrix, ``mapping_ * share_`` (the model's term of the merged features)."""
        return self.mapping_ * self.share_

    @property
    def unmerge_(self) -> torch.Tensor:
        """``(d_merged, d)``: the unmerge matrix (``inverse_mapping_``)."""
        return self.inverse_mapping_

    def __getstate__(self):
        return {key: value.cpu() for key, value in self.__dict__.items()}

    def __repr__(self):
        d, merged = self.mapping_.shape
        return f"MergeUnmerge(d={d}, d_merged={merged})"


def from_aligners(row: Sequence, weights: Sequence[float], dim: int) -> list:
    """All-to-one: one space's fitted aligners (``None``: the basis is kept) with shares ``weights``."""
    parts = []
    for aligner, weight in zip(row, weights):
        share = torch.full((dim,), float(weight), dtype=torch.float64)
        if aligner is None:
            eye = torch.eye(dim, dtype=torch.float64)
            parts.append(MergeUnmerge(eye, eye, share))
        else:
            mapping = torch.as_tensor(aligner.mapping_).cpu()
            parts.append(MergeUnmerge(mapping, torch.as_tensor(aligner.inverse_mapping_).cpu(), share))
    return parts


def from_labels(labels: torch.Tensor, weights: Sequence[float]) -> list:
    """The parts of every model from a grouping of all their features.

    ``labels[k, i]`` is the merged feature that feature ``i`` of model ``k``
    joins. A merged feature is the weighted mean of its members (each member
    weighted by its model's weight; when all members have weight zero, the
    plain mean), and every member reads it back: the unmerge matrix is the
    0/1 membership matrix.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    n_models, d = labels.shape
    merged = int(labels.max()) + 1
    weights = torch.as_tensor([float(w) for w in weights], dtype=torch.float64)
    members = torch.zeros(n_models, d, merged, dtype=torch.float64)
    members.scatter_(2, labels.unsqueeze(2), 1.0)
    counts = members.sum(1)                                   # (n_models, merged)
    mass = weights[:, None] * counts
    total = mass.sum(0)
    plain = counts / counts.sum(0).clamp_min(1)
    shares = torch.where(total > 0, mass / total.clamp_min(1e-300), plain)
    parts = []
    for k in range(n_models):
        mapping = members[k] / counts[k].clamp_min(1)          # mean of model k's members
        parts.append(MergeUnmerge(mapping, members[k].T.clone(), shares[k]))
    return parts


def producer_values(state: dict, spaces: Sequence[Space], values: Sequence, default: float) -> dict:
    """Per entry: ``values[i][c]`` where channel ``c`` of space ``i`` is produced, ``default`` elsewhere.

    Parameters
    ----------
    state : dict of str to torch.Tensor
        Gives the keys, shapes and devices (floating-point tensors only).
    spaces : sequence of Space
    values : sequence
        One ``(d,)`` tensor per space, or None (its producers keep ``default``).
    default : float

    Returns
    -------
    dict
        A float64 tensor per floating-point key of ``state``.
    """
    out = {key: torch.full(value.shape, float(default), dtype=torch.float64, device=value.device)
           for key, value in state.items() if isinstance(value, torch.Tensor) and value.is_floating_point()}
    for space, value in zip(spaces, values):
        if value is None:
            continue
        for sl in space.producers:
            if sl.name not in out:
                continue
            t = out[sl.name]
            view, positions, _, _ = _locate(t, sl)
            g = gather_slice(t, sl)
            g.copy_(torch.as_tensor(value, dtype=torch.float64, device=t.device)
                    .reshape(-1, *([1] * (g.ndim - 1))).expand_as(g))
            _scatter_(view, sl, positions, g)
    return out


def combine_states(states: Sequence[dict], spaces: Sequence[Space], parts: Sequence[Sequence],
                   weights: Sequence[float]) -> dict:
    """The merged state: every model transformed by its parts and summed with its shares.

    Parameters
    ----------
    states : sequence of dict
        The models' ``state_dict`` objects (not modified).
    spaces : sequence of Space
    parts : sequence
        ``parts[i][k]``: the :class:`MergeUnmerge` of space ``i`` and model
        ``k``, or ``None`` for a space whose basis every model keeps (it is
        averaged with ``weights``).
    weights : sequence of float
        Per-model weights of the entries that produce no merged feature.

    Returns
    -------
    dict
        Floating-point tensors combined (float64 arithmetic, the models'
        dtypes in the result); other entries (integer buffers) are those of
        ``states[0]``.
    """
    merged: dict = {}
    float_keys = {key for key, value in states[0].items()
                  if isinstance(value, torch.Tensor) and value.is_floating_point()}
    for k, (state, weight) in enumerate(zip(states, weights)):
        row = [None if p is None else p[k] for p in parts]
        transforms = [None if p is None else (p.mapping_, p.inverse_mapping_) for p in row]
        aligned = apply_transforms(state, spaces, transforms)
        shares = producer_values(aligned, spaces, [None if p is None else p.share_ for p in row], weight)
        for key, value in aligned.items():
            if key in float_keys:
                term = shares[key] * value.to(torch.float64)
                merged[key] = term if key not in merged else merged[key] + term
            elif k == 0:
                merged[key] = value
    first = states[0]
    return {key: value.to(first[key].dtype) if key in float_keys else value
            for key, value in merged.items()}
